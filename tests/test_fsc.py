"""FSC against closed forms: identity, independent noise, signal + noise with a known SNR curve."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from cryogs.analysis.fsc import Resolution, fsc, plot_fsc, resolution_at, soft_spherical_mask
from cryogs.errors import CryogsError


def _brute_force_fsc(a, b):
    """Full-space fftn, explicit shells: the definition, with no half-space bookkeeping."""
    D = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(D) * D
    r = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2))
    out = []
    for i in range(D // 2 + 1):
        s = r == i
        out.append((fa[s] * np.conj(fb[s])).real.sum() / np.sqrt((abs(fa[s]) ** 2).sum() * (abs(fb[s]) ** 2).sum()))
    return np.array(out), np.array([(r == i).sum() for i in range(D // 2 + 1)])


@pytest.mark.parametrize("D", [16, 15])
def test_matches_full_space_definition(D):
    rng = np.random.default_rng(D)
    a = rng.standard_normal((D, D, D))
    b = a + 2 * rng.standard_normal((D, D, D))
    freqs, curve, counts = fsc(a, b, pixel_size=1.5, return_counts=True)
    ref, ref_counts = _brute_force_fsc(a, b)
    np.testing.assert_allclose(curve, ref, atol=1e-12)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(freqs, np.arange(D // 2 + 1) / (D * 1.5))


def test_identity_scale_and_sign():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 32, 32))
    freqs, c = fsc(a, a, pixel_size=2.0)
    assert len(freqs) == 17 and freqs[-1] == pytest.approx(1 / 4.0)  # Nyquist 1/(2p)
    np.testing.assert_allclose(c, 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(a, 3.0 * a + 0.0, pixel_size=2.0)[1], 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(a, -a, pixel_size=2.0)[1], -1.0, atol=1e-12)
    r = resolution_at(freqs, c, 0.143)
    assert r == pytest.approx(4.0) and r.nyquist_limited


def test_independent_noise_is_near_zero():
    rng = np.random.default_rng(7)
    D = 48
    a, b = rng.standard_normal((2, D, D, D))
    _, c, n = fsc(a, b, pixel_size=1.0, return_counts=True)
    z = c[1:] * np.sqrt(n[1:])  # each ~ N(0, 1)
    assert np.all(np.abs(c[2:]) < 3.0 / np.sqrt(n[2:]))
    assert 0.6 < z.std() < 1.4 and abs(z.mean()) < 3 / math.sqrt(len(z))


def test_signal_plus_noise_matches_snr_curve():
    """map_i = s + n_i, s Gaussian-filtered white noise: FSC(k) = SNR/(1+SNR), SNR = H(k)² σs²/σn²."""
    rng = np.random.default_rng(3)
    D, sigma_k, noise_var, apix = 48, 8.0, 0.05, 1.3
    w, n1, n2 = rng.standard_normal((3, D, D, D))
    k = np.fft.fftfreq(D) * D
    kx = np.fft.rfftfreq(D) * D
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    H = np.exp(-k2 / (2 * sigma_k**2))
    s = np.fft.irfftn(np.fft.rfftn(w) * H, s=(D, D, D), axes=(0, 1, 2))
    std = math.sqrt(noise_var)
    freqs, c, counts = fsc(s + std * n1, s + std * n2, pixel_size=apix, return_counts=True)
    # Expected: shell average of H² (H varies a little within a rounded shell).
    shell = np.rint(np.sqrt(k2)).astype(int)
    h2 = np.array([np.mean(H[shell == i] ** 2) for i in range(D // 2 + 1)])
    expected = h2 / (h2 + noise_var)
    tol = 4.0 / np.sqrt(counts) + 0.02
    assert np.all(np.abs(c[2:] - expected[2:]) < tol[2:])
    assert c[3] > 0.9 and c[-1] < 0.05  # the curve really does fall: the test can tell
    # Resolution at 0.5 and 0.143 from the closed form H² = noise_var·t/(1-t).
    for t in (0.5, 0.143):
        k_cross = sigma_k * math.sqrt(-math.log(noise_var * t / (1 - t)))
        res = resolution_at(freqs, c, t)
        assert not res.nyquist_limited
        assert res == pytest.approx(D * apix / k_cross, rel=0.06)


def test_mask_is_applied_to_both_maps():
    rng = np.random.default_rng(5)
    D, apix = 32, 2.0
    a, b = rng.standard_normal((2, D, D, D))
    m = soft_spherical_mask(D, 20.0 / apix, 8.0 / apix)
    ref = fsc(a * m, b * m, pixel_size=apix)[1]
    got = fsc(a, b, pixel_size=apix, mask_radius=20.0, soft_edge=8.0)[1]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert not np.allclose(got, fsc(a, b, pixel_size=apix)[1])


def test_soft_mask_closed_form():
    m = soft_spherical_mask(33, 8.0, 4.0)
    c = 16
    assert m.shape == (33, 33, 33) and m.dtype == np.float32
    assert m[c, c, c] == 1.0 and m[c, c, c + 8] == 1.0
    assert m[c, c, c + 10] == pytest.approx(0.5)  # halfway through the cosine edge
    assert m[c, c, c + 9] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert m[c, c, c + 12] == 0.0 and m[0, 0, 0] == 0.0
    hard = soft_spherical_mask(9, 2.0, 0.0)
    assert hard.sum() == sum(1 for x in range(-4, 5) for y in range(-4, 5) for z in range(-4, 5)
                             if x * x + y * y + z * z <= 4)


def test_resolution_interpolation():
    freqs = np.array([0.0, 0.1, 0.2, 0.3])
    curve = np.array([1.0, 0.9, 0.3, 0.1])
    # 0.5 lies between 0.1 (0.9) and 0.2 (0.3): f = 0.1 + 0.1·(0.4/0.6)
    r = resolution_at(freqs, curve, 0.5)
    assert isinstance(r, Resolution) and isinstance(r, float)
    assert r == pytest.approx(1 / (0.1 + 0.1 * 0.4 / 0.6)) and not r.nyquist_limited
    # Only the first crossing counts, even if the curve comes back up.
    assert resolution_at(freqs, np.array([1.0, 0.1, 0.9, 0.9]), 0.5) == pytest.approx(1 / (0.1 * 0.5 / 0.9))
    never = resolution_at(freqs, np.array([1.0, 0.99, 0.98, 0.97]), 0.143)
    assert never == pytest.approx(1 / 0.3) and never.nyquist_limited
    assert resolution_at(freqs, np.array([0.1, 0.0, 0.0, 0.0]), 0.5) == math.inf


def test_bad_inputs():
    a = np.zeros((8, 8, 8))
    with pytest.raises(CryogsError, match="same shape"):
        fsc(a, np.zeros((8, 8, 9)), pixel_size=1.0)
    with pytest.raises(CryogsError, match="cubic"):
        fsc(np.zeros((8, 8, 9)), np.zeros((8, 8, 9)), pixel_size=1.0)
    b = a.copy()
    b[1, 2, 3] = np.nan
    with pytest.raises(CryogsError, match="NaN"):
        fsc(a, b, pixel_size=1.0)
    # Empty maps: no power anywhere gives 0, not NaN.
    assert np.all(fsc(a, a, pixel_size=1.0)[1] == 0.0)


def test_torch_input():
    torch = pytest.importorskip("torch")
    a = torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(fsc(a, a, pixel_size=1.0)[1], 1.0, atol=1e-6)


def test_plot_fsc(tmp_path):
    freqs = np.arange(17) / (32 * 2.0)
    curves = {"half maps": (freqs, np.exp(-((freqs * 10) ** 2))), "model vs map": (freqs, np.ones(17))}
    out = tmp_path / "fsc.png"
    plot_fsc(out, curves, title="test", mask="no mask")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert os.listdir(tmp_path) == ["fsc.png"]  # the temporary file was renamed, not left behind
    plot_fsc(tmp_path / "fsc.pdf", curves, mask="no mask")
    assert (tmp_path / "fsc.pdf").read_bytes()[:4] == b"%PDF"
