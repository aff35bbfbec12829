"""cryogs.reconstruct.backproject: direct Fourier inversion against cryogs.voxelize of the same Gaussians, and the command."""
import json

import mrcfile
import numpy as np
import pytest
import torch

from cryogs.analysis.fsc import fsc
from cryogs.cli import main as cryogs_main
from cryogs.errors import CryogsError
from cryogs.io.load import load_particles
from cryogs.io.mrc import write_mrc
from cryogs.io.particles import ParticleSet
from cryogs.model.gaussians import GaussianModel
from cryogs.physics.conventions import random_rotations
from cryogs.physics.ctf import apply_ctf, compute_ctf
from cryogs.reconstruct import backproject as backproject_module
from cryogs.reconstruct.backproject import (
    AUTO_START_PIXELS,
    accumulate,
    automatic_start,
    backproject,
    gaussians_on_backprojection,
    reconstruct,
    regularised_backprojection,
    wiener_from_fsc,
)
from cryogs.render.project import project, voxelize
from cryogs.simulate import random_ctf_params, simulate_stack, write_dataset

from cuda_helpers import cpu_ops_or_skip
from helpers import random_mixture

D, P = 32, 1.5  # box (px) and pixel size (Å)
N_IMAGES = 300  # enough central sections to fill the padded Fourier grid out to Nyquist
MAX_SHIFT_PX = 3.0
# Measured over 60 seeds (noise-free, 300 images, box 32): the relative L2 error of the padded
# trilinear gridding stays below 1.1 % (median 0.65 %); with the shift or rotation convention
# reversed it is 30-95 %. (The gridding correction matters little for this centred mixture; the
# off-centre test pins it.)
L2_NO_CTF = 0.015
L2_CTF = 0.04


def _compact_mixture(gen):
    """12 Gaussians (σ 1.5-3 Å, at least one pixel, so the maps are band-limited to well below
    Nyquist) whose 3σ extent plus the largest shift stays inside the box: centres spread 3.4 Å."""
    return random_mixture(12, gen, spread=D * P / 14, scale_range=(1.5, 3.0))


def _particles(tmp_path, images, rotations, shifts_angstrom, ctf=None, **flags) -> ParticleSet:
    n = len(images)
    write_mrc(tmp_path / "stack.mrcs", np.asarray(images, dtype=np.float32), P)
    return ParticleSet(stacks=[str(tmp_path / "stack.mrcs")], stack_id=np.zeros(n), stack_index=np.arange(n),
                       rotations=None if rotations is None else np.asarray(rotations), shifts=np.asarray(shifts_angstrom), pixel_size=P,
                       box_size=D, ctf=ctf, **flags)


def _simulate(gen, n=N_IMAGES):
    """Noise-free projections of a compact mixture in uniform random poses with random shifts."""
    mix = _compact_mixture(gen)
    rotations = random_rotations(n, generator=gen, dtype=torch.float64)
    shifts = (torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * MAX_SHIFT_PX * P
    images = project(*mix, rotations, shifts, box_size=D, pixel_size=P, backend="torch")
    truth = voxelize(*mix, box_size=D, pixel_size=P).numpy()
    return images, rotations, shifts, truth


def _relative_error(volume, truth):
    return float(np.linalg.norm(volume - truth) / np.linalg.norm(truth))


@pytest.mark.statistical
def test_noise_free_projections_give_the_voxelized_mixture(tmp_path, rng):
    """Statistical (seeded: see the ``statistical`` marker). Over 200 seeds none failed."""
    images, rotations, shifts, truth = _simulate(rng)
    volume = backproject(_particles(tmp_path, images, rotations, shifts))
    assert volume.shape == (D, D, D) and volume.dtype == np.float32
    assert _relative_error(volume, truth) < L2_NO_CTF
    # mass per voxel: the total mass is the zero frequency, which the gridding reproduces to ~0.5 %
    assert volume.sum() == pytest.approx(truth.sum(), rel=L2_NO_CTF)
    # the Fourier shells agree up to 3/4 of Nyquist, where the mixture still has power
    _, curve = fsc(volume, truth, pixel_size=P)
    assert curve[: 3 * D // 8 + 1].min() > 0.99


@pytest.mark.statistical
def test_gridding_correction_off_centre(tmp_path, rng):
    """A small blob a quarter box from the centre, where the trilinear kernel's transform is
    Π sinc²(x/2D) ≈ 0.95: uncorrected, its mass would come out 4-6 % low (measured 4.0-6.1 %);
    corrected, only the sampling's non-uniformity remains (measured -0.2 to +1.4 % over 60 seeds).

    Statistical (seeded: see the ``statistical`` marker). Over 200 seeds none failed."""
    means, quats, scales, amps = random_mixture(4, rng, spread=0.7 * P, scale_range=(1.5, 2.25))
    direction = torch.randn(3, generator=rng, dtype=torch.float64)
    means = means + direction / direction.norm() * (D / 4) * P
    rotations = random_rotations(N_IMAGES, generator=rng, dtype=torch.float64)
    shifts = (torch.rand(N_IMAGES, 2, generator=rng, dtype=torch.float64) * 2 - 1) * P
    images = project(means, quats, scales, amps, rotations, shifts, box_size=D, pixel_size=P, backend="torch")
    truth = voxelize(means, quats, scales, amps, box_size=D, pixel_size=P).numpy()
    volume = backproject(_particles(tmp_path, images, rotations, shifts))
    assert volume.sum() == pytest.approx(truth.sum(), rel=0.025)
    assert _relative_error(volume, truth) < 0.03  # measured below 2.2 % (4.7 % or more uncorrected)


@pytest.mark.statistical
def test_reversed_shift_sign_or_transposed_rotation_misses_the_map(tmp_path, rng):
    """The data of the previous test pin both conventions: reversing either one breaks the match.

    Statistical (seeded: see the ``statistical`` marker). Over 200 seeds none failed."""
    images, rotations, shifts, truth = _simulate(rng, n=100)
    reversed_shift = backproject(_particles(tmp_path, images, rotations, -shifts))
    transposed = backproject(_particles(tmp_path, images, rotations.transpose(1, 2), shifts))
    assert _relative_error(reversed_shift, truth) > 10 * L2_NO_CTF
    assert _relative_error(transposed, truth) > 10 * L2_NO_CTF


def _ctf_dataset(gen, n=N_IMAGES, defocus=(500.0, 1500.0)):
    """Noise-free images with per-particle random defoci. The CTF's delocalisation, λ·Δf·k ≤ 10 Å at
    Nyquist, keeps the CTF-filtered images inside the 48 Å box (the module's stated assumption)."""
    images, rotations, shifts, truth = _simulate(gen, n)
    params = random_ctf_params(n, defocus, seed=int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    ctf = compute_ctf(D, P, params["defocus_u"], params["defocus_v"], params["defocus_angle"], params["voltage"],
                      params["cs"], params["amplitude_contrast"], dtype=torch.float64)
    return images, rotations, shifts, truth, params, ctf


@pytest.mark.statistical
def test_wiener_reconstruction_with_ctf_recovers_the_map(tmp_path, rng):
    """Statistical (seeded: see the ``statistical`` marker). Over 200 seeds none failed."""
    images, rotations, shifts, truth, params, ctf = _ctf_dataset(rng)
    sums = accumulate(_particles(tmp_path, apply_ctf(images, ctf), rotations, shifts, ctf=params))
    # With CTF weights the gridding averages samples of unequal weight, which costs accuracy where
    # the CTF is steep (measured over 60 seeds: below 3 %, median 2 %).
    assert _relative_error(reconstruct(sums), truth) < L2_CTF
    # A constant λ shrinks every Fourier voxel by W / (W + λ). Here Σ CTF² per voxel has a median
    # of about 3.4 and a 1st percentile of 0.7, so λ = 0.02 shrinks 99 % of the voxels by less than
    # 3 % (the median by 0.6 %): at most 3 % more error.
    assert _relative_error(reconstruct(sums, 0.02), truth) < L2_CTF + 0.03
    # and a strong λ pulls the map towards zero, as Wiener filtering should
    assert np.linalg.norm(reconstruct(sums, 100.0)) < 0.5 * np.linalg.norm(truth)


@pytest.mark.statistical
def test_premultiplied_and_phase_flipped_data_give_the_same_map(tmp_path, rng):
    """CTF·(CTF·X) with the premultiplied flag and |CTF|·X with the phase-flipped flag both reduce
    to the numerator CTF²·X and weight CTF² of plain CTF data: the maps agree to rounding.

    Statistical (seeded: see the ``statistical`` marker), not exact: over random draws 0–39 the
    largest difference was 1e-5 of the map's maximum at the median, but draw 27 gave 1.5 % (and one
    of CI's fresh draws 1.3e-4), with the torch gridding as with the C++ one. Some inputs disagree
    beyond rounding. Most of it is the Nyquist line of the even box, where an astigmatic CTF applied
    through rfft2/irfft2 is not Hermitian, so c applied twice and c² once differ (draw 27 with the
    images' Nyquist row and column zeroed: 1.3e-4); not fixed yet."""
    images, rotations, shifts, _, params, ctf = _ctf_dataset(rng, n=64)  # exact: no need to fill the grid
    maps = []
    for folder, data, flags in (("plain", apply_ctf(images, ctf), {}),
                                ("premultiplied", apply_ctf(images, ctf * ctf), {"ctf_premultiplied": True}),
                                ("flipped", apply_ctf(images, ctf.abs()), {"ctf_phase_flipped": True})):
        (tmp_path / folder).mkdir()
        particles = _particles(tmp_path / folder, data, rotations, shifts, ctf=params, **flags)
        maps.append(backproject(particles, wiener=0.02))
    scale = np.abs(maps[0]).max()
    # float32 images and CTF values: rounding at the 1e-6 level of the map's maximum
    np.testing.assert_allclose(maps[1], maps[0], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(maps[2], maps[0], rtol=0, atol=1e-4 * scale)


def test_wiener_from_fsc_closed_form():
    fsc_curve = np.array([1.0, 0.9, 0.5, 0.1, 0.0, -0.2])
    mean_weight = np.array([8.0, 6.0, 4.0, 3.0, 2.0, 1.0])
    lam = wiener_from_fsc(fsc_curve, mean_weight)
    # λ = W̄ (1 − FSC) / FSC with FSC clipped to [0.001, 0.999]
    expected = mean_weight * np.array([0.001 / 0.999, 0.1 / 0.9, 1.0, 9.0, 999.0, 999.0])
    np.testing.assert_allclose(lam, expected, rtol=1e-12)


def test_per_shell_wiener_needs_one_value_per_shell(tmp_path, rng):
    images, rotations, shifts, _ = _simulate(rng, n=8)
    with pytest.raises(CryogsError, match="17 values"):
        backproject(_particles(tmp_path, images, rotations, shifts), wiener=np.ones(5))


def test_particles_without_poses_are_refused(tmp_path, rng):
    images, _, shifts, _ = _simulate(rng, n=4)
    with pytest.raises(CryogsError, match="no poses"):
        backproject(_particles(tmp_path, images, None, shifts))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny noisy data set with CTF and shifts, written as RELION 3.1 (box 24, 2 Å)."""
    gen = torch.Generator().manual_seed(7)
    model = GaussianModel(torch.randn(8, 3, generator=gen) * 5, torch.randn(8, 4, generator=gen),
                          torch.full((8, 3), 2.5), torch.ones(8))
    stack = simulate_stack(model, 160, box_size=24, pixel_size=2.0, snr=2.0, max_shift=3.0, seed=3,
                           ctf=random_ctf_params(160, (1000.0, 2500.0), seed=3))
    return write_dataset(tmp_path_factory.mktemp("bp_data"), model, stack, box_size=24, pixel_size=2.0)


def test_command_writes_half_maps_fsc_and_metrics(tmp_path, dataset):
    out = tmp_path / "bp"
    assert cryogs_main(["backproject", str(dataset["star"]), "--out", str(out), "--no-progress",
                        "--reference", str(dataset["map"]), "--device", "cpu"]) == 0
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "fsc.png", "slices.png", "fsc_reference.png",
                 "metrics.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_particles"] == 160 and sum(metrics["half_sizes"]) == 160
    assert metrics["device"] == "cpu" and metrics["wall_seconds"] > 0
    # resolutions lie between Nyquist (4 Å) and the box (48 Å)
    for key in ("fsc_half_0.143_angstrom", "fsc_half_0.5_angstrom", "fsc_0.5_angstrom"):
        assert 4.0 <= metrics[key] < 48.0, key
    assert isinstance(metrics["fsc_half_nyquist_limited"], bool)
    assert len(metrics["wiener_per_shell"]) == 13
    with mrcfile.open(out / "map.mrc") as m:
        assert m.data.shape == (24, 24, 24)
        assert m.voxel_size.x == pytest.approx(2.0)
    # the full-data map is nearer the truth than either half
    truth = mrcfile.read(dataset["map"])
    errors = {name: _relative_error(mrcfile.read(out / name), truth) for name in ("map.mrc", "half1.mrc", "half2.mrc")}
    assert errors["map.mrc"] < min(errors["half1.mrc"], errors["half2.mrc"]), errors


def test_regularised_backprojection_is_the_commands_map(tmp_path, dataset):
    """What ``reconstruct --init backproject`` starts from is the map ``cryogs backproject`` writes,
    and it depends on the seed of the half split (the Wiener λ comes from that split's FSC)."""
    out = tmp_path / "bp"
    assert cryogs_main(["backproject", str(dataset["star"]), "--out", str(out), "--no-progress", "--device", "cpu",
                        "--seed", "4"]) == 0
    particles = load_particles(dataset["star"])
    written = mrcfile.read(out / "map.mrc")
    np.testing.assert_allclose(regularised_backprojection(particles, seed=4), written, rtol=0,
                               atol=1e-5 * np.abs(written).max())
    assert np.abs(regularised_backprojection(particles, seed=5) - written).max() > 1e-3 * np.abs(written).max()


def test_start_on_the_backprojection_needs_two_particles(dataset):
    particles = load_particles(dataset["star"])
    assert len(gaussians_on_backprojection(particles.subset(np.arange(2)), 5)) == 5
    with pytest.raises(CryogsError, match="--init random"):
        gaussians_on_backprojection(particles.subset(np.arange(1)), 5)


def test_automatic_start_on_a_resolved_map_and_random_on_noise(dataset):
    """--init auto: Gaussians on the backprojection when its half maps agree to AUTO_START_PIXELS or
    finer (the SNR 2 fixture: about 3 px), none (random ones) when they do not agree at all (the same
    particles' images replaced by pure noise)."""
    particles = load_particles(dataset["star"])
    model, why = automatic_start(particles, 20, seed=1)
    assert len(model) == 20 and why.startswith("on the backprojection")
    pixels = float(why.split("(")[1].split(" px")[0])
    assert pixels <= AUTO_START_PIXELS

    noise = np.random.default_rng(5).normal(size=(len(particles), 24, 24)).astype(np.float32)
    particles.images = lambda idx: noise[np.asarray(idx)]
    model, why = automatic_start(particles, 20, seed=1)
    assert model is None and why.startswith("random Gaussians")
    with pytest.raises(CryogsError, match="--init random"):
        automatic_start(particles.subset(np.arange(1)), 5)


def test_cpu_gridding_matches_the_torch_one(rng):
    """csrc/grid_cpu.cpp against the eight index_add_ passes, float64: samples anywhere in the half grid,
    y and z wrapping at both ends, several channels; a sample outside is an error, not a stray write."""
    ops = cpu_ops_or_skip()
    Dp, n = 16, 4000
    nx = Dp // 2 + 1
    rng = np.random.default_rng(int(torch.randint(2 ** 31, (1,), generator=rng)))
    k = np.stack([rng.uniform(0, Dp / 2 - 1e-9, n), rng.uniform(-Dp / 2, Dp / 2, n), rng.uniform(-Dp, Dp, n)], 1)
    k[:8, 0] = 0.0  # the kx = 0 plane
    k[8:16, 1:] = [-Dp / 2, Dp - 1e-9]  # the wrapping edges
    k, values = torch.from_numpy(k), torch.from_numpy(rng.normal(size=(n, 3)))
    ours, theirs = (torch.zeros(Dp * Dp * nx, 3, dtype=torch.float64) for _ in range(2))
    ops.cpu_grid_trilinear(ours, k, values, Dp)
    backproject_module._splat_torch(theirs, k, values, Dp)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-12)
    assert ours.abs().sum() > 0
    outside = k.clone()
    outside[3, 0] = Dp / 2  # x + 1 beyond the half grid
    with pytest.raises(RuntimeError, match="outside the half grid"):
        ops.cpu_grid_trilinear(ours, outside, values, Dp)
    for bad in (ours.float(), ours[:, :2]):  # dtype, channels
        with pytest.raises(RuntimeError, match="sums"):
            ops.cpu_grid_trilinear(bad, k, values, Dp)


def test_command_without_half_maps_uses_the_constant_wiener(tmp_path, dataset):
    out = tmp_path / "bp"
    assert cryogs_main(["backproject", str(dataset["star"]), "--out", str(out), "--no-progress",
                        "--no-half-maps", "--wiener", "0.1", "--device", "cpu"]) == 0
    assert (out / "map.mrc").exists() and not (out / "half1.mrc").exists()
    assert json.loads((out / "metrics.json").read_text())["wiener"] == 0.1


def test_command_refuses_a_stack_without_poses(tmp_path, dataset, capsys):
    assert cryogs_main(["backproject", str(dataset["stack"]), "--out", str(tmp_path / "bp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs poses" in err[0]


@pytest.mark.cuda
def test_cuda_matches_cpu(tmp_path, rng):
    images, rotations, shifts, _ = _simulate(rng, n=64)
    particles = _particles(tmp_path, images, rotations, shifts)
    cpu, gpu = backproject(particles), backproject(particles, device="cuda")
    # float64 sums on both; only the order of the atomic additions differs
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-5 * np.abs(cpu).max())
