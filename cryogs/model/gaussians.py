"""The Gaussian model: parameters, initialisation, and files.

A model holds N anisotropic 3D Gaussians. Each has a mean (Å, x y z), a rotation (unit quaternion
w x y z), log-scales (log Å; the scales are the standard deviations along the principal axes) and a
log-amplitude; the amplitude is the Gaussian's integrated mass and stays positive.

File formats
    ``.npz`` / ``.pt``: arrays ``means [N,3]`` (Å), ``quats [N,4]`` (w, x, y, z), ``scales [N,3]``
    (Å, activated) and ``amplitudes [N]`` (integrated mass), plus ``format = "cryogs-gaussians-1"``.
    ``.ply``: the 3D Gaussian splatting layout (x y z, nx ny nz, f_dc_0..2, opacity, scale_0..2 as
    log-scales, rot_0..3 as w x y z), so splat viewers open it; colour and opacity encode the
    relative amplitude. It is for viewing; load models from ``.npz`` or ``.pt``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryogs.errors import CryogsError
from cryogs.io.atomic import atomic_path
from cryogs.io.atoms import AtomSet
from cryogs.physics.conventions import matrix_to_quat

FORMAT = "cryogs-gaussians-1"


class GaussianModel(nn.Module):
    """N Gaussians with unconstrained parameters suited to gradient descent."""

    def __init__(self, means, quats, scales, amplitudes):
        super().__init__()
        means, quats, scales, amplitudes = (torch.as_tensor(x, dtype=torch.float32)
                                            for x in (means, quats, scales, amplitudes))
        n = means.shape[0]
        if n == 0:
            raise CryogsError("a Gaussian model needs at least one Gaussian (N = 0)")
        if means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3) or amplitudes.shape != (n,):
            raise CryogsError("inconsistent Gaussian parameter shapes: means [N,3], quats [N,4], scales [N,3], "
                              f"amplitudes [N] expected, got {list(means.shape)}, {list(quats.shape)}, "
                              f"{list(scales.shape)}, {list(amplitudes.shape)}")
        if (scales <= 0).any() or (amplitudes <= 0).any():
            raise CryogsError("Gaussian scales and amplitudes must be positive")
        self.means = nn.Parameter(means.clone())
        self.quats = nn.Parameter(quats / quats.norm(dim=-1, keepdim=True))
        self.log_scales = nn.Parameter(scales.log())
        self.log_amplitudes = nn.Parameter(amplitudes.log())

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    @property
    def amplitudes(self) -> torch.Tensor:
        return self.log_amplitudes.exp()

    def forward(self):
        """``(means, quats, scales, amplitudes)`` ready for :func:`cryogs.project`."""
        return self.means, self.quats, self.scales, self.amplitudes

    def arrays(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            q = self.quats / self.quats.norm(dim=-1, keepdim=True)
            return {"means": self.means.cpu().numpy(), "quats": q.cpu().numpy(),
                    "scales": self.scales.cpu().numpy(), "amplitudes": self.amplitudes.cpu().numpy()}

    # ------------------------------------------------------------------ initialisation
    @classmethod
    def random(cls, n: int, radius: float, scale: float, total_mass: float, *, seed: int = 0) -> GaussianModel:
        """``n`` isotropic Gaussians uniform inside a sphere of ``radius`` Å, sharing ``total_mass``."""
        if n <= 0:
            raise CryogsError(f"the number of Gaussians must be positive, got {n}")
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(n, 3, generator=g)
        direction /= direction.norm(dim=-1, keepdim=True)
        r = radius * torch.rand(n, 1, generator=g) ** (1 / 3)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1
        return cls(direction * r, quats, torch.full((n, 3), scale), torch.full((n,), total_mass / n))

    @classmethod
    def from_arrays(cls, arrays: dict) -> GaussianModel:
        return cls(arrays["means"], arrays["quats"], arrays["scales"], arrays["amplitudes"])

    @classmethod
    def from_atoms(cls, atoms: AtomSet, *, per: str = "atom", min_sigma: float = 0.0) -> GaussianModel:
        """One Gaussian per atom (isotropic, ``σ² = B/8π² + min_sigma²``) or per residue.

        A residue's Gaussian has the mass-weighted centre and covariance of its atoms (each atom
        counted with its own σ²), and the summed mass, so it is the best single-Gaussian fit.
        """
        sig2 = atoms.sigma ** 2 + min_sigma ** 2
        if per == "atom":
            quats = np.tile([1.0, 0.0, 0.0, 0.0], (len(atoms.mass), 1))
            s = np.sqrt(sig2)[:, None].repeat(3, 1)
            return cls(atoms.xyz, quats, s, atoms.mass)
        if per != "residue":
            raise CryogsError(f"per must be 'atom' or 'residue', got {per!r}")
        groups = np.unique(atoms.residue)
        means, covs, mass = [], [], []
        for r in groups:
            sel = atoms.residue == r
            m = atoms.mass[sel]
            mu = (atoms.xyz[sel] * m[:, None]).sum(0) / m.sum()
            d = atoms.xyz[sel] - mu
            cov = (m[:, None, None] * (d[:, :, None] * d[:, None, :] + sig2[sel, None, None] * np.eye(3))).sum(0)
            means.append(mu)
            covs.append(cov / m.sum())
            mass.append(m.sum())
        evals, evecs = np.linalg.eigh(np.stack(covs))
        evecs *= np.sign(np.linalg.det(evecs))[:, None, None]  # proper rotations
        return cls(np.stack(means), matrix_to_quat(torch.from_numpy(evecs)).numpy(),
                   np.sqrt(np.clip(evals, 1e-6, None)), np.asarray(mass))

    @classmethod
    def from_map(cls, volume: np.ndarray, pixel_size: float, n: int, *, scale: float | None = None,
                 seed: int = 0) -> GaussianModel:
        """``n`` isotropic Gaussians placed on a ``V[z,y,x]`` map: at its highest local maxima, and,
        when it has fewer than ``n`` of them, at voxels drawn with probability ∝ its positive density.

        A map at 3 Å has far fewer maxima than the Gaussians it takes to fit it (314 for a
        1,775-Gaussian ADK model); the drawn voxels fill the rest where the mass is, jittered within
        their voxel so no two coincide. ``volume`` is mass per voxel on the cryogs grid (centre at
        D//2), smoothed by ``scale`` (default one voxel), which is also every Gaussian's σ. Each
        amplitude follows the smoothed map's height at its centre; all are then rescaled so the
        model's mass equals the map's positive mass.
        """
        from scipy.ndimage import gaussian_filter, maximum_filter

        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise CryogsError(f"the map must be a cube, got shape {volume.shape}")
        if n <= 0:
            raise CryogsError(f"the number of Gaussians must be positive, got {n}")
        sigma_vox = 1.0 if scale is None else scale / pixel_size
        smooth = gaussian_filter(volume.astype(np.float64), sigma_vox)
        positive = np.clip(smooth, 0, None)
        if not positive.any():
            raise CryogsError("the map has no positive density to place Gaussians on")
        peaks = (smooth == maximum_filter(smooth, size=3)) & (smooth > 0)
        highest = np.flatnonzero(peaks)[np.argsort(-smooth[peaks])[:n]]  # flat indices, C order like smooth[peaks]
        rng = np.random.default_rng(seed)
        drawn = rng.choice(positive.size, n - len(highest), p=(positive / positive.sum()).ravel())
        index = np.concatenate([highest, drawn])
        heights = positive.ravel()[index]
        zyx = np.stack(np.unravel_index(index, smooth.shape), 1).astype(np.float64)
        zyx[len(highest):] += rng.uniform(-0.5, 0.5, (len(drawn), 3))
        c = volume.shape[0] // 2
        means = (zyx[:, ::-1] - c) * pixel_size
        amps = heights * (2 * math.pi) ** 1.5 * sigma_vox ** 3
        amps *= np.clip(volume, 0, None).sum() / amps.sum()
        quats = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))
        return cls(means, quats, np.full((n, 3), sigma_vox * pixel_size), amps)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write ``.npz`` or ``.pt`` (documented above) atomically, or ``.ply`` for splat viewers."""
        path = Path(path)
        if path.suffix not in (".npz", ".pt", ".ply"):
            raise CryogsError(f"{path}: unknown Gaussian file type (use .npz, .pt or .ply)")
        with atomic_path(path) as tmp:
            if path.suffix == ".npz":
                with open(tmp, "wb") as fh:
                    np.savez(fh, format=FORMAT, **self.arrays())
            elif path.suffix == ".pt":
                torch.save({"format": FORMAT, **{k: torch.from_numpy(v) for k, v in self.arrays().items()}}, tmp)
            else:
                _write_ply(tmp, self.arrays())

    @classmethod
    def load(cls, path) -> GaussianModel:
        path = Path(path)
        if not path.exists():
            raise CryogsError(f"{path}: no such Gaussian model file")
        if path.suffix == ".npz":
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.suffix == ".pt":
            arrays = {k: (v.numpy() if torch.is_tensor(v) else v)
                      for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
        else:
            raise CryogsError(f"{path}: load Gaussian models from .npz or .pt files")
        if str(arrays.get("format")) != FORMAT:
            raise CryogsError(f"{path}: not a cryogs Gaussian file (format {arrays.get('format')!r})")
        return cls.from_arrays(arrays)


def _write_ply(path, arrays) -> None:
    n = len(arrays["amplitudes"])
    fields = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
              + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])
    rel = arrays["amplitudes"] / arrays["amplitudes"].max()
    opacity = np.clip(rel, 1e-4, 1 - 1e-4)
    grey = (0.2 + 0.8 * rel - 0.5) / 0.28209479177387814  # degree-0 spherical harmonic of the colour
    cols = np.zeros((n, len(fields)), np.float32)
    cols[:, 0:3] = arrays["means"]
    cols[:, 6:9] = grey[:, None]
    cols[:, 9] = np.log(opacity / (1 - opacity))
    cols[:, 10:13] = np.log(arrays["scales"])
    cols[:, 13:17] = arrays["quats"]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {f}" for f in fields] + ["end_header"]
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(cols.astype("<f4").tobytes())
