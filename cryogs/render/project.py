"""Public forward model: :func:`project` (Γ without CTF) and :func:`voxelize`."""
from __future__ import annotations

import torch

from cryogs.errors import CryogsError

from . import _extension
from .gaussian_math import CUTOFF_SIGMA, covariance_3d, preprocess
from .reference import rasterize_dense, rasterize_splat, voxelize_splat

BACKENDS = ("auto", "cuda", "cpu", "torch", "dense")


def _check_inputs(means, quats, scales, amplitudes, box_size, pixel_size):
    if not (isinstance(box_size, int) and box_size > 0):
        raise CryogsError(f"box_size must be a positive integer, got {box_size!r}")
    if not pixel_size > 0:
        raise CryogsError(f"pixel_size must be positive, got {pixel_size!r} Å")
    n = means.shape[0]
    shapes = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
              "amplitudes": (amplitudes, (n,))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise CryogsError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``: ``auto`` picks ``cuda`` for CUDA tensors and
    ``cpu`` for CPU tensors when the extension holds those ops, else ``torch``."""
    if backend not in BACKENDS:
        raise CryogsError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and _extension.available():
            return "cuda"
        if device.type == "cpu" and _extension.cpu_available():
            return "cpu"
        return "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise CryogsError("backend 'cuda' needs CUDA tensors (use --device cuda)")
        if not _extension.available():
            raise CryogsError(f"backend 'cuda' is unavailable: CUDA extension {_extension.status()}")
    if backend == "cpu":
        if device.type != "cpu":
            raise CryogsError("backend 'cpu' needs CPU tensors (use --device cpu)")
        if not _extension.cpu_available():
            raise CryogsError(f"backend 'cpu' is unavailable: its extension ops are {_extension.cpu_status()}")
    return backend


def project(means, quats, scales, amplitudes, rotations, shifts=None, *, box_size: int, pixel_size: float,
            backend: str = "auto", cutoff: float | None = None):
    """Γ: ``[B, D, D]`` projections ``I[b, y, x]`` of N Gaussians in B poses (mass per pixel).

    Args:
        means: ``[N, 3]`` centres (x, y, z) in Å.
        quats: ``[N, 4]`` rotations (w, x, y, z); normalised internally.
        scales: ``[N, 3]`` standard deviations along the principal axes, in Å (already activated).
        amplitudes: ``[N]`` integrated mass of each Gaussian.
        rotations: ``[B, 3, 3]`` RELION matrices ``A`` (map → image).
        shifts: ``[B, 2]`` RELION origins (x, y) in Å, or ``None``.
        box_size: image side D in pixels.
        pixel_size: Å per pixel.
        backend: ``auto`` (``cuda`` for CUDA tensors when the extension has the CUDA ops, ``cpu`` for
            CPU tensors when it has the CPU ops, else ``torch``), ``cuda``, ``cpu`` (the OpenMP
            kernels), ``torch`` (splat) or ``dense`` (exact line integral).
        cutoff: truncation in standard deviations. Defaults to :data:`CUTOFF_SIGMA` for ``torch``,
            ``cuda`` and ``cpu`` and to no truncation (exact) for ``dense``.

    Differentiable with respect to every tensor argument, pose included.
    """
    _check_inputs(means, quats, scales, amplitudes, box_size, pixel_size)
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise CryogsError(f"rotations must have shape [B, 3, 3], got {list(rotations.shape)}")
    if shifts is not None and tuple(shifts.shape) != (rotations.shape[0], 2):
        raise CryogsError(f"shifts must have shape [{rotations.shape[0]}, 2], got {list(shifts.shape)}")
    backend = resolve_backend(backend, means.device)
    if backend == "cuda":
        from .cuda import project_cuda

        return project_cuda(means, quats, scales, amplitudes, rotations, shifts, box_size=box_size,
                            pixel_size=pixel_size, cutoff=CUTOFF_SIGMA if cutoff is None else cutoff)
    if backend == "cpu":
        from .cpu import project_cpu

        return project_cpu(means, quats, scales, amplitudes, rotations, shifts, box_size=box_size,
                           pixel_size=pixel_size, cutoff=CUTOFF_SIGMA if cutoff is None else cutoff)
    k = cutoff if cutoff is not None else (None if backend == "dense" else CUTOFF_SIGMA)
    means2d, conics, weights, radii = preprocess(
        means, quats, scales, amplitudes, rotations, shifts, box_size=box_size, pixel_size=pixel_size,
        cutoff=k if k is not None else CUTOFF_SIGMA)
    if backend == "dense":
        return rasterize_dense(means2d, conics, weights, radii, box_size=box_size, cutoff=k)
    return rasterize_splat(means2d, conics, weights, radii, box_size=box_size, cutoff=k)


def voxelize(means, quats, scales, amplitudes, *, box_size: int, pixel_size: float, backend: str = "auto",
             cutoff: float = CUTOFF_SIGMA):
    """``[D, D, D]`` map ``V[z, y, x]`` (mass per voxel) of the Gaussian mixture on the cryogs grid.

    ``backend`` as for :func:`project` (``dense`` means ``torch`` here); ``cuda`` and ``cpu`` are
    forward-only and fall back to the torch voxelizer when gradients are needed.
    """
    _check_inputs(means, quats, scales, amplitudes, box_size, pixel_size)
    backend = resolve_backend("torch" if backend == "dense" else backend, means.device)
    if backend == "cuda":
        from .cuda import voxelize_cuda

        return voxelize_cuda(means, quats, scales, amplitudes, box_size=box_size, pixel_size=pixel_size,
                             cutoff=cutoff)
    if backend == "cpu":
        from .cpu import voxelize_cpu

        return voxelize_cpu(means, quats, scales, amplitudes, box_size=box_size, pixel_size=pixel_size,
                            cutoff=cutoff)
    return voxelize_splat(means, covariance_3d(quats, scales), amplitudes, box_size=box_size,
                          pixel_size=pixel_size, cutoff=cutoff)
