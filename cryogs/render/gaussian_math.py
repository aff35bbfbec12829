"""Per-Gaussian maths shared by every backend (the PyTorch twin of ``csrc/gaussian_math.cuh``).

Conventions (see :mod:`cryogs.physics.conventions` for the geometry):

* ``means2d[b, g] = (A_b μ_g)_xy / p + D//2 - t_b / p`` in pixels, with ``t_b`` the RELION origin (Å).
* ``M = A_b[:2] R(q_g) diag(s_g) / p`` (2×3), ``Σ2D = M Mᵀ`` in px²; ``det Σ2D`` is a sum of squared
  2×2 minors of ``M`` (Cauchy–Binet), so it is never negative through cancellation.
* ``conic = Σ2D⁻¹`` stored as ``(a, b, c)`` with ``q(d) = a dx² + 2 b dx dy + c dy²``.
* ``weight = m / (2π √det Σ2D)``: the sampled Gaussian integrates to ``m`` over the image plane.
* ``I_b(x) = Σ_g weight · exp(-q/2)``, keeping only pairs with ``q ≤ cutoff²`` in truncated backends.
"""
from __future__ import annotations

import math

import torch

from cryogs.physics.conventions import centre_index, quat_to_matrix

#: Default truncation, in standard deviations, used by the ``torch`` and ``cuda`` backends and by
#: :func:`cryogs.voxelize`. Dropped mass of a 2D Gaussian is ``exp(-k²/2)`` (0.22 % at k = 3.5).
CUTOFF_SIGMA = 3.5


def covariance_factor(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` factor ``L = R(q) diag(s)`` of the 3D covariance ``Σ = L Lᵀ`` (Å)."""
    return quat_to_matrix(quats) * scales[..., None, :]


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` covariance ``R diag(s²) Rᵀ`` in Å²."""
    L = covariance_factor(quats, scales)
    return L @ L.transpose(-1, -2)


def project_means(means, rotations, shifts, box_size: int, pixel_size: float) -> torch.Tensor:
    """``[B, N, 2]`` pixel (x, y) positions of the Gaussian centres in each image."""
    xy = torch.einsum("bij,nj->bni", rotations[:, :2, :], means) / pixel_size + centre_index(box_size)
    if shifts is not None:
        xy = xy - shifts[:, None, :] / pixel_size
    return xy


def projected_factor(quats, scales, rotations, pixel_size: float) -> torch.Tensor:
    """``[B, N, 2, 3]`` matrix ``M = A_b[:2] R(q) diag(s) / p``, so that ``Σ2D = M Mᵀ`` in px²."""
    L = covariance_factor(quats, scales)
    return torch.einsum("bij,njk->bnik", rotations[:, :2, :], L) / pixel_size


def cov2d_and_det(M: torch.Tensor):
    """From ``M [..., 2, 3]``: ``cov [..., 3]`` (xx, xy, yy) and ``det [...]`` of ``Σ2D = M Mᵀ``."""
    r0, r1 = M[..., 0, :], M[..., 1, :]
    sxx = (r0 * r0).sum(-1)
    sxy = (r0 * r1).sum(-1)
    syy = (r1 * r1).sum(-1)
    minors = r0[..., [0, 0, 1]] * r1[..., [1, 2, 2]] - r0[..., [1, 2, 2]] * r1[..., [0, 0, 1]]
    return torch.stack([sxx, sxy, syy], -1), (minors * minors).sum(-1)


def conic_from_cov(cov: torch.Tensor, det: torch.Tensor) -> torch.Tensor:
    """``Σ2D⁻¹`` as ``(a, b, c)`` from ``cov`` (xx, xy, yy) and its determinant."""
    return torch.stack([cov[..., 2], -cov[..., 1], cov[..., 0]], -1) / det[..., None]


def preprocess(means, quats, scales, amplitudes, rotations, shifts, *, box_size: int, pixel_size: float,
               cutoff: float = CUTOFF_SIGMA):
    """Every (image, Gaussian) pair's 2D parameters.

    Returns ``means2d [B,N,2]`` (px), ``conics [B,N,3]``, ``weights [B,N]`` and ``radii [B,N,2]``, the
    half-extents ``cutoff·√Σxx`` and ``cutoff·√Σyy`` (px) of the box around the cutoff ellipse.
    Pairs that are non-finite or degenerate (a zero quaternion, zero scales, a NaN anywhere) get
    weight 0 and radii 0: they cover nothing, and every input gets a finite gradient (zero for them).
    """
    # Invalid inputs are replaced before any arithmetic, not only masked after it: the gradient of a
    # masked-out NaN (0/0 normalising a zero quaternion, 1/det at det = 0) would still be NaN.
    g_ok = (torch.isfinite(means).all(-1) & torch.isfinite(quats).all(-1) & (quats.norm(dim=-1) > 0)
            & torch.isfinite(scales).all(-1) & torch.isfinite(amplitudes))
    b_ok = torch.isfinite(rotations).flatten(1).all(-1)
    if shifts is not None:
        b_ok = b_ok & torch.isfinite(shifts).all(-1)
        shifts = torch.where(b_ok[:, None], shifts, torch.zeros_like(shifts))
    means = torch.where(g_ok[:, None], means, torch.zeros_like(means))
    quats = torch.where(g_ok[:, None], quats, torch.tensor([1.0, 0, 0, 0], dtype=quats.dtype, device=quats.device))
    scales = torch.where(g_ok[:, None], scales, torch.ones_like(scales))
    amplitudes = torch.where(g_ok, amplitudes, torch.zeros_like(amplitudes))
    rotations = torch.where(b_ok[:, None, None], rotations, torch.eye(3, dtype=rotations.dtype, device=rotations.device))
    means2d = project_means(means, rotations, shifts, box_size, pixel_size)
    M = projected_factor(quats, scales, rotations, pixel_size)
    cov, det = cov2d_and_det(M)
    ok = b_ok[:, None] & g_ok[None, :] & (det > 0)
    det = torch.where(ok, det, torch.ones_like(det))
    conic = conic_from_cov(cov, det)
    weights = amplitudes[None, :] / (2 * math.pi * det.sqrt())
    radii = cutoff * cov[..., [0, 2]].clamp_min(0).sqrt()
    ok = ok & torch.isfinite(weights) & torch.isfinite(conic).all(-1) & torch.isfinite(means2d).all(-1)
    ok = ok & torch.isfinite(radii).all(-1)
    weights = torch.where(ok, weights, torch.zeros_like(weights))
    conic = torch.where(ok[..., None], conic, torch.zeros_like(conic))
    means2d = torch.where(ok[..., None], means2d, torch.zeros_like(means2d))
    radii = torch.where(ok[..., None], radii, torch.zeros_like(radii))
    return means2d, conic, weights, radii


def conic_quadratic(conics, dx, dy):
    """``q = a dx² + 2 b dx dy + c dy²`` with broadcasting over the leading dimensions of ``conics``."""
    a, b, c = conics.unbind(-1)
    return a * dx * dx + 2 * b * dx * dy + c * dy * dy
