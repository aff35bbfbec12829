"""Ab initio reconstruction: poses and a first map from particle images alone (no poses, no reference).

Method (expectation-maximisation with frequency marching, scored by the Gaussian likelihood under the CTF):

* **Working box.** The images are Fourier-cropped to a small box ``d`` (default 32 px, or the data's
  box if smaller); every search runs there. Each image is kept as its ``rfft2`` ``X_i(k)`` (origin
  moved from the centre ``d//2`` to index 0) with its CTF ``c_i(k)`` at the same frequencies.
* **Likelihood.** With white noise of variance ``v`` per Fourier coefficient, the log-likelihood of
  image ``i`` in pose ``(A, o)`` is, up to a constant,
  ``L = [2 Re Σ_k w_k X_i*(k) c_i(k) S_A(k) e^{2πi k·o} − Σ_k w_k c_i(k)² |S_A(k)|²] / v`` over the
  frequencies ``0 < |k| ≤ r`` of the current radius ``r`` (``w_k`` = 2 for ``kx > 0``, 1 on the
  ``kx = 0`` column: the half-plane counts the full plane). ``S_A(k) = V̂(Aᵀ(k, 0))`` is a central
  slice of the model's 3D transform (projection-slice theorem, ``A`` RELION's map→image matrix; the
  observed image is the centred projection translated by ``−o``, whence the phase ``e^{+2πi k·o}``).
  The model's transform is that of the map zero-padded twice, sampled by trilinear interpolation.
* **Global search** over SO(3) × in-plane shifts: a grid of about 15° (a Fibonacci sphere of viewing
  directions × in-plane angles, ~4,400 rotations) and shifts on a grid of one working pixel. For a
  chunk of images, the cross term for all rotations and shifts is one real matrix product
  ``[images·shifts, 2K] @ [2K, rotations]`` and the CTF² term another ``[images, K] @ [K, rotations]``.
* **Hierarchical refinement**: the best few candidates of each image are refined on local grids of
  27 rotations (offsets of ±step about each axis) × 9 shifts (±step), halving both steps each round.
* **Soft, then hard assignments**: in the first half of the iterations the top candidates of each
  image are weighted by a tempered posterior ``∝ exp(L / T)`` (restricted to the top ``K``; the noise
  variance ``v`` is re-estimated each iteration from the residuals), ``T ≥ 1`` set so that the best
  candidate's weight averages 0.2 in the first iteration, rising to 1 (:func:`soft_weights`: the
  likelihood of a wrong early model is overconfident, deterministic annealing spreads it); in the
  later iterations each image takes its single best pose.
* **Model update (M step)**: the weighted Fourier backprojection of the images into the padded 3D
  grid, ``V̂ = Σ w c X e^{-2πi k·o} / (Σ w c² + λ)`` with a small per-shell Wiener term ``λ``, low-passed
  to the current radius, masked by a soft sphere, its zero frequency set to the particle's mass
  (estimated from the images) and clipped to positive density: the reference of the next iteration.
  (Redrawing that map as a growing Gaussian model every iteration, :func:`gaussian_reference`,
  ``AbinitioConfig.gaussians``, made the search fail on the test data: off by default.)
* **Frequency marching**: the radius goes geometrically from about 20 Å to the working box's limit
  (``2.2`` working pixels) over the iterations; global searches run for the first two thirds (as the
  command sets them), local ones (around the previous best pose, finer steps) for the rest.
* **Several random starts** (16 random wide Gaussians each) run the first iterations on a subset of
  the images; the start whose best poses leave the smallest residual on that subset (the highest
  likelihood under one common noise variance) continues on all images.

The command then fits the Gaussians at the full box with these poses and refines every pose locally
with the known-pose fit's ``--refine-poses`` machinery (:mod:`cryogs.reconstruct.fit`).

Handedness: projections of a map and of its mirror image agree (for every pose of one, a pose of the
other gives the same images), so the map comes out in either hand, at random.

No symmetry is imposed.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from cryogs.errors import CryogsError
from cryogs.io.particles import ParticleSet
from cryogs.io.progress import Report
from cryogs.model.gaussians import GaussianModel
from cryogs.physics.conventions import euler_to_matrix
from cryogs.physics.ctf import particle_ctf
from cryogs.physics.fourier import crop_half_spectrum
from cryogs.render.project import voxelize

from . import checkpoint

#: The checkpoint of the search in a run folder.
SEARCH_CHECKPOINT = "abinitio_search.pt"
PAD = 2


@dataclass
class AbinitioConfig:
    """What determines the pose search; saved in ``config.json`` and the checkpoint."""

    work_box: int = 32  # px; the images are Fourier-cropped to this box for the search
    start_resolution: float = 20.0  # Å
    final_resolution: float = 0.0  # Å; 0: 2.2 working pixels
    iterations: int = 8
    global_iterations: int = 4  # the first ones search all of SO(3); the rest search locally
    soft_iterations: int = 3  # the first ones weight the top candidates; the rest take the best
    top_k: int = 10  # candidates kept (and refined) per image
    first_sharpness: float = 0.2  # mean weight of an image's best candidate in the first soft iteration
    grid_step: float = 15.0  # degrees, the global grid
    refine_rounds: int = 2  # hierarchical local rounds after each search, halving the step
    max_shift: float = 0.0  # Å searched either way on each axis; 0: 6 % of the box
    starts: int = 3  # random starts
    start_particles: int = 500  # images each start is tried on
    start_iterations: int = 3
    start_gaussians: int = 16
    radius: float = 0.0  # Å, the particle radius (from the images)
    mass: float = 0.0  # the particle's mass (from the images)
    seed: int = 0
    device: str = "cpu"
    chunk: int = 128  # images per scoring chunk
    gaussians: bool = False  # redraw the map as Gaussians every iteration (hurt in tests: off)

    @classmethod
    def from_dict(cls, d: dict) -> AbinitioConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------- grids
def so3_grid(step_deg: float, dtype=torch.float32) -> torch.Tensor:
    """``[J, 3, 3]`` RELION matrices covering SO(3) at about ``step_deg``: viewing directions on a
    Fibonacci sphere (one per ``step²`` of solid angle) × in-plane angles every ``step``."""
    step = math.radians(step_deg)
    n_dirs = max(2, round(4 * math.pi / step ** 2))
    n_psi = max(1, round(360 / step_deg))
    i = np.arange(n_dirs) + 0.5
    z = 1 - 2 * i / n_dirs
    rot = np.degrees(np.mod(np.pi * (1 + 5 ** 0.5) * i, 2 * np.pi))
    tilt = np.degrees(np.arccos(z))
    psi = np.arange(n_psi) * 360.0 / n_psi
    eul = np.stack(np.broadcast_arrays(rot[:, None], tilt[:, None], psi[None, :]), -1).reshape(-1, 3)
    return euler_to_matrix(eul).to(dtype)


def _rotvec_matrices(v: torch.Tensor) -> torch.Tensor:
    skew = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype)
    skew[..., 0, 1], skew[..., 0, 2], skew[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    return torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))


def local_rotations(step_deg: float) -> torch.Tensor:
    """``[27, 3, 3]`` rotations ``exp([ω]ₓ)`` for ω on the cube ``{−s, 0, s}³`` (the identity first)."""
    s = math.radians(step_deg)
    g = torch.tensor([0.0, -s, s], dtype=torch.float64)
    w = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return _rotvec_matrices(w).float()


def shift_grid(max_shift: float, step: float) -> torch.Tensor:
    """``[T, 2]`` origins (Å) on a square grid of ``step`` within ±``max_shift`` (zero first)."""
    n = math.floor(max_shift / step + 1e-6)
    a = torch.arange(-n, n + 1, dtype=torch.float32) * step
    g = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2)
    order = torch.argsort(g.norm(dim=-1), stable=True)
    return g[order]


# ---------------------------------------------------------------------------------------------- data
class FourierImages:
    """The images at the working box as half-plane transforms with their CTFs."""

    def __init__(self, particles: ParticleSet, box: int, device, batch: int = 512):
        D = particles.box_size
        self.box, self.n = box, len(particles)
        self.pixel = particles.pixel_size * D / box
        h = box // 2 + 1
        self.X = torch.empty(self.n, box, h, dtype=torch.complex64, device=device)
        self.C = torch.ones(self.n, box, h, dtype=torch.float32, device=device)
        self.has_ctf = particles.ctf is not None
        for start in range(0, self.n, batch):
            idx = np.arange(start, min(self.n, start + batch))
            img = torch.from_numpy(particles.images(idx)).to(device)
            f = torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))
            self.X[idx] = crop_half_spectrum(f, box).to(torch.complex64)
            c = particle_ctf(particles, idx, device=device)
            if c is not None:
                self.C[idx] = crop_half_spectrum(c, box).float()
        self.premultiplied = particles.ctf_premultiplied
        ky = torch.fft.fftfreq(box, 1.0 / box, device=device)
        kx = torch.arange(h, device=device, dtype=torch.float32)
        self.ky, self.kx = torch.meshgrid(ky, kx, indexing="ij")  # [d, h] integer frequencies
        r = torch.hypot(self.kx, self.ky)
        nyq_col = (self.kx == box // 2) & (box % 2 == 0)
        self.weight = torch.where((self.kx == 0) | nyq_col, 1.0, 2.0)
        self.radius = r

    def frequencies(self, r: float):
        """Flat indices, ``(kx, ky)`` and weights of the half-plane frequencies with ``0 < |k| ≤ r``."""
        keep = ((self.radius > 0) & (self.radius <= r)).flatten()
        idx = torch.nonzero(keep).squeeze(1)
        return idx, self.kx.flatten()[idx], self.ky.flatten()[idx], self.weight.flatten()[idx]

    def factors(self, sel, idx):
        """``(X, numerator factor, CTF²)`` of images ``sel`` at flat frequencies ``idx``."""
        X = self.X[sel].flatten(1)[:, idx]
        c = self.C[sel].flatten(1)[:, idx]
        if self.premultiplied:  # an image is c·(c·V + n): whitened, X/c against c·V
            return X, torch.ones_like(c), c
        return X, c, c * c


# ---------------------------------------------------------------------------------------------- model ↔ Fourier
class Reference:
    """The 3D transform of a ``d³`` map, zero-padded ``PAD``-fold, for central slices."""

    def __init__(self, volume: torch.Tensor):
        d = volume.shape[0]
        P = PAD * d
        padded = volume.new_zeros(P, P, P)
        lo = P // 2 - d // 2
        padded[lo:lo + d, lo:lo + d, lo:lo + d] = volume
        F = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
        self.grid = torch.stack([F.real, F.imag]).float()[None]  # [1, 2, P, P, P]
        self.d, self.P = d, P

    def slices(self, rotations: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` complex values ``V̂(Aᵀ(k, 0))`` for ``rotations [..., 3, 3]`` at the ``K`` frequencies."""
        lead = rotations.shape[:-2]
        R = rotations.reshape(-1, 3, 3).float()
        q = torch.stack([kx, ky], -1)  # [K, 2]
        # Aᵀ(kx, ky, 0) = kx·(row 0 of A) + ky·(row 1 of A), in (x, y, z)
        xyz = torch.einsum("kc,jcd->jkd", q, R[:, :2, :]) * PAD  # [J, K, 3] padded grid units
        c = self.P // 2
        g = (xyz + c) / (self.P - 1) * 2 - 1
        out = torch.nn.functional.grid_sample(self.grid, g[None, :, :, None, :], mode="bilinear",
                                              padding_mode="zeros", align_corners=True)  # [1, 2, J, K, 1]
        vals = torch.complex(out[0, 0, ..., 0], out[0, 1, ..., 0])
        return vals.reshape(*lead, -1)


def _phases(shifts: torch.Tensor, kx, ky, box: int, pixel: float) -> torch.Tensor:
    """``[..., K]`` ``e^{+2πi k·o}`` for origins ``shifts [..., 2]`` (Å)."""
    arg = (shifts[..., 0:1] * kx + shifts[..., 1:2] * ky) * (2 * math.pi / (box * pixel))
    return torch.polar(torch.ones_like(arg), arg)


# ---------------------------------------------------------------------------------------------- E step
@dataclass
class Candidates:
    """Per image: ``[n, k]`` candidate rotations (indices into ``rotations``) or matrices, shifts and scores."""

    rotations: torch.Tensor  # [n, k, 3, 3]
    shifts: torch.Tensor  # [n, k, 2] Å
    scores: torch.Tensor  # [n, k] log-likelihood (up to a per-image constant), best first


def global_search(data: FourierImages, ref: Reference, sel: torch.Tensor, grid: torch.Tensor, shifts: torch.Tensor,
                  r: float, v: float, top_k: int, chunk: int) -> Candidates:
    """Score every rotation of ``grid`` × origin of ``shifts`` for images ``sel``; keep the best ``top_k``."""
    idx, kx, ky, w = data.frequencies(r)
    S = ref.slices(grid, kx, ky)  # [J, K]
    K = len(idx)
    S2 = (S.real ** 2 + S.imag ** 2).T.contiguous()  # [K, J]
    Sr = torch.cat([S.real, S.imag], 1).T.contiguous()  # [2K, J]
    ph = _phases(shifts, kx, ky, data.box, data.pixel)  # [T, K]
    T, J = len(shifts), len(grid)
    out_r, out_s, out_v = [], [], []
    for start in range(0, len(sel), chunk):
        s = sel[start:start + chunk]
        X, c, c2 = data.factors(s, idx)
        a = (X.conj() * c * w)[:, None, :] * ph[None]  # [b, T, K]
        A = torch.cat([a.real, -a.imag], -1).reshape(-1, 2 * K)  # Re(a·S) = ar·Sr − ai·Si
        cross = (A @ Sr).reshape(len(s), T, J)
        power = (c2 * w) @ S2  # [b, J]
        score = (2 * cross - power[:, None, :]) / v
        best, which = score.reshape(len(s), -1).topk(top_k, dim=1)
        out_r.append(grid[which % J])
        out_s.append(shifts[which // J])
        out_v.append(best)
    return Candidates(torch.cat(out_r), torch.cat(out_s), torch.cat(out_v))


def local_search(data: FourierImages, ref: Reference, sel: torch.Tensor, cand: Candidates, r: float, v: float,
                 rot_step: float, shift_step: float, keep: int, chunk: int) -> Candidates:
    """Refine each candidate on 27 rotations ``exp([ω]ₓ)·A`` × 9 origins ``o ± step``; keep the best ``keep``
    poses of each image over all its candidates' neighbourhoods."""
    idx, kx, ky, w = data.frequencies(r)
    local = local_rotations(rot_step).to(cand.rotations.device)
    a = torch.tensor([0.0, -shift_step, shift_step])
    offs = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2).to(cand.shifts.device)
    n = cand.scores.shape[0]
    out_r, out_s, out_v = [], [], []
    for start in range(0, n, max(1, chunk // 4)):
        rows = torch.arange(start, min(n, start + max(1, chunk // 4)))
        s = sel[rows]
        X, c, c2 = data.factors(s, idx)
        R = local[None, None] @ cand.rotations[rows][:, :, None]  # [b, k, 27, 3, 3]
        sh = cand.shifts[rows][:, :, None, :] + offs  # [b, k, 9, 2]
        S = ref.slices(R, kx, ky)  # [b, k, 27, K]
        ph = _phases(sh, kx, ky, data.box, data.pixel)  # [b, k, 9, K]
        xa = (X.conj() * c * w)[:, None, None, :] * ph  # [b, k, 9, K]
        cross = torch.einsum("bktK,bkrK->bktr", xa.real, S.real) - torch.einsum("bktK,bkrK->bktr", xa.imag, S.imag)
        power = torch.einsum("bK,bkrK->bkr", c2 * w, S.real ** 2 + S.imag ** 2)
        score = ((2 * cross - power[:, :, None, :]) / v).reshape(len(rows), -1)  # [b, k*9*27]
        best, which = score.topk(min(keep, score.shape[1]), dim=1)
        kk, rest = which // (9 * 27), which % (9 * 27)
        t, rr = rest // 27, rest % 27
        b = torch.arange(len(rows))[:, None]
        out_r.append(R[b, kk, rr])
        out_s.append(sh[b, kk, t])
        out_v.append(best)
    return Candidates(torch.cat(out_r), torch.cat(out_s), torch.cat(out_v))


def _dedupe(cand: Candidates, keep: int) -> Candidates:
    """Keep the best ``keep`` candidates of each image, dropping near-duplicates (same pose twice)."""
    n, k = cand.scores.shape
    order = cand.scores.argsort(dim=1, descending=True)
    b = torch.arange(n)[:, None]
    R, sh, sc = cand.rotations[b, order], cand.shifts[b, order], cand.scores[b, order]
    dup = torch.zeros(n, k, dtype=torch.bool)
    for j in range(1, k):
        same_r = ((R[:, :j] - R[:, j:j + 1]).abs().flatten(2).amax(-1) < 1e-4)
        same_s = ((sh[:, :j] - sh[:, j:j + 1]).abs().amax(-1) < 1e-4)
        dup[:, j] = (same_r & same_s).any(1)
    sc = sc.masked_fill(dup, -math.inf)
    best, which = sc.topk(min(keep, k), dim=1)
    return Candidates(R[b, which], sh[b, which], best)


def soft_weights(scores: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Posterior weights ``softmax(L / T)`` of each image's candidates, the temperature ``T ≥ 1`` chosen (by
    bisection on log T) so that the best candidate's weight averages ``sharpness`` over the images at most:
    early on, when the model is wrong, the likelihood is overconfident, and a tempered posterior
    spreads each image over its plausible poses (deterministic annealing)."""
    k = scores.shape[1]
    target = min(1.0, max(sharpness, 1.0 / k))
    finite = torch.where(torch.isfinite(scores), scores, scores[:, :1] - 1e9)

    def top(t):
        return float(torch.softmax(finite / t, dim=1)[:, 0].mean())

    if top(1.0) <= target:
        return torch.softmax(finite, dim=1)
    lo, hi = 0.0, 12.0  # log T
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if top(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return torch.softmax(finite / math.exp(hi), dim=1)


def residual_variance(data: FourierImages, ref: Reference, sel, rotations, shifts, r: float) -> float:
    """Mean ``|X − c·S·e^{iφ}|²`` per Fourier coefficient (full plane) at the given poses: the noise variance
    ``v`` of the likelihood, and, with one fixed ``v``, what the random starts are compared by."""
    idx, kx, ky, w = data.frequencies(r)
    total, count = 0.0, 0.0
    for start in range(0, len(sel), 256):
        s = sel[start:start + 256]
        X, c, _ = data.factors(s, idx)
        S = ref.slices(rotations[start:start + 256], kx, ky)
        Y = c * S * _phases(shifts[start:start + 256], kx, ky, data.box, data.pixel)
        total += float(((X - Y).abs() ** 2 * w).sum())
        count += float(w.sum()) * len(s)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------- M step
def backproject(data: FourierImages, sel, cand: Candidates, weights: torch.Tensor, r: float) -> torch.Tensor:
    """Weighted Fourier backprojection into the padded grid: ``[d, d, d]`` map (mass per voxel), Wiener-regularised
    per shell, frequencies up to ``r``."""
    d = data.box
    P = PAD * d
    idx, kx, ky, _ = data.frequencies(min(r + 1.5, d / 2 - 0.5))
    num = torch.zeros(2, P ** 3)
    den = torch.zeros(P ** 3)
    c0 = P // 2
    for start in range(0, len(sel), 128):
        rows = slice(start, start + 128)
        s = sel[rows]
        X, c, c2 = data.factors(s, idx)
        wt = weights[rows]  # [b, k]
        R, sh = cand.rotations[rows], cand.shifts[rows]
        good = wt > 1e-3
        b_i, k_i = torch.nonzero(good, as_tuple=True)
        if len(b_i) == 0:
            continue
        ph = _phases(sh[b_i, k_i], kx, ky, d, data.pixel)  # [m, K]
        val = (c[b_i] * X[b_i] * ph.conj()) * wt[b_i, k_i, None]
        wgt = c2[b_i] * wt[b_i, k_i, None]
        Rm = R[b_i, k_i]
        xyz = torch.einsum("kc,mcd->mkd", torch.stack([kx, ky], -1), Rm[:, :2, :]) * PAD
        for sign in (1.0, -1.0):  # the sample and its Friedel mate
            p = sign * xyz.reshape(-1, 3) + c0
            v = val.reshape(-1) if sign > 0 else val.reshape(-1).conj()
            f = p.floor()
            t = p - f
            f = f.long()
            for dz in (0, 1):
                for dy in (0, 1):
                    for dx in (0, 1):
                        ix, iy, iz = f[:, 0] + dx, f[:, 1] + dy, f[:, 2] + dz
                        tw = ((t[:, 0] if dx else 1 - t[:, 0]) * (t[:, 1] if dy else 1 - t[:, 1])
                              * (t[:, 2] if dz else 1 - t[:, 2]))
                        ok = (ix >= 0) & (ix < P) & (iy >= 0) & (iy < P) & (iz >= 0) & (iz < P)
                        flat = (iz * P + iy) * P + ix
                        flat, tw_ok = flat[ok], tw[ok]
                        num[0].index_add_(0, flat, tw_ok * v.real[ok])
                        num[1].index_add_(0, flat, tw_ok * v.imag[ok])
                        den.index_add_(0, flat, tw_ok * wgt.reshape(-1)[ok])
    num = torch.complex(num[0], num[1]).reshape(P, P, P)
    den = den.reshape(P, P, P)
    # Wiener term per shell: the shell's mean weight over its SNR, the SNR from the unregularised map's
    # power against what noise alone would give it (1/weight per voxel, in units of v = 1 after scaling)
    g = torch.arange(P, dtype=torch.float32) - c0
    rad = torch.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / PAD
    shell = rad.round().long().clamp(max=d)
    covered = den > 1e-6 * den.max()
    raw = torch.where(covered, num / den.clamp_min(1e-30), 0)
    power = torch.bincount(shell.flatten(), (raw.abs() ** 2 * covered).flatten(), minlength=d + 1)
    mean_w = torch.bincount(shell.flatten(), (den * covered).flatten(), minlength=d + 1)
    cnt = torch.bincount(shell.flatten(), covered.flatten().float(), minlength=d + 1).clamp_min(1)
    power, mean_w = power / cnt, mean_w / cnt
    lam = (mean_w * 1e-2).clamp_min(1e-6 * float(den.max()))
    lam_vox = lam[shell]
    V = torch.where(covered, num / (den + lam_vox), 0)
    V = torch.where(rad <= r, V, 0)
    vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(V))).real
    # undo the trilinear gridding kernel (sinc² per axis), crop to the box
    s = torch.sinc(g / P).clamp_min(0.1) ** 2
    vol = vol / (s[:, None, None] * s[None, :, None] * s[None, None, :])
    lo = c0 - d // 2
    return vol[lo:lo + d, lo:lo + d, lo:lo + d].contiguous()


# ---------------------------------------------------------------------------------------------- the model
def lowpass(volume: torch.Tensor, r: float) -> torch.Tensor:
    """Soft low-pass of a ``d³`` map to radius ``r`` (cycles per box), a raised-cosine edge of 2 shells."""
    d = volume.shape[0]
    f = torch.fft.fftfreq(d, 1.0 / d)
    rad = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    filt = 0.5 * (1 + torch.cos(math.pi * ((rad - r) / 2).clamp(0, 1)))
    return torch.fft.ifftn(torch.fft.fftn(volume) * filt).real


def sphere_mask(d: int, radius_px: float, edge_px: float = 3.0) -> torch.Tensor:
    g = torch.arange(d, dtype=torch.float32) - d // 2
    rad = torch.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    return 0.5 * (1 + torch.cos(math.pi * ((rad - radius_px) / edge_px).clamp(0, 1)))


def gaussian_reference(volume: torch.Tensor, pixel: float, n: int, radius: float, seed: int):
    """The map redrawn as ``n`` Gaussians (:meth:`GaussianModel.from_map`), σ from the volume each covers
    (at least one voxel), and that model voxelized on the same grid: ``(model, map)``."""
    d = volume.shape[0]
    sigma = max(pixel, 0.45 * (4 / 3 * math.pi * radius ** 3 / n) ** (1 / 3))
    vol = volume.clamp_min(0).numpy()
    if not vol.any():
        vol = np.asarray(sphere_mask(d, radius / pixel).numpy())
    model = GaussianModel.from_map(vol, pixel, n, scale=sigma, seed=seed)
    with torch.no_grad():
        m = voxelize(*model(), box_size=d, pixel_size=pixel, backend="torch")
    return model, m.float()


def random_start(n: int, radius: float, mass: float, pixel: float, d: int, seed: int):
    """``n`` wide Gaussians at random inside the particle: a random start, voxelized."""
    rng = np.random.default_rng([seed, 11])
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    means = dirs * (0.6 * radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3))
    sigma = max(pixel, 0.45 * (4 / 3 * math.pi * radius ** 3 / n) ** (1 / 3))
    amps = rng.uniform(0.5, 1.5, n)
    amps *= mass / amps.sum()
    model = GaussianModel(means, np.tile([1.0, 0, 0, 0], (n, 1)), np.full((n, 3), sigma), amps)
    with torch.no_grad():
        m = voxelize(*model(), box_size=d, pixel_size=pixel, backend="torch")
    return model, m.float()


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class SearchState:
    """Where the search is; checkpointed after every iteration."""

    stage: str = "starts"  # "starts", then "main", then "done"
    start: int = 0  # random starts tried so far
    start_scores: list = field(default_factory=list)
    best_start_volume: torch.Tensor | None = None
    iteration: int = 0  # main iterations done
    volume: torch.Tensor | None = None  # the current reference map (d³)
    rotations: torch.Tensor | None = None  # [n, 3, 3] best pose of every image
    shifts: torch.Tensor | None = None  # [n, 2] Å
    candidates: Candidates | None = None
    noise: float = 0.0
    history: list = field(default_factory=list)  # per iteration: resolution, log-likelihood, ...
    seconds: float = 0.0


def schedule(cfg: AbinitioConfig, pixel: float, d: int) -> list[float]:
    """The resolution (Å) of every main iteration: geometric from the start to the final resolution."""
    final = cfg.final_resolution or 2.2 * pixel
    start = max(cfg.start_resolution, final)
    n = max(1, cfg.iterations)
    return [start * (final / start) ** (i / max(1, n - 1)) for i in range(n)]


def _radius(res: float, d: int, pixel: float) -> float:
    return min(d * pixel / res, d / 2 - 1)


class Search:
    """Runs the ab initio search on a :class:`FourierImages`, see the module notes."""

    def __init__(self, data: FourierImages, cfg: AbinitioConfig, report: Report):
        self.data, self.cfg, self.report = data, cfg, report
        self.d, self.pixel = data.box, data.pixel
        self.grid = so3_grid(cfg.grid_step)
        max_shift = cfg.max_shift or 0.06 * data.box * data.pixel
        self.shifts = shift_grid(max_shift, data.pixel)
        self.max_shift = max_shift
        self.mask = sphere_mask(self.d, min(cfg.radius / self.pixel + 2, self.d / 2 - 2))
        self.res = schedule(cfg, self.pixel, self.d)

    # one EM iteration -------------------------------------------------------------------------
    def iterate(self, volume, sel, res: float, v: float | None, *, global_: bool, soft: bool, prev=None,
                n_gaussians: int, seed: int, sharpness: float = 1.0):
        cfg, data = self.cfg, self.data
        r = _radius(res, self.d, self.pixel)
        ref = Reference(volume)
        if v is None:  # the first iteration: every image's power as its noise (a flat posterior)
            v = self._power(sel, r)
        keep = cfg.top_k if soft else 1
        if global_:
            cand = global_search(data, ref, sel, self.grid, self.shifts, r, v, max(cfg.top_k, keep), cfg.chunk)
            step, sstep = cfg.grid_step / 2, self.pixel / 2
        else:
            cand = prev
            step, sstep = cfg.grid_step / 4, self.pixel / 4
        for _ in range(cfg.refine_rounds):
            cand = local_search(data, ref, sel, cand, r, v, step, sstep, 4 * max(cfg.top_k, keep), cfg.chunk)
            cand = _dedupe(cand, max(cfg.top_k, keep))
            step, sstep = step / 2, sstep / 2
        cand.shifts = cand.shifts.clamp(-self.max_shift, self.max_shift)
        if soft:
            weights = soft_weights(cand.scores, sharpness)
        else:
            weights = torch.zeros_like(cand.scores)
            weights[:, 0] = 1
        mean_ll = float(cand.scores[:, 0].mean())
        new_v = residual_variance(data, ref, sel, cand.rotations[:, 0], cand.shifts[:, 0], r)
        vol = backproject(data, sel, cand, weights, r)
        vol = lowpass(vol, r) * self.mask
        vol = vol + (cfg.mass - float(vol.sum())) * self.mask / float(self.mask.sum())  # the zero frequency
        if cfg.gaussians:
            model, ref_vol = gaussian_reference(vol, self.pixel, n_gaussians, cfg.radius, seed)
        else:
            model, ref_vol = [0] * n_gaussians, vol.clamp_min(0)
        return cand, new_v, mean_ll, vol, model, ref_vol

    def _power(self, sel, r):
        idx, _, _, w = self.data.frequencies(r)
        X = self.data.X[sel].flatten(1)[:, idx]
        return float((X.abs() ** 2 * w).sum() / (w.sum() * len(sel)))

    def sharpness(self, it: int) -> float:
        """The mean weight of each image's best candidate allowed in soft iteration ``it``."""
        return self.cfg.first_sharpness + (1 - self.cfg.first_sharpness) * it / max(1, self.cfg.soft_iterations)

    def n_gaussians(self, it: int, final: int) -> int:
        return int(min(final, self.cfg.start_gaussians * 2 ** (it + 1)))

    # the whole search ---------------------------------------------------------------------------
    def run(self, state: SearchState, save) -> SearchState:
        cfg, data = self.cfg, self.data
        n = data.n
        final_n = max(cfg.start_gaussians, int(0.5 * 4 / 3 * math.pi * cfg.radius ** 3 / (1.5 * self.pixel) ** 3))
        rng = np.random.default_rng([cfg.seed, 5])
        subset = torch.from_numpy(np.sort(rng.choice(n, size=min(n, cfg.start_particles), replace=False)))
        t0 = time.perf_counter() - state.seconds
        bar = self.report.bar("ab initio search", cfg.starts + cfg.iterations, state.start + state.iteration)
        if state.stage == "starts":
            while state.start < cfg.starts:
                k = state.start
                _, vol = random_start(cfg.start_gaussians, cfg.radius, cfg.mass, self.pixel, self.d, cfg.seed * 101 + k)
                v = None
                for it in range(cfg.start_iterations):
                    res = self.res[min(it, len(self.res) - 1)]
                    cand, v, ll, _, _, vol = self.iterate(vol, subset, res, v, global_=True, soft=True,
                                                          n_gaussians=self.n_gaussians(it, final_n), seed=k,
                                                          sharpness=self.sharpness(it))
                # compare the starts under one noise variance: the residual of their best poses
                r = _radius(self.res[0], self.d, self.pixel)
                resid = residual_variance(data, Reference(vol), subset, cand.rotations[:, 0], cand.shifts[:, 0], r)
                state.start_scores.append(resid)
                if resid <= min(state.start_scores):
                    state.best_start_volume = vol
                state.start += 1
                state.seconds = time.perf_counter() - t0
                bar.update(1)
                self.report.line(f"random start {k + 1}/{cfg.starts}: residual {resid / self._power(subset, r):.4f} "
                                 f"of the images' power at {self.res[0]:.0f} Å")
                save(state)
            best = int(np.argmin(state.start_scores))
            self.report.line(f"continuing from random start {best + 1} (lowest residual)")
            state.stage, state.volume = "main", state.best_start_volume
            save(state)
        allp = torch.arange(n)
        while state.stage == "main" and state.iteration < cfg.iterations:
            it = state.iteration
            res = self.res[it]
            global_ = it < cfg.global_iterations or state.candidates is None
            soft = it < cfg.soft_iterations
            prev = None
            if not global_:
                prev = Candidates(state.rotations[:, None], state.shifts[:, None], torch.zeros(n, 1))
            v = state.noise or None
            cand, v, ll, vol, model, ref_vol = self.iterate(
                state.volume, allp, res, v, global_=global_, soft=soft, prev=prev,
                n_gaussians=self.n_gaussians(it + cfg.start_iterations, final_n), seed=cfg.seed + it,
                sharpness=self.sharpness(it))
            moved = None
            if state.rotations is not None:
                from .poses import rotation_error_degrees

                moved = float(rotation_error_degrees(cand.rotations[:, 0].double(), state.rotations.double()).median())
            state.candidates, state.noise = cand, v
            state.rotations, state.shifts = cand.rotations[:, 0].clone(), cand.shifts[:, 0].clone()
            state.volume = ref_vol
            state.iteration += 1
            state.seconds = time.perf_counter() - t0
            bar.update(1)
            state.history.append({"iteration": it + 1, "resolution_angstrom": res, "global": global_, "soft": soft,
                                  "mean_log_likelihood": ll, "noise_variance": v, "gaussians": len(model),
                                  "median_pose_change_degrees": moved, "seconds": state.seconds})
            self.report.line(f"iteration {it + 1}/{cfg.iterations} at {res:.1f} Å ({'global' if global_ else 'local'}, "
                             f"{'soft' if soft else 'hard'}): mean log-likelihood {ll:.4g}"
                             + (f", {len(model)} Gaussians" if cfg.gaussians else "")
                             + (f", poses moved {moved:.1f}° (median)" if moved is not None else ""))
            save(state)
        bar.close()
        state.stage = "done"
        return state


def search_state_dict(state: SearchState) -> dict:
    d = dict(state.__dict__)
    if state.candidates is not None:
        d["candidates"] = asdict(state.candidates)
    return d


def search_state_from(d: dict) -> SearchState:
    d = dict(d)
    if d.get("candidates") is not None:
        d["candidates"] = Candidates(**d["candidates"])
    return SearchState(**{k: v for k, v in d.items() if k in SearchState.__dataclass_fields__})


def run_search(particles: ParticleSet, cfg: AbinitioConfig, out_dir, *, resume: bool, report: Report):
    """The pose search with checkpoints in ``out_dir``; returns the finished :class:`SearchState` and the
    :class:`FourierImages` it ran on."""
    from pathlib import Path

    if particles.box_size < 16:
        raise CryogsError(f"ab initio needs images of at least 16 px, got {particles.box_size}")
    torch.manual_seed(cfg.seed)
    d = min(cfg.work_box, particles.box_size)
    d -= d % 2
    report.line(f"reading {len(particles)} images at {d} px for the search")
    data = FourierImages(particles, d, cfg.device)
    path = Path(out_dir) / SEARCH_CHECKPOINT
    state = SearchState()
    if resume and path.is_file():
        saved = checkpoint.load(path, "cpu")
        state = search_state_from(saved["state"])
        checkpoint.restore_rng(saved)
        report.line(f"resuming the search: {state.start} random starts and {state.iteration} iterations done")
    search = Search(data, cfg, report)

    def save(s: SearchState):
        checkpoint.save(path, {"state": search_state_dict(s), "config": asdict(cfg)})

    state = search.run(state, save)
    save(state)
    return state, data


# ---------------------------------------------------------------------------------------------- the whole run
@dataclass
class FitPlan:
    """The known-pose fit that follows the search: the Gaussians at the full box, poses refined locally."""

    epochs: int = 3
    refine_start: float = 0.34
    pose_steps: int = 3


def run_abinitio(particles: ParticleSet, cfg: AbinitioConfig, plan: FitPlan, out_dir, *, resume: bool,
                 report: Report, backend: str = "auto", command: str | None = None) -> dict:
    """Search, then fit with pose refinement, then write every output into ``out_dir``; returns the metrics."""
    from pathlib import Path

    from cryogs.analysis.figures import plot_abinitio_progress, plot_viewing_directions
    from cryogs.io.atomic import write_json
    from cryogs.io.star import write_star_with_poses

    from .backproject import gaussians_on_backprojection
    from .config import TrainConfig, default_config
    from .fit import planned_steps, run_training
    from .outputs import _image_names, _on_disk
    from .poses import rotation_error_degrees

    out = Path(out_dir)
    t0 = time.perf_counter()
    state, data = run_search(particles, cfg, out, resume=resume, report=report)
    search_seconds = state.seconds
    # the known-pose fit at the full box, from the poses found, refining them
    found = replace(particles, rotations=state.rotations.double().numpy(), shifts=state.shifts.double().numpy())
    config_file = out / "config.json"
    if resume and config_file.is_file():
        train = TrainConfig.from_dict(__import__("json").loads(config_file.read_text()))
        train.device, train.backend = cfg.device, backend
    else:
        train = default_config(found, epochs=plan.epochs, seed=cfg.seed, device=cfg.device, backend=backend,
                               refine_start=plan.refine_start, pose_steps=plan.pose_steps)
        train.refine_poses, train.init = True, "backproject"
    report.line(f"fitting {train.n_gaussians} Gaussians at {particles.box_size} px with the poses found, refining "
                f"every pose locally (--refine-poses) from epoch {math.floor(plan.refine_start * plan.epochs) + 1} "
                f"of {train.epochs}")
    report.plan(planned_steps(len(found), train))

    def start(p):
        return gaussians_on_backprojection(p, train.n_gaussians, seed=train.seed, device=train.device)

    trainer = run_training(found, train, out, resume=resume, initial=start, report=report, command=None)
    rotations, shifts = (x.detach().cpu() for x in trainer.refined_poses())
    moved = rotation_error_degrees(rotations.double(), state.rotations.double())
    names = _image_names(particles)
    star = out / "particles.star"
    if particles.source.lower().endswith(".star"):
        write_star_with_poses(star, particles, rotations, shifts, names)
    else:
        from cryogs.io.star import write_star

        write_star(star, None, rotations, shifts, *_on_disk(particles), ctf=particles.ctf, image_names=names,
                   ctf_premultiplied=particles.ctf_premultiplied)
    plot_viewing_directions(out / "viewing_directions.png", rotations.numpy())
    plot_abinitio_progress(out / "abinitio.png", state.history)
    metrics = {
        "search_seconds": search_seconds,
        "search_box": data.box, "search_pixel_size_angstrom": data.pixel,
        "search_iterations": state.history, "random_start_residuals": state.start_scores,
        "pose_change_in_refinement_median_degrees": float(moved.median()),
        "handedness": "undetermined: projections cannot tell a structure from its mirror image; the map may be "
                      "the mirror of the true one (cryogs flip, cryogs align)",
        "abinitio_config": asdict(cfg),
    }
    t_outputs = time.perf_counter()
    metrics = trainer.write_outputs(metrics)
    (out / "refined_poses.star").unlink(missing_ok=True)  # particles.star holds them, with the input columns
    now = time.perf_counter()
    metrics["wall_seconds"] = now - t0  # of this invocation (a resumed run: since the resume)
    # over every invocation, a killed and resumed run included (each one's set-up excepted)
    metrics["seconds_all_invocations"] = search_seconds + trainer.seconds + (now - t_outputs)
    write_json(out / "metrics.json", metrics)
    return metrics
