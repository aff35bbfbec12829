"""The ``cpu`` backend: an autograd Function over the OpenMP ops of ``cryogs.render._C``.

The ops (``csrc/project_cpu.cpp``, ``csrc/voxelize_cpu.cpp``) run the per-Gaussian maths of
``csrc/gaussian_math.cuh``, the functions the CUDA kernels call:

1. ``cpu_project_fwd``: per (image, Gaussian) pair the 2D centre, conic, weight and pixel box of the
   cutoff ellipse; then per (image, slab of rows) the pairs added in ascending Gaussian order (the
   CUDA rasterizer's order), with a vectorised loop over each box row.
2. ``cpu_project_bwd``: per pair the moments of dL/dI over its box → 2D gradients; then per Gaussian
   (over images) and per image (over Gaussians) the same reductions as the CUDA stage-B kernels,
   each only if its parameters need gradients. No atomics; bitwise deterministic.

It computes in float64 for float64 inputs (exact tests) and in float32 otherwise (other dtypes are
cast differentiably); the result has the dtype of ``means``. Memory is O(B·N) for the pairs plus
the images, so there is no sub-batching.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cryogs.errors import CryogsError

from . import _extension
from .gaussian_math import covariance_3d
from .reference import voxelize_splat


def _ops():
    return _extension.module()


class _ProjectCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, amplitudes, rotations, shifts, box_size: int, pixel_size: float,
                cutoff: float):
        images, means2d, conics, weights, rects = _ops().cpu_project_fwd(
            means, quats, scales, amplitudes, rotations, shifts, box_size, pixel_size, cutoff)
        ctx.save_for_backward(means, quats, scales, amplitudes, rotations, means2d, conics, weights, rects)
        ctx.geometry = (box_size, pixel_size, cutoff)
        return images

    @staticmethod
    @once_differentiable
    def backward(ctx, v_images):
        means, quats, scales, amplitudes, rotations, means2d, conics, weights, rects = ctx.saved_tensors
        box_size, pixel_size, cutoff = ctx.geometry
        need = ctx.needs_input_grad
        pose, gauss = bool(need[4] or need[5]), any(need[:4])
        v_means, v_quats, v_scales, v_amps, v_rot, v_shifts = _ops().cpu_project_bwd(
            means, quats, scales, amplitudes, rotations, means2d, conics, weights, rects,
            v_images.to(means.dtype).contiguous(), box_size, pixel_size, cutoff, pose, gauss)
        return (v_means if need[0] else None, v_quats if need[1] else None, v_scales if need[2] else None,
                v_amps if need[3] else None, v_rot if need[4] else None, v_shifts if need[5] else None,
                None, None, None)


def _compute_dtype(means: torch.Tensor) -> torch.dtype:
    return torch.float64 if means.dtype == torch.float64 else torch.float32


def _check(**tensors):
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CryogsError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device.type != "cpu":
            raise CryogsError(f"the cpu backend needs CPU tensors; {name} is on {t.device}")


def project_cpu(means, quats, scales, amplitudes, rotations, shifts, *, box_size: int, pixel_size: float,
                cutoff: float):
    """``[B, D, D]`` projections with the CPU ops; differentiable w.r.t. every tensor argument.

    ``shifts`` may be None (no shift). Same signature and semantics as
    :func:`cryogs.render.cuda.project_cuda` (without its sub-batching budget).
    """
    named = {"means": means, "quats": quats, "scales": scales, "amplitudes": amplitudes, "rotations": rotations}
    if shifts is not None:
        named["shifts"] = shifts
    _check(**named)
    dtype = _compute_dtype(means)
    if shifts is None:
        shifts = torch.zeros(rotations.shape[0], 2, dtype=dtype)

    def cast(t):
        return t.to(dtype).contiguous()

    out = _ProjectCPU.apply(cast(means), cast(quats), cast(scales), cast(amplitudes), cast(rotations), cast(shifts),
                            int(box_size), float(pixel_size), float(cutoff))
    return out if out.dtype == means.dtype else out.to(means.dtype)


def voxelize_cpu(means, quats, scales, amplitudes, *, box_size: int, pixel_size: float, cutoff: float):
    """``[D, D, D]`` map ``V[z, y, x]`` (mass per voxel) with the CPU voxelizer (forward only).

    When gradients are needed it falls back to :func:`cryogs.render.reference.voxelize_splat`, the same
    maths in PyTorch, so autograd works.
    """
    tensors = (means, quats, scales, amplitudes)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return voxelize_splat(means, covariance_3d(quats, scales), amplitudes, box_size=box_size,
                              pixel_size=pixel_size, cutoff=cutoff)
    _check(means=means, quats=quats, scales=scales, amplitudes=amplitudes)
    dtype = _compute_dtype(means)
    vol = _ops().cpu_voxelize_fwd(*(t.to(dtype).contiguous() for t in tensors), int(box_size), float(pixel_size),
                                  float(cutoff))
    return vol if vol.dtype == means.dtype else vol.to(means.dtype)
