"""Pure-PyTorch reference of the CUDA binning (``csrc/bin.cpp``), for exact tests.

The binning assigns every valid (image b, Gaussian g) pair to the image tiles its cutoff box overlaps.
The rule is the one of ``axis_span`` in ``csrc/gaussian_math.cuh``, evaluated in the dtype of the
inputs with one correctly rounded operation at a time (the kernels use ``__fadd_rn``/``__fmul_rn``, so
no fused multiply-add changes a bit), so on the CUDA preprocess outputs it reproduces the kernels'
tiles exactly:

* ``rho = r * (1 + 2⁻¹⁰) + 2⁻¹⁰`` per axis, with ``r`` the radius ``cutoff·√Σxx`` (x) or
  ``cutoff·√Σyy`` (y). The pad absorbs float rounding in ``q``: a pixel with ``q ≤ cutoff²`` satisfies
  ``|x − u_x| ≤ cutoff·√Σxx`` exactly, so the box ``[u − r, u + r]`` holds the whole truncated
  footprint, and the pad keeps that true for the rounded values.
* pixels ``lo = max(ceil(u − rho), 0)`` to ``hi = min(floor(u + rho), D − 1)`` inclusive (pixel centres
  at integer indices); the pair covers nothing on that axis if ``lo > hi`` or either is NaN;
* tile ``t`` holds pixels ``[t·TS, (t+1)·TS − 1]``, so the tiles are ``lo // TS`` to ``hi // TS``;
* invalid pairs (preprocess zeroes their conic; a valid conic is positive definite, so never all zero)
  cover no tiles.

Instances are generated b-major, then by g, then tiles row-major (y, then x); the key is ``b·T + tile``
with ``T = ceil(D/TS)²`` tiles per image, and a stable sort by key gives, within a tile, ascending g.
``tile_ranges[b, t] = [start, end)`` into the sorted list, ``[0, 0)`` for an empty tile.
"""
from __future__ import annotations

import torch

#: Tile side in pixels; must equal ``cryogs.render._C.TILE_SIZE`` (``TILE_SIZE`` in gaussian_math.cuh).
TILE_SIZE = 16
#: Relative and absolute pad of the cutoff box (``RECT_PAD_REL``, ``RECT_PAD_ABS``), in pixels.
RECT_PAD_REL = 2.0 ** -10
RECT_PAD_ABS = 2.0 ** -10


def tiles_per_side(box_size: int, tile_size: int = TILE_SIZE) -> int:
    return -(-box_size // tile_size)


def valid_pairs(conics: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` mask of the pairs preprocess kept (their conic is not all zero)."""
    return (conics != 0).any(-1)


def pixel_spans(means2d: torch.Tensor, radii: torch.Tensor, box_size: int):
    """``lo, hi [B, N, 2]`` (int64) inclusive pixel bounds per axis and ``nonempty [B, N]``."""
    rho = radii * (1.0 + RECT_PAD_REL)  # each op rounded in the dtype of radii, as in the kernels
    rho = rho + RECT_PAD_ABS
    lo_f = torch.ceil(means2d - rho)
    hi_f = torch.floor(means2d + rho)
    nan = torch.isnan(lo_f) | torch.isnan(hi_f)
    lo_f = lo_f.clamp_min(0)
    hi_f = hi_f.clamp_max(box_size - 1)
    nonempty = ((lo_f <= hi_f) & ~nan).all(-1)
    lo = torch.where(nonempty[..., None], lo_f, torch.zeros_like(lo_f)).to(torch.int64)
    hi = torch.where(nonempty[..., None], hi_f, torch.full_like(hi_f, -1)).to(torch.int64)
    return lo, hi, nonempty


def tile_rects(means2d, radii, box_size: int, *, valid=None, tile_size: int = TILE_SIZE):
    """Inclusive tile bounds ``t0, t1 [B, N, 2]`` (x, y) and ``covers [B, N]`` of every pair.

    ``valid`` is a ``[B, N]`` mask of the pairs preprocess kept (e.g. ``valid_pairs(conics)``); when
    None every pair is treated as valid.
    """
    lo, hi, nonempty = pixel_spans(means2d, radii, box_size)
    covers = nonempty if valid is None else nonempty & valid
    t0 = torch.div(lo, tile_size, rounding_mode="floor")
    t1 = torch.div(hi, tile_size, rounding_mode="floor")
    return t0, t1, covers


def tile_counts(means2d, radii, box_size: int, *, valid=None, tile_size: int = TILE_SIZE) -> torch.Tensor:
    """``[B, N]`` int32 number of tiles each pair covers (0 for invalid pairs and pairs off the image)."""
    t0, t1, covers = tile_rects(means2d, radii, box_size, valid=valid, tile_size=tile_size)
    n = (t1 - t0 + 1).prod(-1)
    return torch.where(covers, n, torch.zeros_like(n)).to(torch.int32)


def bin_reference(means2d, radii, box_size: int, *, valid=None, tile_size: int = TILE_SIZE):
    """The CUDA binning of one batch: ``(tile_ranges [B, T, 2] int64, keys [M] int64, gids [M] int64)``.

    ``keys`` are ``b·T + tile`` sorted ascending, ``gids`` the Gaussian of each instance (ascending g
    within a tile).
    """
    B, N = means2d.shape[:2]
    tx = tiles_per_side(box_size, tile_size)
    T = tx * tx
    t0, t1, covers = tile_rects(means2d.cpu(), radii.cpu(), box_size, valid=None if valid is None else valid.cpu(),
                                tile_size=tile_size)
    keys, gids = [], []
    for b, g in torch.nonzero(covers).tolist():  # b-major, then g
        (x0, y0), (x1, y1) = t0[b, g].tolist(), t1[b, g].tolist()
        for ty in range(y0, y1 + 1):
            for txi in range(x0, x1 + 1):
                keys.append(b * T + ty * tx + txi)
                gids.append(g)
    keys_t = torch.tensor(keys, dtype=torch.int64)
    gids_t = torch.tensor(gids, dtype=torch.int64)
    order = torch.sort(keys_t, stable=True).indices
    keys_t, gids_t = keys_t[order], gids_t[order]
    ranges = torch.zeros(B * T, 2, dtype=torch.int64)
    if keys_t.numel():
        uniq, counts = torch.unique_consecutive(keys_t, return_counts=True)
        ends = torch.cumsum(counts, 0)
        ranges[uniq, 0] = ends - counts
        ranges[uniq, 1] = ends
    return ranges.view(B, T, 2), keys_t, gids_t
