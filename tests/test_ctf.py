"""CTF values at chosen frequencies against the formula, its sign at zero frequency, and cryoDRGN parity."""
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogs.physics.ctf import apply_ctf, compute_ctf, electron_wavelength

DATA = Path(__file__).parent / "data"


def test_wavelength_at_300_kv():
    assert float(electron_wavelength(torch.tensor(300.0))) == pytest.approx(0.019687, abs=2e-6)


def test_sign_at_zero_frequency_is_relion_plus_w(rng):
    w = float(torch.rand(1, generator=rng)) * 0.2
    ctf = compute_ctf(64, 1.3, 15000.0, 14000.0, 30.0, 300.0, 2.7, w, dtype=torch.float64)
    assert ctf.shape == (1, 64, 33)
    assert float(ctf[0, 0, 0]) == pytest.approx(w, abs=1e-12)


def _formula(kx, ky, dfu, dfv, ang, kv, cs, w, phase, bf):
    """Scalar, written independently from RELION's ctf.h: −sin(χ − arcsin w)·exp(−Bk²/4)."""
    v = kv * 1e3
    lam = 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)
    k2 = kx * kx + ky * ky
    theta = math.atan2(ky, kx)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * math.cos(2 * (theta - math.radians(ang))))
    chi = math.pi * lam * k2 * (-df + 0.5 * cs * 1e7 * lam * lam * k2) - math.radians(phase)
    return -math.sin(chi - math.asin(w)) * math.exp(-bf * k2 / 4)


def test_values_at_chosen_frequencies(rng):
    D, p = 96, 1.1
    r = torch.rand(6, generator=rng, dtype=torch.float64).tolist()
    par = dict(dfu=10000 + 20000 * r[0], dfv=9000 + 20000 * r[1], ang=360 * r[2] - 180, kv=300.0, cs=2.7,
               w=0.1 * r[3], phase=90 * r[4], bf=50 * r[5])
    ctf = compute_ctf(D, p, par["dfu"], par["dfv"], par["ang"], par["kv"], par["cs"], par["w"], par["phase"],
                      par["bf"], dtype=torch.float64)[0]
    for iy, ix in [(0, 1), (1, 0), (5, 7), (D - 3, 11), (D // 2, D // 2), (40, 20), (D - 1, D // 2)]:
        ky = (iy if iy < D // 2 else iy - D) / (D * p)  # numpy fftfreq row, rfftfreq column
        kx = ix / (D * p)
        assert float(ctf[iy, ix]) == pytest.approx(_formula(kx, ky, **par), abs=1e-12), (iy, ix)


def test_matches_cryodrgn_sign_convention_on_real_ctf_params():
    """ctf2.pkl rows are cryoDRGN's [D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase]; cryoDRGN = −RELION."""
    with open(DATA / "ctf2.pkl", "rb") as fh:
        # float64: the pickle holds float32, and float32 arithmetic would round the 1e-10 comparison away
        params = np.asarray(pickle.load(fh), dtype=np.float64)[:3]
    D, apix = int(params[0, 0]), float(params[0, 1])
    ctf = compute_ctf(D, apix, *params[:, 2:9].T, dtype=torch.float64)
    for i, row in enumerate(params):
        kx, ky = 7 / (D * apix), -3 / (D * apix)
        _, _, dfu, dfv, ang, kv, cs, w, phase = row
        cryodrgn = math.sqrt(1 - w * w) * math.sin(_chi(kx, ky, dfu, dfv, ang, kv, cs, phase)) - w * math.cos(
            _chi(kx, ky, dfu, dfv, ang, kv, cs, phase))
        assert float(ctf[i, D - 3, 7]) == pytest.approx(-cryodrgn, abs=1e-10)


def _chi(kx, ky, dfu, dfv, ang, kv, cs, phase):
    v = kv * 1e3
    lam = 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)
    k2 = kx * kx + ky * ky
    df = 0.5 * (dfu + dfv + (dfu - dfv) * math.cos(2 * (math.atan2(ky, kx) - math.radians(ang))))
    return 2 * math.pi * (-0.5 * df * lam * k2 + 0.25 * cs * 1e7 * lam ** 3 * k2 * k2) - math.radians(phase)


def test_apply_ctf_is_a_fourier_multiplication(rng):
    D = 32
    img = torch.randn(2, D, D, generator=rng, dtype=torch.float64)
    one = torch.ones(2, D, D // 2 + 1, dtype=torch.float64)
    assert torch.allclose(apply_ctf(img, one), img, atol=1e-12)
    ctf = compute_ctf(D, 2.0, [12000.0, 20000.0], [11000.0, 19000.0], [10.0, 50.0], 300.0, 2.7, 0.07,
                      dtype=torch.float64)
    out = apply_ctf(img, ctf)
    # the mean is scaled by CTF(0) = w, and the result is real and linear
    assert torch.allclose(out.mean((1, 2)), 0.07 * img.mean((1, 2)), atol=1e-12)
    assert torch.allclose(apply_ctf(2 * img, ctf), 2 * out, atol=1e-12)
