"""A stationary coloured Gaussian noise model for the data term, and per-image contrast.

Fourier conventions (the same as :func:`cryogs.physics.ctf.apply_ctf`): ``X = torch.fft.rfft2(x)`` of the
``[D, D]`` image, unnormalised, on the ``[D, D//2 + 1]`` half grid (rows ``ky`` in ``fftfreq``
order, columns ``kx = 0 … D//2``). The *noise power* is ``S(k) = E|N(k)|²`` on that grid, so white
noise of per-pixel variance σ² has ``S = σ²·D²`` at every frequency, and Parseval reads
``Σ_x |x|² = (1/D²) Σ_k m(k) |X(k)|²`` with the half-grid multiplicity ``m(k)``: 1 for the
self-conjugate columns ``kx = 0`` and (D even) ``kx = D/2``, 2 for the others, which stand for
``k`` and ``−k``.

The loss for images ``I_i = s_i·CTF_i ∗ Γ(θ, pose_i) + noise`` with noise power ``S`` is, up to
constants, ``½ Σ_k m(k) |W(k)|² |s_i P̂_i(k) − Î_i(k)|² / D²`` with ``|W|² ∝ 1/S``
(:func:`gaussian_nll`); :func:`whitening_filter` normalises ``W`` so that white noise gives
``W = 1``, which keeps the loss equal to ``½ Σ_x (s·P − I)²`` for white data.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cryogs.errors import CryogsError

__all__ = ["half_grid_multiplicity", "shell_index", "solvent_window", "estimate_noise_spectrum",
           "whitening_filter", "contrast_scales", "gaussian_nll"]

#: Images read (and Fourier transformed) at once while estimating the noise.
_CHUNK = 256


def half_grid_multiplicity(box_size: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """``[D//2 + 1]`` weight of each ``rfft2`` column in a full-grid sum: 1 for ``kx = 0`` and the
    Nyquist column of an even box (they hold both ``k`` and ``−k``), 2 for the others."""
    m = torch.full((box_size // 2 + 1,), 2.0, device=device, dtype=dtype)
    m[0] = 1.0
    if box_size % 2 == 0:
        m[-1] = 1.0
    return m


def shell_index(box_size: int, *, device=None) -> torch.Tensor:
    """``[D, D//2 + 1]`` integer shell ``round(|k|)`` of every ``rfft2`` entry, |k| in cycles per box."""
    ky = torch.fft.fftfreq(box_size, d=1.0 / box_size, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box_size, d=1.0 / box_size, device=device, dtype=torch.float64)
    return torch.round(torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).long()


def solvent_window(box_size: int, mask_radius_px: float, edge_px: float = 4.0) -> torch.Tensor:
    """``[D, D]`` float64 window that keeps the solvent: 0 within ``mask_radius_px`` of the centre
    ``(D//2, D//2)``, rising as a raised cosine over ``edge_px`` pixels to 1 beyond.

    The soft edge lies outside the radius, so nothing within the particle radius is used.
    """
    yy, xx = torch.meshgrid(*(torch.arange(box_size, dtype=torch.float64) - box_size // 2,) * 2, indexing="ij")
    r = torch.sqrt(xx * xx + yy * yy)
    t = ((r - mask_radius_px) / max(edge_px, 1e-12)).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def _window_power(window: torch.Tensor) -> torch.Tensor:
    """``c(k) = E|Y(k)|²/σ²`` for white noise ``n`` of variance σ², with ``Y = rfft2((n − μ̂)·w)``
    and ``μ̂ = Σ w n / Σ w`` the window-weighted solvent mean:
    ``c = Σw² − 2 Re(conj(Ŵ) Ŵ₂)/Σw + |Ŵ|² Σw²/(Σw)²`` with ``Ŵ = rfft2(w)``, ``Ŵ₂ = rfft2(w²)``.
    It is 0 at ``k = 0``: removing the mean removes the DC term."""
    s1, s2 = window.sum(), (window * window).sum()
    W1, W2 = torch.fft.rfft2(window), torch.fft.rfft2(window * window)
    c = s2 - 2 * (W1.conj() * W2).real / s1 + W1.abs() ** 2 * s2 / s1 ** 2
    return c.clamp_min(0)


def _read(particles, idx: np.ndarray) -> torch.Tensor:
    if hasattr(particles, "images"):  # a ParticleSet
        return torch.from_numpy(particles.images(idx)).double()
    if torch.is_tensor(particles):
        return particles[torch.from_numpy(idx).to(particles.device)].double().cpu()
    return torch.from_numpy(np.asarray(particles)[idx]).double()


def estimate_noise_spectrum(particles, *, mask_radius_px: float, n_sample: int = 512, seed: int = 0,
                            edge_px: float = 4.0) -> torch.Tensor:
    """Radially averaged noise power ``S(k) = E|rfft2(noise)(k)|²`` as a ``[D, D//2 + 1]`` float64
    CPU tensor (white noise of variance σ² gives ``σ²·D²``; see the module docstring).

    Args:
        particles: a :class:`~cryogs.io.particles.ParticleSet` or a ``[n, D, D]`` array/tensor of images.
        mask_radius_px: radius (px) around the box centre that holds the particle; only the solvent
            beyond it (:func:`solvent_window`, soft edge of ``edge_px``) is used.
        n_sample: images drawn at random (without replacement, seeded by ``seed``); all when ≥ n.

    Each image has its window-weighted solvent mean subtracted before windowing: per-image
    background offsets are not noise at the frequencies the mask would leak them into (the window
    spreads a constant over the lowest shells). That removes the DC term, which is therefore not
    observed; it is set to the value of shell 1. The window's own effect, the fraction of the box it
    keeps, its taper and the mean removal, is divided out exactly for white noise: the power summed
    over a shell is divided by ``Σ m(k) c(k) / D²`` over that shell (see :func:`_window_power`). For
    coloured noise the estimate is the true power smoothed by the window's spectrum (a few shells
    wide for a mask leaving a thin solvent ring). The box edges are not tapered: the loss sees the
    images through the same periodic FFT. Shells are ``round(|k|)`` (:func:`shell_index`),
    corners beyond Nyquist included. Signal the CTF spreads beyond the mask radius adds to the
    estimate, so the radius should be generous. The spectrum is one average over the sample: noise
    that differs between images (CTF-premultiplied stacks, several detectors) gets its mean.
    """
    n = len(particles)
    if n == 0:
        raise CryogsError("no particles to estimate the noise from")
    D = particles.box_size if hasattr(particles, "box_size") else particles.shape[-1]
    window = solvent_window(D, mask_radius_px, edge_px)
    if window.sum() < 1:
        raise CryogsError(f"the mask radius {mask_radius_px} px leaves no solvent in a {D}-pixel box; "
                          "use a smaller radius")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n_sample, n), replace=False))
    power = torch.zeros(D, D // 2 + 1, dtype=torch.float64)
    for i in range(0, len(idx), _CHUNK):
        img = _read(particles, idx[i:i + _CHUNK])
        mean = (img * window).sum((-2, -1), keepdim=True) / window.sum()
        power += (torch.fft.rfft2((img - mean) * window).abs() ** 2).sum(0)
    power /= len(idx)

    shell = shell_index(D).reshape(-1)
    mult = half_grid_multiplicity(D).expand(D, -1).reshape(-1)
    n_shell = int(shell.max()) + 1
    num = torch.zeros(n_shell, dtype=torch.float64).index_add_(0, shell, mult * power.reshape(-1))
    den = torch.zeros(n_shell, dtype=torch.float64).index_add_(0, shell, mult * _window_power(window).reshape(-1))
    radial = D * D * num / den.clamp_min(1e-300)
    radial[0] = radial[1]  # DC removed with the solvent mean (see above)
    return radial[shell].reshape(D, D // 2 + 1)


def whitening_filter(noise_power: torch.Tensor, *, floor: float = 1e-6) -> torch.Tensor:
    """``W(k) = √(S̄ / S(k))`` on the ``[D, D//2 + 1]`` grid, ``S̄`` the mean power over the full grid.

    White noise gives ``W = 1``, so whitening leaves the loss scale of white data unchanged.
    Entries that are not positive and finite carry no noise estimate and get ``W = 0`` (the loss
    ignores them); the others are floored at ``floor·S̄`` so no frequency is weighted by more than
    ``1/√floor``.
    """
    S = torch.as_tensor(noise_power)
    D = S.shape[-2]
    if S.shape[-1] != D // 2 + 1:
        raise CryogsError(f"noise power must have shape [D, D//2+1], got {list(S.shape)}")
    ok = torch.isfinite(S) & (S > 0)
    if not ok.any():
        raise CryogsError("the noise power has no positive finite entry")
    mult = half_grid_multiplicity(D, device=S.device, dtype=S.dtype).expand_as(S)
    mean = (mult * torch.where(ok, S, 0)).sum() / (mult * ok).sum()
    return torch.where(ok, torch.sqrt(mean / S.clamp_min(floor * mean)), torch.zeros_like(S))


def _weights(filt, D: int, like: torch.Tensor) -> torch.Tensor:
    """``m(k)·|W(k)|²/D²``: the full-grid Parseval weight of each half-grid entry."""
    w = half_grid_multiplicity(D, device=like.device, dtype=like.dtype).expand(D, -1) / (D * D)
    if filt is not None:
        f = torch.as_tensor(filt).to(device=like.device, dtype=like.dtype)
        w = w * f * f
    return w


def contrast_scales(pred: torch.Tensor, images: torch.Tensor, filt: torch.Tensor | None = None, *,
                    min_scale: float = 0.2, max_scale: float = 5.0) -> torch.Tensor:
    """``[B]`` per-image contrast ``s = ⟨WP, WI⟩ / ⟨WP, WP⟩``, the minimiser of ``‖W(s·P − I)‖²``.

    ``pred`` and ``images`` are ``[B, D, D]`` (the prediction with its CTF applied); ``filt`` is a
    ``[D, D//2 + 1]`` whitening filter or ``None`` (W = 1). The scale is a nuisance parameter solved
    in closed form for the current model, so it carries no gradient. It is clamped to
    ``[min_scale, max_scale]``: the default factor-of-5 band covers ice-thickness contrast
    variation, while an unfit model (early training, a junk image) cannot flip the sign or blow up
    an image; an image whose prediction is 0 gets ``s = 1``.

    The overall scale is shared between the model and the ``s_i``; at the optimal ``s_i`` the
    gradient has no component along the model's overall mass, so the model keeps the mass it starts
    with and ``s_i`` is the contrast relative to it.
    """
    with torch.no_grad():
        if filt is None:
            num = (pred * images).sum((-2, -1))
            den = (pred * pred).sum((-2, -1))
        else:
            w = _weights(filt, pred.shape[-1], pred)
            P, I = torch.fft.rfft2(pred), torch.fft.rfft2(images)
            num = (w * (P.conj() * I).real).sum((-2, -1))
            den = (w * P.abs() ** 2).sum((-2, -1))
        s = torch.where(den > 0, num / torch.where(den > 0, den, 1), torch.ones_like(num))
        return s.clamp(min_scale, max_scale)


def gaussian_nll(pred: torch.Tensor, images: torch.Tensor, filt: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, *, per_image: bool = False) -> torch.Tensor:
    """Mean over the batch of ``½ Σ_k m(k) |W(k)|² |s·P̂(k) − Î(k)|² / D²``.

    This is the negative log-likelihood of stationary Gaussian noise with power ∝ ``1/|W|²``, up to
    an additive constant and the factor ``S̄`` (mean noise power) that :func:`whitening_filter`'s
    normalisation keeps out. With ``filt=None`` (W = 1) it is ``½ Σ_x (s·P − I)²``, evaluated in real
    space. ``pred``/``images`` are ``[B, D, D]``, ``scales`` ``[B]`` or ``None`` (s = 1);
    ``per_image`` gives the ``[B]`` terms instead of their mean.
    """
    resid = pred if scales is None else scales[:, None, None] * pred
    resid = resid - images
    if filt is None:
        terms = 0.5 * (resid * resid).sum((-2, -1))
    else:
        R = torch.fft.rfft2(resid)
        terms = 0.5 * (_weights(filt, resid.shape[-1], resid) * (R.real ** 2 + R.imag ** 2)).sum((-2, -1))
    return terms if per_image else terms.mean()
