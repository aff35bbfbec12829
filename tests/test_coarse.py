"""The coarse-to-fine schedule: Fourier-cropped images, their CTF and noise filter on the cropped grid,
and a trainer that fits the coarse images first."""
import numpy as np
import pytest
import torch

from cryogs.io.load import load_particles
from cryogs.io.particles import fourier_crop
from cryogs.model.gaussians import GaussianModel
from cryogs.physics.ctf import compute_ctf, particle_ctf
from cryogs.physics.fourier import crop_half_spectrum, fourier_crop_tensor
from cryogs.reconstruct.config import default_config
from cryogs.reconstruct.fit import Stage, run_training
from cryogs.render.project import project
from cryogs.simulate import random_ctf_params, simulate_stack, write_dataset

from helpers import random_mixture, random_poses


@pytest.mark.parametrize("D, d", [(64, 32), (48, 24), (40, 20)])
def test_cropped_ctf_is_the_ctf_of_the_cropped_grid(rng, D, d):
    """The CTF on the full grid, cropped, equals the CTF computed for the cropped box and its larger
    pixel: the kept entries are the same physical frequencies (to float32 rounding of χ ~ 10²)."""
    n, p = 5, 1.2
    u = 5000 + 20000 * torch.rand(n, generator=rng, dtype=torch.float64)
    args = (u, u - 300 * torch.rand(n, generator=rng, dtype=torch.float64),
            360 * torch.rand(n, generator=rng, dtype=torch.float64), 300.0, 2.7, 0.1, 0.0, 50.0)
    full = compute_ctf(D, p, *args, dtype=torch.float64)
    small = compute_ctf(d, p * D / d, *args, dtype=torch.float64)
    torch.testing.assert_close(crop_half_spectrum(full, d), small, rtol=0, atol=1e-9)


def test_tensor_crop_matches_numpy_crop_and_keeps_mass(rng):
    images = torch.randn(3, 2, 36, 36, generator=rng, dtype=torch.float64)
    small = fourier_crop_tensor(images, 18)
    np.testing.assert_allclose(small.numpy(), fourier_crop(images.numpy(), 18), atol=1e-5)
    torch.testing.assert_close(small.sum((-2, -1)), images.sum((-2, -1)))


def test_rendering_coarse_equals_cropping_the_full_rendering(rng):
    """Γ rendered at half the box with twice the pixel equals Γ at full size, Fourier-cropped, for
    Gaussians at least 1.5 coarse pixels wide: the centre convention (index D//2 → d//2) and the
    mass per pixel agree. Both are rendered exactly (dense); what differs is the coarse samples'
    aliasing, the part of each Gaussian's spectrum beyond the coarse Nyquist, below
    exp(−2π²σ²/4) ≈ 1.5e-5 of its mass at σ = 1.5 coarse pixels.

    Every input keeps the images' edges empty, as Fourier cropping needs (it treats the image as
    periodic): centres within 4 Å per axis, shifts within 3 Å per axis, so each projected centre is
    at least 48 − 4√3 − 3√2 = 36.8 Å from the edge, 4.9 σ of the widest Gaussian (a tail of 6e-6
    of its peak). (With a 72 Å box and unbounded centres, 1 % of draws failed at the edge.)"""
    D, d, p = 64, 32, 1.5
    means, quats, scales, amps = random_mixture(15, rng, spread=6.0, scale_range=(3 * p, 5 * p))
    means = means.clamp(-4.0, 4.0)
    rot, shifts = random_poses(4, rng, max_shift=3.0)
    full = project(means, quats, scales, amps, rot, shifts, box_size=D, pixel_size=p, backend="dense")
    coarse = project(means, quats, scales, amps, rot, shifts, box_size=d, pixel_size=p * D / d, backend="dense")
    peak = float(coarse.abs().max())
    torch.testing.assert_close(fourier_crop_tensor(full, d), coarse, rtol=0, atol=1e-3 * peak)


def _small_dataset(tmp_path, rng, snr=float("inf")):
    means, quats, scales, amps = random_mixture(24, rng, spread=6.0, scale_range=(2.0, 3.5), dtype=torch.float32)
    truth = GaussianModel(means.clamp(-14, 14), quats, scales, amps)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    stack = simulate_stack(truth, 400, box_size=32, pixel_size=2.0, snr=snr, max_shift=2.0, seed=seed,
                           ctf=random_ctf_params(400, (8000.0, 20000.0), seed=seed))
    return write_dataset(tmp_path / "data", truth, stack, box_size=32, pixel_size=2.0)


@pytest.mark.statistical
def test_coarse_stage_fits_the_low_resolution(tmp_path, rng):
    """Fitted on coarse images only (``coarse=1``), the model's full-size projections, Fourier-cropped
    to the coarse box, match the noise-free data cropped alike to a small fraction of their energy;
    the stage in use and the scale floor follow the schedule.

    Statistical (seeded: see the ``statistical`` marker). Over 200 seeds none failed."""
    files = _small_dataset(tmp_path, rng)
    particles = load_particles(files["star"])
    config = default_config(particles, epochs=3, batch_size=16, n_gaussians=40, coarse=1.0)
    trainer = run_training(particles, config, tmp_path / "run", progress=False)
    assert trainer.coarse_steps == trainer.total_steps and trainer.stage() is trainer.full
    assert isinstance(trainer.coarse, Stage) and trainer.coarse.box == 16 and trainer.coarse.pixel == 4.0
    assert float(trainer.model.scales.detach().min()) >= trainer.coarse.min_scale - 1e-4
    idx = np.arange(64)
    with torch.no_grad():
        pred = trainer.render(trainer.rotations[:64], trainer.shifts[:64], particle_ctf(particles, idx))
    data = torch.from_numpy(particles.images(idx))
    resid = fourier_crop_tensor(pred - data, 16)
    ratio = float((resid ** 2).sum() / (fourier_crop_tensor(data, 16) ** 2).sum())
    assert ratio < 0.05
