"""What determines a fit: :class:`TrainConfig`, and the defaults derived from the data."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch

from cryogs.errors import CryogsError
from cryogs.io.particles import ParticleSet
from cryogs.physics.ctf import particle_ctf


@dataclass
class TrainConfig:
    """Everything that determines a run; saved as ``config.json`` and in each checkpoint."""

    n_gaussians: int
    epochs: int
    init_radius: float  # Å: random initial centres lie inside this sphere
    init_scale: float  # Å: initial isotropic standard deviation
    total_mass: float  # initial summed amplitude, estimated from the images
    batch_size: int = 32  # images per step (the global batch, over all processes)
    lr_means: float = 0.0  # Å per step at the start; 0 means "0.5 pixel"
    lr_scales: float = 0.02  # log-scale per step
    lr_quats: float = 0.02
    lr_amplitudes: float = 0.03  # log-amplitude per step
    final_lr_fraction: float = 0.02  # learning rates decay exponentially to this fraction
    min_scale: float = 0.0  # Å; 0 means "0.5 pixel"
    max_scale: float = 0.0  # Å; 0 means "3 pixels"
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    init: str = "random"  # how the initial model was made: random, map PATH or pdb PATH (for the record)
    densify: bool = False  # adaptive density control (cryogs.model.densify); off: it tied on the quality benchmark
    max_gaussians: int = 0  # cap on N under density control; 0 means "2 × n_gaussians"
    noise: str = "white"  # white: plain squared error; coloured: whitened by the solvent noise spectrum
    contrast: bool = False  # solve a per-image contrast scale in closed form every step
    reg_repulsion: float = 0.0  # weight of the minimum-distance prior between centres
    reg_min_distance: float = 0.0  # Å; 0 means "1 pixel"
    reg_scale: float = 0.0  # weight of the soft scale-bound prior (bounds: min_scale, max_scale)
    reg_tv: float = 0.0  # weight of total variation of the voxelized map
    reg_smooth: float = 0.0  # weight of the squared-gradient smoothness of the voxelized map
    refine_poses: bool = False  # refine every particle's rotation and shift with the Gaussians
    refine_start: float = 0.5  # fraction of the epochs before pose refinement starts
    early_stop: bool = True  # stop once the held-out loss stops falling (cryogs.reconstruct.convergence)
    lr_rotation: float = 0.5  # degrees per step for pose refinement at the start
    lr_shift: float = 0.0  # Å per step for pose refinement at the start; 0 means "0.2 pixel"
    pose_steps: int = 8  # pose steps per batch while refining (the last one joint with the Gaussians)
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (one is also written every epoch)
    coarse: float = 0.0  # fraction of the steps fitted to images Fourier-cropped to half the box

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


#: Images :func:`estimate_extent` averages (all, up to this many), in chunks of EXTENT_CHUNK.
EXTENT_SAMPLE, EXTENT_CHUNK = 1024, 256


def estimate_extent(particles: ParticleSet, n_sample: int = EXTENT_SAMPLE, seed: int = 0) -> tuple[float, float]:
    """``(radius Å, total mass)`` of the particle from a sample of images.

    The mean of randomly oriented projections is nearly round. It is estimated by least squares over
    the sample, ``P̂(k) = Σ CTF_i·Î_i(k) / Σ CTF_i(k)²``: the images' defoci differ, so their zeros
    do not coincide and every frequency is recovered, the zero one (where the CTF is only the
    amplitude contrast) included. A per-image Wiener filter cannot do this: it damps the low
    frequencies ~10× against the rest and leaves a ring of negative density that halves the radius.
    Frequencies every sampled CTF nearly nulls (one shared defocus) are dropped. The mass is the
    estimate's zero frequency; the radius holding 95 % of its mass above the rim's level, enlarged by
    10 %, bounds the particle.

    The sample is every image up to ``n_sample`` (a seeded random choice beyond): at SNR 0.01 the
    radius from 256 of 1,000 images varied by 15 % with the choice (28–33 Å for adenylate kinase,
    so the default Gaussian count, ∝ radius³, by 50 %), from all 1,000 by 3 % (28.4–29.2 Å; 28.5–29.5
    at SNR 1).
    """
    rng = np.random.default_rng(seed)
    n = len(particles)
    idx = np.arange(n) if n <= n_sample else np.sort(rng.choice(n, size=n_sample, replace=False))
    D, p = particles.box_size, particles.pixel_size
    numerator = torch.zeros((D, D // 2 + 1), dtype=torch.complex128)
    weight = torch.zeros((D, D // 2 + 1), dtype=torch.float64)
    for chunk in np.array_split(idx, max(1, -(-len(idx) // EXTENT_CHUNK))):
        spectrum = torch.fft.rfft2(torch.from_numpy(particles.images(chunk)).double())
        ctf = particle_ctf(particles, chunk)
        if ctf is None:
            numerator += spectrum.sum(0)
            weight += len(chunk)
        else:
            ctf = ctf.double()
            numerator += (spectrum * ctf).sum(0)
            weight += (ctf * ctf).sum(0)
    kept = weight > 1e-3 * weight.max()
    spectrum = torch.where(kept, numerator / weight.clamp_min(1e-30), 0)
    mean = torch.fft.irfft2(spectrum, s=(D, D)).numpy()
    total = float(mean.sum())
    if not total > 0:
        raise CryogsError("the particles have no positive mass on average: is the contrast inverted? (try --invert)")
    yy, xx = np.indices(mean.shape) - D // 2
    r = np.hypot(xx, yy).ravel()
    # the zero frequency is the noisiest (CTF(0) is the amplitude contrast); its error is a constant
    # offset that would move the 95 % point far out: take the level of the rim (≥ 0.45 D) as background
    profile = mean.ravel() - np.median(mean.ravel()[(r >= 0.45 * D) & (r <= 0.5 * D)])
    inside = r <= 0.5 * D
    r, profile = r[inside], profile[inside]
    order = np.argsort(r)
    cum = np.cumsum(profile[order])
    r95 = r[order][min(len(r) - 1, np.searchsorted(cum, 0.95 * cum[-1]))]
    radius = float(np.clip(1.1 * r95, 0.15 * D, 0.45 * D)) * p
    return radius, total


def default_mask_radius(particles: ParticleSet) -> float:
    """Radius (Å) of the automatic soft mask of every FSC of a run on these particles: the particle
    radius estimated from the images plus 4 pixels, inside the box. ``reconstruct`` and
    ``backproject`` both use it, for the half-map FSC and the FSC against a reference alike."""
    p = particles.pixel_size
    return min(estimate_extent(particles)[0] + 4 * p, 0.5 * particles.box_size * p - 2 * p)


#: Bytes a fit needs at least per Gaussian: its 11 float32 parameters, their gradients and Adam's two moments.
BYTES_PER_GAUSSIAN = 11 * 4 * 4
#: ... and per Gaussian and image of a batch: its projection (2D mean, conic, weight, radii) and their gradients.
BYTES_PER_PROJECTION = 8 * 4 * 2


def check_memory(config: TrainConfig) -> None:
    """Refuse a model that cannot fit in the device's memory, from a lower bound on what the fit needs
    (the largest N it may reach), before anything is allocated."""
    n = max(config.n_gaussians, (config.max_gaussians or 2 * config.n_gaussians) if config.densify else 0)
    need = n * (BYTES_PER_GAUSSIAN + config.batch_size * BYTES_PER_PROJECTION)
    device = torch.device(config.device)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device.index or 0).total_memory
    else:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise CryogsError(f"{n:,} Gaussians with batches of {config.batch_size} images need at least "
                          f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of {device}; "
                          "use fewer (--gaussians, --max-gaussians) or a smaller --batch-size")


def default_config(particles: ParticleSet, *, images_per_model: int | None = None, **overrides) -> TrainConfig:
    """A configuration that works without tuning, derived from box, pixel size and particle count.

    The epoch count gives each model about 20,000 image visits (at least 4 epochs, at most 40);
    ``images_per_model`` is how many particles one model trains on when that is not all of them
    (half of them for gold-standard half maps).
    """
    radius, mass = estimate_extent(particles)
    p = particles.pixel_size
    volume = 4 / 3 * math.pi * radius ** 3
    n_gaussians = int(np.clip(round(0.5 * volume / (2 * p) ** 3), 50, 20000))
    epochs = int(np.clip(math.ceil(20000 / (images_per_model or len(particles))), 4, 40))
    cfg = TrainConfig(n_gaussians=n_gaussians, epochs=epochs, init_radius=0.8 * radius,
                      init_scale=1.5 * p, total_mass=mass)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg
