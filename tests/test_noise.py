"""Noise spectrum, whitening, contrast scales and the Fourier-space NLL against exact expectations,
real-space Parseval sums and float64 gradient checks."""
import math

import numpy as np
import pytest
import torch

from cryogs.io.mrc import write_mrc
from cryogs.io.particles import ParticleSet
from cryogs.physics.noise import (
    contrast_scales,
    estimate_noise_spectrum,
    gaussian_nll,
    half_grid_multiplicity,
    whitening_filter,
)

#: z-score bound for statistical checks: a normal tail beyond 6σ has probability 2e-9 per check,
#: so the few hundred checks per run (one per shell) never fail by chance.
Z = 6.0


def _k(D):
    """|k| in cycles per box on the rfft2 grid, written out independently of the module."""
    ky = torch.tensor([i if i <= D // 2 else i - D for i in range(D)], dtype=torch.float64)
    kx = torch.arange(D // 2 + 1, dtype=torch.float64)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def _radial_filter(D, width, floor):
    return floor + torch.exp(-_k(D) ** 2 / (2 * width ** 2))


def _filtered(x, h):
    D = x.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(x) * h, s=(D, D))


def _random_setup(rng):
    D = int(torch.randint(24, 34, (1,), generator=rng))
    u = torch.rand(3, generator=rng, dtype=torch.float64).tolist()
    radius = D * (0.2 + 0.1 * u[0])
    edge = 1.0 + 3.0 * u[1]
    sigma = 0.5 + 2.0 * u[2]
    return D, radius, edge, sigma


def _standard_error(x, groups=50, **kw):
    """Standard error of the estimate from ``x``: it is the mean of the estimates from equal groups
    of independent images, so their spread gives it. With 50 groups a 6σ bound is a Student-t
    tail of 2e-7 per check."""
    parts = torch.stack([estimate_noise_spectrum(g, n_sample=len(g), **kw) for g in x.chunk(groups)])
    torch.testing.assert_close(parts.mean(0), estimate_noise_spectrum(x, n_sample=len(x), **kw),
                               rtol=1e-12, atol=0)
    return parts.std(0) / math.sqrt(groups)


def test_white_noise_expectation_is_exactly_flat(rng):
    """The estimator averages quadratic forms of each image, so on the D² basis images σD·e_j it
    returns its own expectation under white noise of variance σ²; that must be σ²D² everywhere."""
    D, radius, edge, sigma = _random_setup(rng)
    basis = torch.eye(D * D, dtype=torch.float64).reshape(D * D, D, D) * sigma * D
    S = estimate_noise_spectrum(basis, mask_radius_px=radius, edge_px=edge, n_sample=D * D)
    assert S.shape == (D, D // 2 + 1)
    torch.testing.assert_close(S, torch.full_like(S, sigma ** 2 * D * D), rtol=1e-10, atol=0)


@pytest.mark.statistical
def test_white_noise_spectrum(rng):
    """Statistical (seeded: see the ``statistical`` marker). 6σ bounds; over 300 seeds none failed."""
    D, radius, edge, sigma = _random_setup(rng)
    n = 300
    x = sigma * torch.randn(n, D, D, generator=rng, dtype=torch.float64)
    offsets = 10 * torch.randn(n, 1, 1, generator=rng, dtype=torch.float64)
    kw = dict(mask_radius_px=radius, edge_px=edge)
    S = estimate_noise_spectrum(x, n_sample=n, **kw)
    # the solvent mean is removed per image, so a background offset changes nothing
    torch.testing.assert_close(estimate_noise_spectrum(x + offsets, n_sample=n, **kw), S, rtol=1e-9, atol=0)
    assert ((S - sigma ** 2 * D * D).abs() <= Z * _standard_error(x, **kw)).all()


@pytest.mark.statistical
def test_coloured_noise_spectrum_and_whitening(rng):
    """Statistical (seeded: see the ``statistical`` marker). 6σ bounds; over 300 seeds none failed."""
    D, radius, edge, sigma = _random_setup(rng)
    u = torch.rand(2, generator=rng, dtype=torch.float64).tolist()
    h = _radial_filter(D, width=D * (0.15 + 0.15 * u[0]), floor=0.3 + 0.2 * u[1])
    truth = sigma ** 2 * D * D * h ** 2
    kw = dict(mask_radius_px=radius, edge_px=edge)
    # exact expectation of the estimator (see the white-noise test): the basis through the filter
    basis = torch.eye(D * D, dtype=torch.float64).reshape(D * D, D, D) * sigma * D
    expected = estimate_noise_spectrum(_filtered(basis, h), n_sample=D * D, **kw)
    # the window smooths the spectrum over a few shells, and a shell holds one value: a bias, at most
    # 20 % over this range of filters (checked at its corners), largest where the spectrum is steep
    bias = expected - truth
    assert (bias.abs() <= 0.25 * truth).all()

    n = 300
    x = _filtered(sigma * torch.randn(n, D, D, generator=rng, dtype=torch.float64), h)
    S = estimate_noise_spectrum(x, n_sample=n, **kw)
    assert ((S - truth).abs() <= Z * _standard_error(x, **kw) + bias.abs()).all()

    # whitened noise: its periodogram (whole box; pure noise needs no mask), relative to the mean
    # power S̄ the filter whitens to, has expectation |W|²·truth/S̄ = truth/S: flat up to the
    # estimate's own error, which is known here
    W = whitening_filter(S)
    mult = half_grid_multiplicity(D).expand(D, -1)
    mean_power = (mult * S).sum() / (D * D)
    level = (torch.fft.rfft2(x).abs() * W) ** 2 / mean_power  # [n, D, D//2+1]
    deviation = (truth / S - 1).abs()
    assert ((level.mean(0) - 1).abs() <= Z * level.std(0) / math.sqrt(n) + deviation).all()


def test_whitening_filter_normalisation(rng):
    D = 2 * int(torch.randint(8, 20, (1,), generator=rng)) + int(torch.randint(0, 2, (1,), generator=rng))
    c = float(torch.rand(1, generator=rng, dtype=torch.float64)) * 10 + 0.1
    torch.testing.assert_close(whitening_filter(torch.full((D, D // 2 + 1), c, dtype=torch.float64)),
                               torch.ones(D, D // 2 + 1, dtype=torch.float64), rtol=1e-14, atol=0)
    S = 0.5 + torch.rand(D, D // 2 + 1, generator=rng, dtype=torch.float64)
    S[0, 0], S[1, 1] = 0.0, math.nan
    W = whitening_filter(S)
    assert W[0, 0] == 0 and W[1, 1] == 0 and torch.isfinite(W).all()
    # |W|²·S is the same constant at every valid frequency: the mean valid power
    ok = W > 0
    mult = half_grid_multiplicity(D).expand(D, -1)
    mean = (mult * S)[ok].sum() / mult[ok].sum()
    torch.testing.assert_close((W ** 2 * S)[ok], torch.full_like(S[ok], float(mean)), rtol=1e-12, atol=0)


def test_particle_set_input_samples_like_an_array(tmp_path, rng):
    D, n = 24, 40
    x = torch.randn(n, D, D, generator=rng).numpy()
    write_mrc(tmp_path / "s.mrcs", x, 1.5)
    ps = ParticleSet(stacks=[str(tmp_path / "s.mrcs")], stack_id=np.zeros(n), stack_index=np.arange(n),
                     rotations=None, shifts=np.zeros((n, 2)), pixel_size=1.5, box_size=D)
    kw = dict(mask_radius_px=7.0, n_sample=17, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    torch.testing.assert_close(estimate_noise_spectrum(ps, **kw), estimate_noise_spectrum(x, **kw),
                               rtol=1e-12, atol=0)


def _radial_whitening(D, rng):
    u = torch.rand(2, generator=rng, dtype=torch.float64).tolist()
    return whitening_filter(_radial_filter(D, width=D * (0.1 + 0.2 * u[0]), floor=0.1 + 0.5 * u[1]) ** 2)


@pytest.mark.parametrize("whiten", [False, True])
def test_contrast_scale_exact_without_noise(rng, whiten):
    B, D = 5, 20 + int(torch.randint(0, 2, (1,), generator=rng))
    pred = torch.randn(B, D, D, generator=rng, dtype=torch.float64)
    s = 0.3 + 3 * torch.rand(B, generator=rng, dtype=torch.float64)
    filt = _radial_whitening(D, rng) if whiten else None
    got = contrast_scales(pred, s[:, None, None] * pred, filt)
    torch.testing.assert_close(got, s, rtol=1e-12, atol=0)
    assert not got.requires_grad
    # outside the band it is clamped; a zero prediction gets 1
    pred[0] = 0
    got = contrast_scales(pred, -s[:, None, None] * pred, filt, min_scale=0.2, max_scale=5.0)
    assert got[0] == 1 and (got[1:] == 0.2).all()


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.statistical
def test_contrast_scale_unbiased_with_noise(rng, whiten):
    """Statistical (seeded: see the ``statistical`` marker). 6σ bounds; over 300 seeds none failed."""
    B, D, sigma, s = 2000, 16, 1.0, 1.7
    pred = torch.randn(D, D, generator=rng, dtype=torch.float64)
    pred *= 16 * sigma / pred.norm()  # ŝ has standard deviation σ/‖P‖ = 1/16: the clamp is 24 of them away
    noisy = s * pred + sigma * torch.randn(B, D, D, generator=rng, dtype=torch.float64)
    filt = _radial_whitening(D, rng) if whiten else None
    est = contrast_scales(pred.expand(B, D, D), noisy, filt)
    # ŝ − s = ⟨WP, Wn⟩/⟨WP, WP⟩ is linear in the noise, so its mean is 0; without whitening its
    # standard deviation is σ/‖P‖ exactly, with whitening it is measured (the draws are independent)
    std = sigma / float(pred.norm()) if filt is None else float(est.std())
    assert abs(float(est.mean()) - s) <= Z * std / math.sqrt(B)
    if filt is None:
        assert abs(float(est.std()) / std - 1) <= Z * math.sqrt(1 / (2 * (B - 1)))


@pytest.mark.parametrize("D", [16, 17])
def test_nll_with_unit_filter_is_the_real_space_loss(rng, D):
    B = 4
    pred = torch.randn(B, D, D, generator=rng, dtype=torch.float64)
    images = torch.randn(B, D, D, generator=rng, dtype=torch.float64)
    s = 0.5 + torch.rand(B, generator=rng, dtype=torch.float64)
    real = 0.5 * ((s[:, None, None] * pred - images) ** 2).sum((1, 2)).mean()
    ones = torch.ones(D, D // 2 + 1, dtype=torch.float64)
    torch.testing.assert_close(gaussian_nll(pred, images, ones, s), real, rtol=1e-10, atol=0)
    torch.testing.assert_close(gaussian_nll(pred, images, None, s), real, rtol=1e-12, atol=0)
    torch.testing.assert_close(gaussian_nll(pred, images), 0.5 * ((pred - images) ** 2).sum((1, 2)).mean(),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("D", [16, 17])
def test_nll_is_the_whitened_real_space_loss(rng, D):
    """With a radial (hence Hermitian) filter, ½‖irfft2(W·R̂)‖² in real space is the same loss."""
    B = 3
    pred = torch.randn(B, D, D, generator=rng, dtype=torch.float64)
    images = torch.randn(B, D, D, generator=rng, dtype=torch.float64)
    W = _radial_whitening(D, rng)
    whitened = _filtered(pred - images, W)
    torch.testing.assert_close(gaussian_nll(pred, images, W), 0.5 * (whitened ** 2).sum((1, 2)).mean(),
                               rtol=1e-10, atol=0)


def test_nll_gradcheck(rng):
    B, D = 2, 7
    pred = torch.randn(B, D, D, generator=rng, dtype=torch.float64, requires_grad=True)
    images = torch.randn(B, D, D, generator=rng, dtype=torch.float64, requires_grad=True)
    s = (0.5 + torch.rand(B, generator=rng, dtype=torch.float64)).requires_grad_()
    W = _radial_whitening(D, rng)
    assert torch.autograd.gradcheck(lambda p, i, c: gaussian_nll(p, i, W, c), (pred, images, s))
    assert torch.autograd.gradcheck(lambda p, i: gaussian_nll(p, i), (pred, images))
