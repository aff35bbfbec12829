"""Synthetic particle stacks with known poses, for testing and for the demo.

SNR is defined as the variance of the noise-free images (CTF applied, over every pixel of the
box, averaged over particles) divided by the variance of the added white Gaussian noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryogs.errors import CryogsError
from cryogs.io.atoms import AtomSet
from cryogs.io.mrc import write_mrc
from cryogs.io.star import write_star
from cryogs.model.gaussians import GaussianModel
from cryogs.physics.conventions import random_rotations
from cryogs.physics.ctf import apply_ctf, compute_ctf
from cryogs.render.project import project, voxelize


@dataclass
class SimulatedStack:
    images: np.ndarray  # [n, D, D] float32
    rotations: np.ndarray  # [n, 3, 3] RELION A
    shifts: np.ndarray  # [n, 2] RELION origins, Å
    noise_sigma: float
    signal_variance: float
    ctf: dict | None = None  # RELION-unit CTF parameters per particle (cryogs.io.particles.CTF_KEYS)


def random_ctf_params(n: int, defocus_range: tuple[float, float], *, voltage=300.0, cs=2.7,
                      amplitude_contrast=0.1, astigmatism=300.0, seed=0) -> dict:
    """Per-particle CTF parameters: defocus U uniform in ``defocus_range`` (Å), V up to
    ``astigmatism`` Å less, a uniform astigmatism angle, and shared optics."""
    rng = np.random.default_rng(seed)
    dfu = rng.uniform(*defocus_range, n)
    return {"defocus_u": dfu, "defocus_v": dfu - rng.uniform(0, astigmatism, n),
            "defocus_angle": rng.uniform(-180, 180, n), "voltage": np.full(n, voltage), "cs": np.full(n, cs),
            "amplitude_contrast": np.full(n, amplitude_contrast), "phase_shift": np.zeros(n),
            "bfactor": np.zeros(n)}


def load_source(path, *, pixel_size: float) -> GaussianModel:
    """Ground-truth Gaussians from a Gaussian file (.npz/.pt) or an atomic model (one per atom).

    Atoms get ``σ² = B/8π² + pixel_size²``: the extra pixel-wide blur band-limits the potential so
    that sampling at pixel centres does not alias.
    """
    path = Path(path)
    if path.suffix in (".npz", ".pt"):
        return GaussianModel.load(path)
    if path.suffix.lower() in (".pdb", ".ent", ".cif", ".mmcif"):
        return GaussianModel.from_atoms(AtomSet.read(path), per="atom", min_sigma=pixel_size)
    raise CryogsError(f"{path}: simulate from a Gaussian model (.npz, .pt) or an atomic model (.pdb, .cif)")


def simulate_stack(model: GaussianModel, n: int, *, box_size: int, pixel_size: float, snr: float = math.inf,
                   max_shift: float = 0.0, seed: int = 0, device: str = "cpu", backend: str = "auto",
                   batch_size: int = 64, progress: bool = False, ctf: dict | None = None) -> SimulatedStack:
    """Project ``model`` in ``n`` uniformly random poses, shift by up to ``max_shift`` Å, apply the
    CTF when ``ctf`` (per-particle RELION parameters, see :func:`random_ctf_params`) is given, add noise."""
    if n <= 0:
        raise CryogsError(f"the number of particles must be positive, got {n}")
    if snr <= 0:
        raise CryogsError(f"SNR must be positive (use inf for noise-free), got {snr}")
    gen = torch.Generator().manual_seed(seed)
    rotations = random_rotations(n, generator=gen, dtype=torch.float64)
    shifts = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * max_shift
    params = [p.detach().to(device) for p in model()]
    images = np.empty((n, box_size, box_size), np.float32)
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc="simulate", unit="batch", disable=not progress):
            sl = slice(i, i + batch_size)
            img = project(*params, rotations[sl].float().to(device), shifts[sl].float().to(device),
                          box_size=box_size, pixel_size=pixel_size, backend=backend)
            if ctf is not None:
                c = {k: v[sl] for k, v in ctf.items()}
                img = apply_ctf(img, compute_ctf(box_size, pixel_size, c["defocus_u"], c["defocus_v"],
                                                 c["defocus_angle"], c["voltage"], c["cs"], c["amplitude_contrast"],
                                                 c["phase_shift"], c["bfactor"], device=device))
            images[sl] = img.cpu().numpy()
    signal_var = float(images.var(axis=(1, 2)).mean())
    sigma = 0.0 if math.isinf(snr) else math.sqrt(signal_var / snr)
    if sigma > 0:
        rng = np.random.default_rng(seed + 1)
        images += rng.normal(0.0, sigma, images.shape).astype(np.float32)
    return SimulatedStack(images, rotations.numpy(), shifts.numpy(), sigma, signal_var, ctf)


def write_dataset(out_dir, model: GaussianModel, stack: SimulatedStack, *, box_size: int, pixel_size: float,
                  name: str = "particles") -> dict:
    """Write ``particles.mrcs``, ``particles.star`` (RELION 3.1), ``gt_map.mrc`` and ``gt_gaussians.npz``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_mrc(out / f"{name}.mrcs", stack.images, pixel_size)
    write_star(out / f"{name}.star", f"{name}.mrcs", stack.rotations, stack.shifts, pixel_size, box_size,
               ctf=stack.ctf)
    with torch.no_grad():
        gt_map = voxelize(*[p.detach() for p in model()], box_size=box_size, pixel_size=pixel_size)
    write_mrc(out / "gt_map.mrc", gt_map.cpu().numpy(), pixel_size)
    model.save(out / "gt_gaussians.npz")
    return {"star": out / f"{name}.star", "stack": out / f"{name}.mrcs", "map": out / "gt_map.mrc",
            "gaussians": out / "gt_gaussians.npz"}
