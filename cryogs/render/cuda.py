"""The ``cuda`` backend: autograd Functions over the hand-written kernels of ``cryogs.render._C``.

Pipeline of :func:`project_cuda` (see ``csrc/`` and the design note):

1. ``preprocess_fwd``: one thread per (image, Gaussian) pair computes the 2D centre, conic, weight,
   radii and the number of tiles the pair covers.
2. The per-image instance totals are read back, the one host synchronisation of a forward (it
   sizes the binning buffers, so CUDA-graph capture would need an upper bound instead); images are
   grouped into sub-batches of at most ``max_instances`` instances (an image alone over the budget
   gets a sub-batch of its own). Images are independent, so the split is exact, and the forward is
   bitwise identical with or without it.
3. Per sub-batch: ``bin_instances`` (int64 scan, duplicate, CUB radix sort over only the key bits in
   use, tile ranges), given the sub-batch's instance count rather than reading it back again, and
   ``rasterize_fwd`` writing straight into the output slice.
4. Backward: ``rasterize_bwd`` (stage A, reusing the forward's binning when there was one sub-batch,
   binning again with the saved counts otherwise: no host synchronisation)
   into per-pair 2D gradients, then ``preprocess_bwd`` (stage B: per-Gaussian and per-image
   reductions, no global atomics, each only if its parameters need gradients).

The kernels compute in float32; inputs of other floating dtypes are cast (differentiably) and the
result is returned in the dtype of ``means``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cryogs.errors import CryogsError

from . import _extension
from .binning import tiles_per_side
from .gaussian_math import covariance_3d
from .reference import voxelize_splat

#: Default instance budget of one sub-batch. An instance costs 16 bytes (key and value, double
#: buffered for the sort) plus the sort's scratch: 2^27 instances is about 2.2 GB.
MAX_INSTANCES = 1 << 27

#: The ops module the backend runs on; None means the compiled ``cryogs.render._C``. The tests marked
#: ``emulated`` set it to ``cryogs_emu`` (tests/emu_build.py): the same kernels and host wrappers
#: built to run on CPU threads, whose tensors are CPU tensors (its ``DEVICE_TYPE``).
ops = None

#: Statistics of the last :func:`project_cuda` forward: total ``instances`` and number of ``batches``.
last_stats: dict = {"instances": 0, "batches": 0}


def plan_batches(per_image: list[int], max_instances: int, max_images: int) -> list[tuple[int, int]]:
    """Consecutive image ranges ``[(b0, b1), ...]`` holding at most ``max_instances`` instances each
    (a single image above the budget forms its own range) and at most ``max_images`` images."""
    batches: list[tuple[int, int]] = []
    start, total = 0, 0
    for b, count in enumerate(per_image):
        if b > start and (total + count > max_instances or b - start >= max_images):
            batches.append((start, b))
            start, total = b, 0
        total += count
    if len(per_image) > start:
        batches.append((start, len(per_image)))
    return batches


def _ops():
    return _extension.module() if ops is None else ops


class _ProjectCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, amplitudes, rotations, shifts, box_size: int, pixel_size: float,
                cutoff: float, max_instances: int):
        C = _ops()
        means2d, conics, weights, radii, counts = C.preprocess_fwd(means, quats, scales, amplitudes, rotations, shifts,
                                                                   box_size, pixel_size, cutoff)
        B = rotations.shape[0]
        T = tiles_per_side(box_size, C.TILE_SIZE) ** 2
        per_image = counts.sum(1, dtype=torch.int64).tolist() if B else []  # the host read-back
        batches = [(b0, b1, sum(per_image[b0:b1]))
                   for b0, b1 in plan_batches(per_image, max_instances, max(1, (2 ** 31 - 1) // T))]
        last_stats.update(instances=int(sum(per_image)), batches=len(batches))
        out = means.new_empty(B, box_size, box_size)
        saved_bins = None
        for b0, b1, M in batches:
            ranges, _keys, gids = C.bin_instances(means2d[b0:b1], radii[b0:b1], counts[b0:b1], box_size, M)
            del _keys
            C.rasterize_fwd(means2d[b0:b1], conics[b0:b1], weights[b0:b1], ranges, gids, box_size, cutoff,
                            out[b0:b1])
            if len(batches) == 1:
                saved_bins = (ranges, gids)
        ctx.save_for_backward(means, quats, scales, amplitudes, rotations, means2d, conics, weights, radii, counts)
        ctx.geometry = (box_size, pixel_size, cutoff)
        ctx.batches = batches
        ctx.bins = saved_bins
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, v_out):
        C = _ops()
        means, quats, scales, amplitudes, rotations, means2d, conics, weights, radii, counts = ctx.saved_tensors
        box_size, pixel_size, cutoff = ctx.geometry
        v_out = v_out.contiguous().float()
        v_means2d = torch.zeros_like(means2d)
        v_conics = torch.zeros_like(conics)
        v_weights = torch.zeros_like(weights)
        for b0, b1, M in ctx.batches:
            if ctx.bins is not None:
                ranges, gids = ctx.bins
            else:
                ranges, _keys, gids = C.bin_instances(means2d[b0:b1], radii[b0:b1], counts[b0:b1], box_size, M)
                del _keys
            C.rasterize_bwd(means2d[b0:b1], conics[b0:b1], weights[b0:b1], radii[b0:b1], ranges, gids,
                            v_out[b0:b1], box_size, cutoff, v_means2d[b0:b1], v_conics[b0:b1], v_weights[b0:b1])
        ctx.bins = None
        need = ctx.needs_input_grad
        pose, gauss = bool(need[4] or need[5]), any(need[:4])
        v_means, v_quats, v_scales, v_amps, v_rot, v_shifts = C.preprocess_bwd(
            means, quats, scales, amplitudes, rotations, v_means2d, v_conics, v_weights, pixel_size, pose, gauss)
        return (v_means if need[0] else None, v_quats if need[1] else None, v_scales if need[2] else None,
                v_amps if need[3] else None, v_rot if need[4] else None, v_shifts if need[5] else None,
                None, None, None, None)


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def _check_floating(**tensors):
    device = "cuda" if ops is None else ops.DEVICE_TYPE
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CryogsError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device.type != device:
            raise CryogsError(f"the cuda backend needs {device.upper()} tensors; {name} is on {t.device}")


def project_cuda(means, quats, scales, amplitudes, rotations, shifts, *, box_size: int, pixel_size: float,
                 cutoff: float, max_instances: int | None = None):
    """``[B, D, D]`` projections with the CUDA kernels; differentiable w.r.t. every tensor argument.

    ``shifts`` may be None (no shift). ``max_instances`` (default :data:`MAX_INSTANCES`) is the
    instance budget of one sub-batch of images; smaller budgets only cost speed.
    """
    B = rotations.shape[0]
    named = dict(means=means, quats=quats, scales=scales, amplitudes=amplitudes, rotations=rotations)
    if shifts is not None:
        named["shifts"] = shifts
    _check_floating(**named)
    if shifts is None:
        shifts = torch.zeros(B, 2, device=rotations.device, dtype=torch.float32)
    budget = MAX_INSTANCES if max_instances is None else int(max_instances)
    if budget < 1:
        raise CryogsError(f"max_instances must be positive, got {budget}")
    out = _ProjectCUDA.apply(_as_f32(means), _as_f32(quats), _as_f32(scales), _as_f32(amplitudes),
                             _as_f32(rotations), _as_f32(shifts), int(box_size), float(pixel_size), float(cutoff),
                             budget)
    return out if means.dtype == torch.float32 else out.to(means.dtype)


def voxelize_cuda(means, quats, scales, amplitudes, *, box_size: int, pixel_size: float, cutoff: float):
    """``[D, D, D]`` map ``V[z, y, x]`` (mass per voxel) with the CUDA voxelizer (forward only).

    When gradients are needed it falls back to :func:`cryogs.render.reference.voxelize_splat`, the same maths
    in PyTorch, so autograd works.
    """
    tensors = (means, quats, scales, amplitudes)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return voxelize_splat(means, covariance_3d(quats, scales), amplitudes, box_size=box_size,
                              pixel_size=pixel_size, cutoff=cutoff)
    _check_floating(means=means, quats=quats, scales=scales, amplitudes=amplitudes)
    C = _ops()
    vol = C.voxelize_fwd(_as_f32(means), _as_f32(quats), _as_f32(scales), _as_f32(amplitudes), int(box_size),
                         float(pixel_size), float(cutoff))
    return vol if means.dtype == torch.float32 else vol.to(means.dtype)
