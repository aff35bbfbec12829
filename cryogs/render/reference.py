"""Pure-PyTorch rasterizers: the specification the CUDA kernels are tested against.

Each function mirrors one CUDA op (``csrc/``) with the same signature:

* :func:`rasterize_dense` evaluates every (pixel, Gaussian) pair; with ``cutoff=None`` it is the
  exact line integral, and it runs in float64. It does not bin, so it checks binning independently.
* :func:`rasterize_splat` evaluates each pair only inside the box around its cutoff ellipse and
  scatter-adds; it is the fast PyTorch backend.
* :func:`voxelize_splat` is the 3D counterpart used by :func:`cryogs.voxelize`.

Memory stays bounded: work is cut into chunks of at most ``max_elements`` evaluations, and when
gradients are needed and more than one chunk is required, each chunk is checkpointed (recomputed
in the backward pass) so activations are not kept for the whole batch.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from cryogs.physics.conventions import centre_index

from .gaussian_math import conic_quadratic

#: Evaluations per chunk (the largest temporary has this many elements).
MAX_ELEMENTS = 1 << 24


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _run_chunks(fn, chunks, args, grad: bool, window_dims: int, max_elements: int):
    """Sum ``fn(*args, chunk)`` over ``(half_width, indices)`` chunks; when gradients are needed and the
    chunks together hold more than ``max_elements`` samples, each is checkpointed."""
    total = None
    samples = sum(len(idx) * (2 * r + 1) ** window_dims for r, idx in chunks)
    ckpt = grad and samples > max_elements
    for chunk in chunks:
        part = checkpoint(fn, *args, chunk, use_reentrant=False) if ckpt else fn(*args, chunk)
        total = part if total is None else total + part
    return total


def rasterize_dense(means2d, conics, weights, radii, *, box_size: int, cutoff: float | None = None,
                    max_elements: int = MAX_ELEMENTS):
    """``[B, D, D]`` images ``Σ_g w exp(-q/2)`` evaluated at every pixel centre.

    ``radii`` is accepted for signature parity and ignored: the dense reference does not bin.
    """
    del radii
    B, N = weights.shape
    D = box_size
    out_dtype = weights.dtype
    if N == 0 or B == 0:
        return weights.new_zeros(B, D, D)
    coords = torch.arange(D, device=weights.device, dtype=out_dtype)
    per_image = max(1, max_elements // (D * D))
    g_chunk = min(N, per_image)
    b_chunk = max(1, min(B, per_image // g_chunk))
    grad = _needs_grad(means2d, conics, weights)

    def image_chunk(m2, cn, w, bounds):
        b0, b1 = bounds
        acc = w.new_zeros(b1 - b0, D, D)
        for g0 in range(0, N, g_chunk):
            u = m2[b0:b1, g0:g0 + g_chunk]
            dx = coords[None, None, None, :] - u[..., 0, None, None]
            dy = coords[None, None, :, None] - u[..., 1, None, None]
            q = conic_quadratic(cn[b0:b1, g0:g0 + g_chunk, None, None, :], dx, dy)
            val = w[b0:b1, g0:g0 + g_chunk, None, None] * torch.exp(-0.5 * q)
            if cutoff is not None:
                val = torch.where(q <= cutoff * cutoff, val, torch.zeros_like(val))
            acc = acc + val.sum(1)
        return acc

    parts = []
    for b0 in range(0, B, b_chunk):
        bounds = (b0, min(B, b0 + b_chunk))
        n_inner = math.ceil(N / g_chunk)
        if grad and (n_inner > 1 or B > b_chunk):
            parts.append(checkpoint(image_chunk, means2d, conics, weights, bounds, use_reentrant=False))
        else:
            parts.append(image_chunk(means2d, conics, weights, bounds))
    return torch.cat(parts, 0)


#: Window half-widths (px) the splat evaluates; each pair uses the smallest that covers it, so there
#: are few groups (few Python-level launches) and at most ~1.5× wasted samples per axis.
_HALF_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


def _window_groups(radius: torch.Tensor, window_dims: int, max_elements: int, limit: int):
    """Group pair indices by window half-width (≥ ``radius``, ≤ ``limit``), cut so that a chunk has
    at most ``max_elements`` samples. Returns ``[(half_width, indices)]``."""
    ladder = torch.tensor([h for h in _HALF_WIDTHS if h < limit] + [limit], device=radius.device)
    half = ladder[torch.searchsorted(ladder, radius.clamp(max=limit).to(ladder.dtype))]
    chunks = []
    for r in torch.unique(half).tolist():
        idx = torch.nonzero(half == r).squeeze(1)
        per_chunk = max(1, max_elements // (2 * r + 1) ** window_dims)
        chunks += [(r, idx[i:i + per_chunk]) for i in range(0, idx.numel(), per_chunk)]
    return chunks


def rasterize_splat(means2d, conics, weights, radii, *, box_size: int, cutoff: float,
                    max_elements: int = MAX_ELEMENTS):
    """``[B, D, D]`` images, each pair evaluated only in the pixel box around its cutoff ellipse.

    A pixel contributes when ``q ≤ cutoff²``, the same rule as the dense reference with a cutoff.
    """
    B, N = weights.shape
    D = box_size
    out = weights.new_zeros(B * D * D)
    if B == 0 or N == 0:
        return out.view(B, D, D)
    with torch.no_grad():
        r = torch.ceil(radii.amax(-1))
        lo = means2d - radii
        hi = means2d + radii
        # every valid pair (radii > 0), even one of weight 0: it still has a gradient in its weight
        visible = (radii > 0).all(-1) & (hi >= 0).all(-1) & (lo <= D - 1).all(-1)
        pair = torch.nonzero(visible.reshape(-1)).squeeze(1)
        chunks = _window_groups(r.reshape(-1)[pair].long(), 2, max_elements, D - 1)
    flat_m2 = means2d.reshape(-1, 2)
    flat_cn = conics.reshape(-1, 3)
    flat_w = weights.reshape(-1)
    k2 = cutoff * cutoff

    def splat_chunk(m2_all, cn_all, w_all, chunk):
        # Window rows (y) and columns (x) are 1D per pair; only q, exp and the mask are 2D.
        half, local = chunk
        p = pair[local]
        m2, cn, w = m2_all[p], cn_all[p], w_all[p]
        offs = torch.arange(-half, half + 1, device=m2.device)
        with torch.no_grad():
            centre = torch.round(m2).clamp(0, D - 1).long()
            px = centre[:, 0, None] + offs  # [P, W]
            py = centre[:, 1, None] + offs  # [P, W]
            inside = ((py >= 0) & (py < D))[:, :, None] & ((px >= 0) & (px < D))[:, None, :]
            row = (torch.div(p, N, rounding_mode="floor")[:, None] * D + py.clamp(0, D - 1)) * D
            flat_idx = row[:, :, None] + px.clamp(0, D - 1)[:, None, :]  # [P, W, W]
        dx = px.to(m2.dtype) - m2[:, 0, None]
        dy = py.to(m2.dtype) - m2[:, 1, None]
        a, b, c = cn[:, 0, None], cn[:, 1, None], cn[:, 2, None]
        q = (c * dy * dy)[:, :, None] + (2 * b * dx)[:, None, :] * dy[:, :, None] + (a * dx * dx)[:, None, :]
        keep = inside & (q <= k2)
        val = torch.where(keep, w[:, None, None] * torch.exp(-0.5 * q), torch.zeros_like(q))
        return torch.zeros_like(out).index_add(0, flat_idx.reshape(-1), val.reshape(-1))

    grad = _needs_grad(means2d, conics, weights)
    total = _run_chunks(splat_chunk, chunks, (flat_m2, flat_cn, flat_w), grad, 2, max_elements)
    return (out if total is None else total).view(B, D, D)


def voxelize_splat(means, cov3d, amplitudes, *, box_size: int, pixel_size: float, cutoff: float,
                   max_elements: int = MAX_ELEMENTS):
    """``[D, D, D]`` volume ``V[z, y, x]`` of mass per voxel, each Gaussian evaluated in its own box.

    ``means [N,3]`` (Å, x y z), ``cov3d [N,3,3]`` (Å²), ``amplitudes [N]``; voxels with ``q > cutoff²``
    are dropped.
    """
    D = box_size
    N = amplitudes.shape[0]
    out = amplitudes.new_zeros(D * D * D)
    if N == 0:
        return out.view(D, D, D)
    c0 = centre_index(D)
    cov_vox = cov3d / pixel_size ** 2
    centre_vox = means / pixel_size + c0
    det = torch.linalg.det(cov_vox)
    inv = torch.linalg.inv(cov_vox)
    dens = amplitudes / ((2 * math.pi) ** 1.5 * det.sqrt())
    with torch.no_grad():
        radii = cutoff * torch.diagonal(cov_vox, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        visible = (det > 0) & torch.isfinite(dens) & ((centre_vox + radii) >= 0).all(-1)
        visible &= ((centre_vox - radii) <= D - 1).all(-1)
        g = torch.nonzero(visible).squeeze(1)
        chunks = _window_groups(torch.ceil(radii.amax(-1))[g].long(), 3, max_elements, D - 1)
    k2 = cutoff * cutoff

    def vox_chunk(cv_all, inv_all, dens_all, chunk):
        half, local = chunk
        idx = g[local]
        cv, iv, de = cv_all[idx], inv_all[idx], dens_all[idx]
        offs = torch.arange(-half, half + 1, device=cv.device)
        with torch.no_grad():
            centre = torch.round(cv).clamp(0, D - 1).long()
            grid = torch.stack(torch.meshgrid(offs, offs, offs, indexing="ij"), -1).reshape(-1, 3)  # (z, y, x)
            pos = centre[:, None, [2, 1, 0]] + grid[None]  # [n, W³, (z, y, x)]
            inside = ((pos >= 0) & (pos < D)).all(-1)
            pc = pos.clamp(0, D - 1)
            flat_idx = (pc[..., 0] * D + pc[..., 1]) * D + pc[..., 2]
        d = pos[..., [2, 1, 0]].to(cv.dtype) - cv[:, None, :]  # (x, y, z) offsets
        q = torch.einsum("npi,nij,npj->np", d, iv, d)
        keep = inside & (q <= k2)
        val = torch.where(keep, de[:, None] * torch.exp(-0.5 * q), torch.zeros_like(q))
        return torch.zeros_like(out).index_add(0, flat_idx.reshape(-1), val.reshape(-1))

    grad = _needs_grad(means, cov3d, amplitudes)
    total = _run_chunks(vox_chunk, chunks, (centre_vox, inv, dens), grad, 3, max_elements)
    return (out if total is None else total).view(D, D, D)
