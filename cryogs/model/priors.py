"""Physical priors on a Gaussian model: scalars to add to the loss, each times a ``--reg-*`` weight.

Every prior is dimensionless and independent of the model's size and overall mass, so one weight
means the same for any N, box or data scale:

* :func:`repulsion` and :func:`scale_bounds` are means per Gaussian;
* :func:`map_prior` divides the map's total variation (smoothness) by its total mass (squared
  mass), which makes it invariant to the map's overall scale: it shapes the map without pulling
  its mass towards 0; the data term alone sets the mass.

To weigh a prior against the data term, compare it with the data loss per image at convergence,
about ``½·D²·σ²`` for :func:`cryogs.physics.noise.gaussian_nll` (σ² the mean per-pixel noise variance).

All are deterministic: no sampling, and on the CPU the same inputs give bitwise the same value and
gradient. On CUDA, the scatter-adds (``index_add``, and the backward of indexing) use atomics
unless ``torch.use_deterministic_algorithms(True)`` is set.
"""
from __future__ import annotations

import math

import torch

from cryogs.errors import CryogsError
from cryogs.render.gaussian_math import CUTOFF_SIGMA
from cryogs.render.project import voxelize

__all__ = ["close_pairs", "repulsion", "scale_bounds", "total_variation", "smoothness", "map_prior"]

#: The cell table has at most this many cells (or 8 per point, if more): cells grow beyond the
#: search distance when the points spread far, which only adds candidates.
_MAX_CELLS = 1 << 18


def close_pairs(points: torch.Tensor, distance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``(i, j)``, ``i ≠ j``, each unordered pair once, of all points of ``points [N, 3]``
    closer than ``distance``.

    A cell grid of cells at least ``distance`` wide: every close pair lies in one cell or in two
    adjacent ones, so each point is paired with the later points of its own cell and with all
    points of the 13 adjacent cells that follow its cell in key order (the other 13 see it from
    their side). A dense table of cell starts makes each lookup O(1); cost and memory are linear in
    N and in the number of candidate pairs. The order is deterministic; no gradient flows through
    the search.
    """
    n = points.shape[0]
    dev = points.device
    with torch.no_grad():
        x = points.detach()
        if not torch.isfinite(x).all():
            raise CryogsError("non-finite Gaussian centres: the model has diverged")
        lo = x.min(0).values
        extent = (x.max(0).values - lo).clamp_min(0)
        max_cells = max(_MAX_CELLS, 8 * n)
        size = max(distance, float((extent + distance).prod() / max_cells) ** (1 / 3))
        cell = torch.floor((x - lo) / size).long() + 1  # ≥ 1: a margin of empty cells on each side...
        nx, ny, nz = (int(c) + 2 for c in cell.max(0).values)  # ...so a neighbour never wraps a row
        key = (cell[:, 2] * ny + cell[:, 1]) * nx + cell[:, 0]
        order = torch.argsort(key, stable=True)
        key = key[order]
        count = torch.bincount(key, minlength=nx * ny * nz)
        start = torch.cumsum(count, 0) - count
        step = torch.tensor([-1, 0, 1], device=dev)
        dz, dy, dx = torch.cartesian_prod(step, step, step).unbind(-1)
        shift = (dz * ny + dy) * nx + dx
        shift = shift[shift > 0]  # the 13 neighbours after the cell in key order
        rank = torch.arange(n, device=dev)
        own_end = start[key] + count[key]
        nb = key[:, None] + shift[None, :]
        first = torch.cat([rank[:, None] + 1, start[nb]], 1).reshape(-1)  # [N·14] runs of partners
        length = torch.cat([own_end[:, None] - rank[:, None] - 1, count[nb]], 1).reshape(-1)
        total = int(length.sum())
        offset = torch.cumsum(length, 0) - length
        pos = (first - offset).repeat_interleave(length, output_size=total) + torch.arange(total, device=dev)
        i = rank.repeat_interleave(14).repeat_interleave(length, output_size=total)
        d2 = ((x[order[i]] - x[order[pos]]) ** 2).sum(-1)
        close = d2 < distance * distance
        return order[i[close]], order[pos[close]]


def repulsion(means: torch.Tensor, min_distance: float) -> torch.Tensor:
    """Mean over Gaussians of ``Σ_pairs (1 − d/d_min)²``, over pairs closer than ``d_min``.

    ``means [N, 3]`` and ``min_distance`` in Å. The hinge is 1 for coincident centres and falls to
    0 with zero slope at ``d_min``, so the penalty and its gradient are continuous; its push,
    ``2(1 − d/d_min)/d_min``, is strongest at short range. Coincident centres count 1 and get no
    push (its direction is undefined).
    """
    if not min_distance > 0:
        raise CryogsError(f"the repulsion distance must be positive, got {min_distance} Å")
    i, j = close_pairs(means, min_distance)
    d2 = ((means[i] - means[j]) ** 2).sum(-1)
    apart = d2 > 0
    d = torch.where(apart, torch.sqrt(torch.where(apart, d2, 1)), 0)  # no 0·∞ gradient when coincident
    return ((1 - d / min_distance) ** 2).sum() / means.shape[0]


def scale_bounds(log_scales: torch.Tensor, min_scale: float, max_scale: float) -> torch.Tensor:
    """Mean over Gaussians of ``Σ_axes relu(log s_min − log s)² + relu(log s − log s_max)²``.

    ``log_scales [N, 3]`` (log Å); 0 for every scale within ``[min_scale, max_scale]`` Å. A quadratic
    hinge in log space: a scale twice too large costs ``(log 2)² ≈ 0.48``.
    """
    if not 0 < min_scale <= max_scale:
        raise CryogsError(f"scale bounds must satisfy 0 < min ≤ max, got {min_scale} and {max_scale} Å")
    below = torch.relu(math.log(min_scale) - log_scales)
    above = torch.relu(log_scales - math.log(max_scale))
    return (below * below + above * above).sum() / log_scales.shape[0]


def _gradient(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward differences of ``V[z, y, x]`` along z, y, x; 0 at the last index of each axis."""
    return tuple(torch.diff(volume, dim=a, append=volume.narrow(a, volume.shape[a] - 1, 1)) for a in range(3))


def total_variation(volume: torch.Tensor, eps: float | torch.Tensor = 1e-8) -> torch.Tensor:
    """Isotropic total variation ``Σ_voxels √(|∇V|² + ε²) − ε`` of ``V [D, D, D]``.

    Forward differences, 0 across the far face of each axis (no wrap-around). ``eps`` (in the
    map's units) rounds the cusp at ``∇V = 0`` so the gradient is defined everywhere.
    """
    gz, gy, gx = _gradient(volume)
    return (torch.sqrt(gx * gx + gy * gy + gz * gz + eps * eps) - eps).sum()


def smoothness(volume: torch.Tensor) -> torch.Tensor:
    """``Σ_voxels |∇V|²`` of ``V [D, D, D]``, with the forward differences of :func:`total_variation`."""
    gz, gy, gx = _gradient(volume)
    return (gx * gx + gy * gy + gz * gz).sum()


def map_prior(model_tensors, *, box_size: int, pixel_size: float, kind: str = "tv",
              grid: int | None = None, cutoff: float = CUTOFF_SIGMA) -> torch.Tensor:
    """Total variation (``kind="tv"``) or smoothness (``"smooth"``) of the model's map, dimensionless.

    ``model_tensors`` is ``(means, quats, scales, amplitudes)`` as :class:`~cryogs.model.gaussians.GaussianModel`
    returns them. The map is voxelized differentiably (``backend="torch"``) on a box of ``grid``
    voxels (default ``box_size``) spanning the same extent, so its voxel size is
    ``p' = pixel_size·box_size/grid``. On a coarser grid every Gaussian is first widened by the
    isotropic variance ``(p'² − p²)/4``: with scales of at least half a pixel (the trainer's
    floor), every Gaussian is then at least half a coarse voxel wide and samples without aliasing,
    so the coarse map is the model blurred to the coarse grid's resolution. ``cutoff`` is the
    voxelizer's truncation in standard deviations.

    Normalisation, with ``p/p'`` making the value independent of the grid for maps it resolves:

    * ``tv``: ``TV(V) / Σ|V| · (p/p')``, the mean relative change per native pixel; ``ε`` is 10⁻³
      of the mean voxel magnitude (a function of the map, so the scale invariance is exact);
    * ``smooth``: ``Σ|∇V|² / ΣV² · (p/p')²``; for an isotropic Gaussian of width σ ≫ p' it is
      ``6(1 − exp(−p'²/4σ²))·(p/p')² ≈ 1.5 p²/σ²``.
    """
    if kind not in ("tv", "smooth"):
        raise CryogsError(f"unknown map prior {kind!r}; choose 'tv' or 'smooth'")
    means, quats, scales, amplitudes = model_tensors
    G = box_size if grid is None else int(grid)
    if G < 2:
        raise CryogsError(f"the map prior grid needs at least 2 voxels, got {G}")
    p_grid = pixel_size * box_size / G
    if p_grid > pixel_size:
        scales = torch.sqrt(scales * scales + (p_grid * p_grid - pixel_size * pixel_size) / 4)
    volume = voxelize(means, quats, scales, amplitudes, box_size=G, pixel_size=p_grid, backend="torch",
                        cutoff=cutoff)
    ratio = pixel_size / p_grid
    if kind == "tv":
        mass = volume.abs().sum()
        if float(mass.detach()) == 0:  # nothing in the box: flat, and √ would have no gradient at 0
            return volume.sum() * 0
        return total_variation(volume, 1e-3 * mass / volume.numel()) / mass * ratio
    return smoothness(volume) / (volume * volume).sum().clamp_min(1e-30) * ratio * ratio
