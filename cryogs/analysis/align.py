"""Rigid-body alignment of one map onto another, over rotations, translations and the hand.

An ab initio map comes out in an arbitrary orientation, position and hand (projections cannot tell
a structure from its mirror image). :func:`align_maps` finds the transform ``W(u) = V(H Rᵀ(u − t))``
(``H`` the identity or the mirror ``z → −z`` about the box centre, ``R`` a rotation, ``t`` a translation
in Å) that best matches a reference, by the correlation of the low-passed maps:

1. both maps are Fourier-cropped to at most 24 voxels a side and low-passed to about 4 voxels of that
   grid; for both hands, every rotation of a ~15° grid (:func:`cryogs.analysis.align.so3_grid_simple`)
   is applied, and the translation comes from the peak of the FFT cross-correlation;
2. the best few are refined at the full box on local grids of 27 rotations (±step about each axis),
   halving the step each round, the translation again from the cross-correlation peak.

Then :func:`cryogs.analysis.fsc.fsc` gives the FSC of the aligned map against the reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cryogs.errors import CryogsError
from cryogs.physics.conventions import euler_to_matrix

MIRROR = torch.diag(torch.tensor([1.0, 1.0, -1.0]))


def mirror_map(volume: np.ndarray) -> np.ndarray:
    """The mirror image ``V'(x, y, z) = V(x, y, −z)`` about the box centre ``D//2`` (hand flipped)."""
    v = np.asarray(volume)[::-1]
    if v.shape[0] % 2 == 0:  # index i ↦ 2·(D//2) − i: a plain reversal is off by one for even D
        v = np.roll(v, 1, axis=0)
    return np.ascontiguousarray(v)


def so3_grid_simple(step_deg: float) -> torch.Tensor:
    """``[J, 3, 3]`` rotations about ``step_deg`` apart: Fibonacci-sphere directions × in-plane angles."""
    step = math.radians(step_deg)
    n_dirs = max(2, round(4 * math.pi / step ** 2))
    n_psi = max(1, round(360 / step_deg))
    i = np.arange(n_dirs) + 0.5
    rot = np.degrees(np.mod(np.pi * (1 + 5 ** 0.5) * i, 2 * np.pi))
    tilt = np.degrees(np.arccos(1 - 2 * i / n_dirs))
    psi = np.arange(n_psi) * 360.0 / n_psi
    eul = np.stack(np.broadcast_arrays(rot[:, None], tilt[:, None], psi[None, :]), -1).reshape(-1, 3)
    return euler_to_matrix(eul).float()


def _local(step_deg: float) -> torch.Tensor:
    s = math.radians(step_deg)
    g = torch.tensor([0.0, -s, s], dtype=torch.float64)
    w = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    skew = torch.zeros(len(w), 3, 3, dtype=torch.float64)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    return torch.linalg.matrix_exp(skew - skew.transpose(1, 2)).float()


def _crop(volume: torch.Tensor, d: int) -> torch.Tensor:
    """Fourier crop of a ``D³`` map to ``d³`` (centre ``D//2`` to ``d//2``), mass kept."""
    D = volume.shape[0]
    if d >= D:
        return volume
    F = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume)))
    lo = D // 2 - d // 2
    F = F[lo:lo + d, lo:lo + d, lo:lo + d]
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(F))).real.contiguous()


def _lowpass(volume: torch.Tensor, r: float) -> torch.Tensor:
    d = volume.shape[0]
    f = torch.fft.fftfreq(d, 1.0 / d)
    rad = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    return torch.fft.ifftn(torch.fft.fftn(volume) * torch.exp(-0.5 * (rad / r) ** 2)).real


def transform_map(volume: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``[B, d, d, d]`` maps ``W_b(u) = V(M_b u)`` (u in voxels from the centre ``d//2``, (x, y, z)), by
    trilinear interpolation, zero outside; ``matrices [B, 3, 3]``."""
    d = volume.shape[0]
    g = torch.arange(d, dtype=torch.float32) - d // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    u = torch.stack([x, y, z], -1).reshape(-1, 3)  # [d³, 3]
    src = torch.einsum("bij,nj->bni", matrices.float(), u) + d // 2  # voxel indices (x, y, z)
    norm = src / (d - 1) * 2 - 1
    out = torch.nn.functional.grid_sample(volume[None, None].expand(len(matrices), 1, d, d, d),
                                          norm.reshape(len(matrices), d, d, d, 3), mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out[:, 0]


def _best_shift(maps: torch.Tensor, ref_f: torch.Tensor):
    """Per map: the peak of its circular cross-correlation with the reference (``ref_f`` its rfftn),
    as ``(score, shift [3] voxels (x, y, z))``; ``W(u − t)`` matches the reference best."""
    d = maps.shape[-1]
    cc = torch.fft.irfftn(ref_f * torch.fft.rfftn(maps, dim=(-3, -2, -1)).conj(), s=(d, d, d), dim=(-3, -2, -1))
    score, flat = cc.flatten(1).max(1)
    iz, iy, ix = flat // (d * d), (flat // d) % d, flat % d
    wrap = lambda i: torch.where(i > d // 2, i - d, i)
    return score, torch.stack([wrap(ix), wrap(iy), wrap(iz)], -1).float()


def align_maps(volume: np.ndarray, reference: np.ndarray, *, grid_step: float = 15.0, rounds: int = 4,
               keep: int = 4, coarse_box: int = 24) -> dict:
    """The rigid transform (and hand) that best puts ``volume`` onto ``reference`` (same cubic box).

    Returns ``{"aligned": map, "mirrored": bool, "rotation": R [3, 3], "shift_voxels": t (x, y, z),
    "correlation": float}`` with ``aligned(u) = volume(H Rᵀ(u − t))``.
    """
    v = torch.tensor(np.array(volume, dtype=np.float32))
    ref = torch.tensor(np.array(reference, dtype=np.float32))
    if v.shape != ref.shape or v.ndim != 3 or len(set(v.shape)) != 1:
        raise CryogsError(f"alignment needs two cubic maps of one box, got {tuple(v.shape)} and {tuple(ref.shape)}")
    D = v.shape[0]
    d = min(D, coarse_box)
    r_coarse = d / 6

    def prep(x, box, r):
        y = _lowpass(_crop(x, box), r)
        y = y - y.mean()
        return y / y.norm().clamp_min(1e-30)

    vc, rc = prep(v, d, r_coarse), prep(ref, d, r_coarse)
    rc_f = torch.fft.rfftn(rc)
    grid = so3_grid_simple(grid_step)
    found = []
    for mirrored in (False, True):
        h = MIRROR if mirrored else torch.eye(3)
        scores = []
        for start in range(0, len(grid), 256):
            mats = h @ grid[start:start + 256].transpose(1, 2)  # u ↦ H Rᵀ u
            s, _ = _best_shift(transform_map(vc, mats), rc_f)
            scores.append(s)
        scores = torch.cat(scores)
        top = scores.topk(keep).indices
        found += [(float(scores[i]), mirrored, grid[i]) for i in top]
    # refine the best candidates at the full box
    vf, rf = prep(v, D, D / 4), prep(ref, D, D / 4)
    rf_f = torch.fft.rfftn(rf)
    best = None
    for _, mirrored, R in sorted(found, key=lambda f: -f[0])[:keep]:
        h = MIRROR if mirrored else torch.eye(3)
        step = grid_step / 2
        for _ in range(rounds):
            cands = _local(step) @ R  # exp(ω) R
            s, t = _best_shift(transform_map(vf, h @ cands.transpose(1, 2)), rf_f)
            i = int(s.argmax())
            R, score, shift = cands[i], float(s[i]), t[i]
            step /= 2
        if best is None or score > best[0]:
            best = (score, mirrored, R, shift)
    score, mirrored, R, shift = best
    h = MIRROR if mirrored else torch.eye(3)
    aligned = _apply(v, h @ R.T, shift)
    return {"aligned": aligned.numpy(), "mirrored": mirrored, "rotation": R.numpy(), "shift_voxels": shift.numpy(),
            "correlation": float(np.corrcoef(aligned.numpy().ravel(), np.asarray(reference).ravel())[0, 1])}


def _apply(volume: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``W(u) = V(matrix·(u − t))``: the transform, then the translation by ``t`` voxels (Fourier phase)."""
    w = transform_map(volume, matrix[None])[0]
    d = w.shape[0]
    f = torch.fft.fftfreq(d)
    fz, fy, fx = torch.meshgrid(f, f, torch.fft.rfftfreq(d), indexing="ij")
    phase = torch.exp(-2j * math.pi * (fx * shift[0] + fy * shift[1] + fz * shift[2]))
    return torch.fft.irfftn(torch.fft.rfftn(w) * phase, s=(d, d, d)).float()
