"""End-to-end: simulate → reconstruct recovers the map; checkpoints resume; outputs are complete."""
import json
import math

import numpy as np
import pytest
import torch

from cryogs.analysis.evaluate import compare_maps
from cryogs.io.load import load_particles
from cryogs.io.mrc import read_mrc
from cryogs.model.gaussians import GaussianModel
from cryogs.reconstruct.config import default_config
from cryogs.reconstruct.fit import run_training
from cryogs.simulate import random_ctf_params, simulate_stack, write_dataset

from helpers import random_mixture


def _dataset(tmp_path, gen, *, n_particles=500, box=32, apix=2.0, n_gauss=20, snr=float("inf"), defocus=None):
    means, quats, scales, amps = random_mixture(n_gauss, gen, spread=6.0, scale_range=(2.0, 3.5),
                                                dtype=torch.float32)
    truth = GaussianModel(means.clamp(-14, 14), quats, scales, amps)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    ctf = None if defocus is None else random_ctf_params(n_particles, defocus, seed=seed)
    stack = simulate_stack(truth, n_particles, box_size=box, pixel_size=apix, snr=snr, max_shift=2.0,
                           seed=seed, ctf=ctf)
    files = write_dataset(tmp_path / "data", truth, stack, box_size=box, pixel_size=apix)
    return truth, files


def _fit_and_compare(files, **overrides):
    particles = load_particles(files["star"])
    trainer = run_training(particles, default_config(particles, **overrides), files["star"].parent / "run",
                           progress=False)
    ref, _ = read_mrc(files["map"])
    metrics, _, _ = compare_maps(trainer.volume(), ref, particles.pixel_size)
    return particles, metrics


@pytest.mark.statistical
def test_recovers_20_gaussian_model_from_500_noise_free_images(tmp_path, rng):
    """Statistical (seeded: see the ``statistical`` marker). Over 32 seeds none failed."""
    _, files = _dataset(tmp_path, rng)
    particles, metrics = _fit_and_compare(files)
    assert particles.ctf is None
    assert metrics["fsc_0.5_angstrom"] <= 2.5 * particles.pixel_size, metrics["fsc_0.5_angstrom"]
    assert metrics["correlation"] > 0.99


@pytest.mark.statistical
def test_ctf_round_trip_simulate_then_reconstruct(tmp_path, rng):
    """Images made with a CTF, fitted with the CTF read back from the STAR file: FSC(0.5) ≤ 3 px.

    Statistical (seeded: see the ``statistical`` marker). Over 50 seeds none failed."""
    _, files = _dataset(tmp_path, rng, defocus=(8000.0, 20000.0))
    particles, metrics = _fit_and_compare(files, n_gaussians=60)  # 3× the truth's; the default N is tested above
    assert particles.ctf is not None and particles.ctf["defocus_u"].min() >= 8000
    assert metrics["fsc_0.5_angstrom"] <= 3 * particles.pixel_size, metrics["fsc_0.5_angstrom"]


def test_outputs_and_resume(tmp_path, rng, monkeypatch):
    _, files = _dataset(tmp_path, rng, n_particles=64, box=24)
    particles = load_particles(files["star"])
    config = default_config(particles, epochs=2, n_gaussians=30, batch_size=16)
    out = tmp_path / "run"
    full = run_training(particles, config, out, progress=False)
    metrics = full.write_outputs()
    for name in ["map.mrc", "gaussians.npz", "gaussians.pt", "gaussians.ply", "loss.png", "montage.png",
                 "slices.png", "gaussians.png", "metrics.json", "config.json", "checkpoint.pt"]:
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text())["n_gaussians"] == 30 == metrics["n_gaussians"]
    # a run killed right after its epoch-1 checkpoint, then resumed, ends where the uninterrupted run did
    from cryogs.reconstruct.fit import Trainer

    save = Trainer.save_checkpoint

    def save_then_die(self):
        save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(particles, config, tmp_path / "split", progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = run_training(particles, config, tmp_path / "split", resume=True, progress=False)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert len(resumed.losses) == len(full.losses)


def test_gaussian_files_round_trip(tmp_path, rng):
    model = GaussianModel(*random_mixture(9, rng, dtype=torch.float32))
    for ext in ("npz", "pt"):
        model.save(tmp_path / f"g.{ext}")
        back = GaussianModel.load(tmp_path / f"g.{ext}")
        for k, v in model.arrays().items():
            np.testing.assert_allclose(back.arrays()[k], v, rtol=1e-6, atol=1e-6)
    model.save(tmp_path / "g.ply")
    raw = (tmp_path / "g.ply").read_bytes()
    header, body = raw.split(b"end_header\n")
    assert b"element vertex 9" in header and b"property float rot_3" in header
    assert len(body) == 9 * 17 * 4
    xyz = np.frombuffer(body, "<f4").reshape(9, 17)[:, :3]
    np.testing.assert_allclose(xyz, model.arrays()["means"], rtol=1e-6)


def test_model_from_atoms_per_residue_preserves_mass_and_centre():
    from pathlib import Path

    from cryogs.io.atoms import AtomSet

    atoms = AtomSet.read(Path(__file__).parent / "data" / "1uao.pdb")
    per_atom = GaussianModel.from_atoms(atoms, per="atom")
    per_res = GaussianModel.from_atoms(atoms, per="residue")
    assert len(per_res) == 10  # chignolin has 10 residues
    m_atom, m_res = per_atom.arrays(), per_res.arrays()
    assert m_res["amplitudes"].sum() == pytest.approx(m_atom["amplitudes"].sum(), rel=1e-6)
    # the mass-weighted centre is the origin (centred on read)
    centre = (m_res["means"] * m_res["amplitudes"][:, None]).sum(0) / m_res["amplitudes"].sum()
    np.testing.assert_allclose(centre, 0, atol=1e-3)
    # no heavy-atom element misread from blank element columns: only H, C, N, O (Z ≤ 8)
    assert set(np.unique(atoms.mass)) <= {1.0, 6.0, 7.0, 8.0}


def test_model_from_map_peaks(rng):
    from cryogs import voxelize

    D, p = 32, 2.0
    means = torch.tensor([[-10.0, 0.0, 4.0], [8.0, 6.0, -6.0], [0.0, -12.0, 0.0]])
    truth = GaussianModel(means, torch.tensor([[1.0, 0, 0, 0]] * 3), torch.full((3, 3), 2.0), torch.ones(3) * 5)
    vol = voxelize(*[t.detach() for t in truth()], box_size=D, pixel_size=p).numpy()
    model = GaussianModel.from_map(vol, p, n=3)
    found = model.arrays()["means"]
    d = np.linalg.norm(found[:, None] - means.numpy()[None], axis=-1).min(1)
    assert (d < 1e-3).all()
    assert model.arrays()["amplitudes"].sum() == pytest.approx(vol.sum(), rel=1e-5)


@pytest.mark.statistical
def test_model_from_map_fills_up_to_n_where_the_mass_is(rng):
    """A map with fewer maxima than n: the peaks come first, the rest are drawn ∝ density, so a
    cluster with 4× the mass gets more of the Gaussians (4:1 expected) and none land in empty space.

    Statistical (seeded: see the ``statistical`` marker). Over 300 seeds none failed (the distance tail's risk is ≤
    3e-4 a draw)."""
    from cryogs import voxelize

    r = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))
    D, p, sigma = 32, 2.0, 2.0
    direction = r.normal(size=3)
    offset = np.round(9.0 * direction / np.linalg.norm(direction) / p) * p  # on the grid, ~18 Å apart
    means = torch.tensor(np.stack([offset, -offset]), dtype=torch.float32)
    mass = torch.tensor([1.0, 4.0]) * float(r.uniform(1, 10))
    truth = GaussianModel(means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), sigma), mass)
    vol = voxelize(*[t.detach() for t in truth()], box_size=D, pixel_size=p).numpy()
    n, seed = int(r.integers(40, 80)), int(r.integers(1 << 30))
    model = GaussianModel.from_map(vol, p, n, seed=seed)
    found = model.arrays()
    assert len(model) == n
    nearest = np.linalg.norm(found["means"][:2, None] - means.numpy()[None], axis=-1).min(1)
    assert (nearest < 1e-3).all()  # the two peaks first
    dist = np.linalg.norm(found["means"][:, None] - means.numpy()[None], axis=-1)
    # the smoothed map has σ = √(σ² + 1 voxel²); drawn voxels are jittered by up to √3/2 voxel
    assert dist.min(1).max() < 5 * math.hypot(sigma, p) + math.sqrt(3) / 2 * p
    counts = np.bincount(dist.argmin(1), minlength=2)
    assert counts[1] > counts[0] > 0  # expected 4:1 of n − 2 draws; a tie or worse is a > 4σ event
    assert found["amplitudes"].sum() == pytest.approx(np.clip(vol, 0, None).sum(), rel=1e-5)
    again = GaussianModel.from_map(vol, p, n, seed=seed).arrays()["means"]
    other = GaussianModel.from_map(vol, p, n, seed=seed + 1).arrays()["means"]
    np.testing.assert_array_equal(again, found["means"])
    assert not np.allclose(other, found["means"])


def test_half_split_uses_random_subset_when_it_has_both_halves(tmp_path, rng):
    from cryogs.reconstruct.half_maps import half_split

    _, files = _dataset(tmp_path, rng, n_particles=10, box=16)
    particles = load_particles(files["star"])
    particles.random_subset = np.array([1, 2, 2, 1, 1, 2, 1, 2, 2, 2])
    h1, h2, how = half_split(particles, seed=0)
    assert how == "rlnRandomSubset" and list(h1) == [0, 3, 4, 6] and len(h2) == 6
    particles.random_subset = None
    h1, h2, how = half_split(particles, seed=0)
    assert how.startswith("random") and sorted(np.concatenate([h1, h2])) == list(range(10))
    assert len(h1) == 5 and set(h1).isdisjoint(h2)


def test_streaming_from_disk_matches_the_in_memory_cache(tmp_path, rng, monkeypatch):
    """Stacks over the cache limit are read batch by batch; the fit is the same."""
    import cryogs.reconstruct.fit as train

    _, files = _dataset(tmp_path, rng, n_particles=40, box=16, defocus=(9000.0, 12000.0))
    particles = load_particles(files["star"])
    config = default_config(particles, epochs=2, n_gaussians=12, batch_size=8)
    cached = run_training(particles, config, tmp_path / "cached", progress=False)
    assert cached.cache is not None
    monkeypatch.setattr(train, "PRELOAD_BYTES", 0)
    streamed = run_training(load_particles(files["star"]), config, tmp_path / "streamed", progress=False)
    assert streamed.cache is None and streamed.loader is not None
    # compare what the model means physically: quaternions of near-isotropic Gaussians are ill-defined
    # (Adam turns their rounding-level gradients into full steps), their covariances are not
    from cryogs.render.gaussian_math import covariance_3d

    a, b = cached.model.arrays(), streamed.model.arrays()
    for k in ("means", "amplitudes"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-3)
    cov = [covariance_3d(torch.from_numpy(m["quats"]), torch.from_numpy(m["scales"])) for m in (a, b)]
    assert torch.allclose(cov[0], cov[1], rtol=1e-3, atol=1e-2)  # Å², against entries of ~10 Å²


def test_resume_before_the_first_checkpoint_starts_afresh(tmp_path, rng):
    _, files = _dataset(tmp_path, rng, n_particles=16, box=16)
    particles = load_particles(files["star"])
    config = default_config(particles, epochs=1, n_gaussians=5, batch_size=8)
    trainer = run_training(particles, config, tmp_path / "new", resume=True, progress=False)
    assert trainer.epoch == 1 and (tmp_path / "new" / "checkpoint.pt").exists()


def test_phase_flipped_and_premultiplied_ctf(tmp_path, rng):
    import starfile

    from cryogs.physics.ctf import particle_ctf

    _, files = _dataset(tmp_path, rng, n_particles=4, box=16, defocus=(9000.0, 12000.0))
    plain = particle_ctf(load_particles(files["star"]), np.arange(4))
    assert (plain < 0).any()
    for column, expected in [("rlnCtfDataArePhaseFlipped", plain.abs()), ("rlnCtfDataAreCtfPremultiplied", plain ** 2)]:
        star = starfile.read(files["star"])
        star["optics"][column] = 1
        starfile.write(star, files["star"].parent / "flag.star")
        got = particle_ctf(load_particles(files["star"].parent / "flag.star"), np.arange(4))
        assert torch.allclose(got, expected, atol=1e-6), column


@pytest.mark.parametrize("defocus", [None, (10000.0, 25000.0), (15000.0, 15000.0)])
@pytest.mark.statistical
def test_particle_extent_from_ctf_modulated_noisy_images(tmp_path, rng, defocus):
    """The radius and mass that set N, the initial sphere, the density-control and noise masks: from
    256 noisy (SNR 1) images with a CTF, equal to those of the same poses' clean projections without a
    CTF (1.1 × their mean's 95 %-mass radius). A shared defocus (only the astigmatism differs) nulls
    some frequencies in every image.

    The mass is the least-squares zero frequency, whose noise has standard deviation
    σ·D / √(Σ CTF_i(0)²): within 4 of them. The radius is within 3 pixels (at most 1.9 seen over 120
    seeds and CTF settings); a per-image Wiener filter returned about half the radius here, 3.6 to
    13 pixels short, because it damps the low frequencies ~10× against the rest.

    Statistical (seeded: see the ``statistical`` marker). Over 200 seeds none failed, in each case."""
    from cryogs.reconstruct.config import estimate_extent

    means, quats, scales, amps = random_mixture(40, rng, spread=7.0, scale_range=(1.5, 3.0), dtype=torch.float32)
    truth = GaussianModel(means.clamp(-20, 20), quats, scales, amps)
    box, apix, n = 48, 2.0, 256
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    ctf = None if defocus is None else random_ctf_params(n, defocus, seed=seed)
    stack = simulate_stack(truth, n, box_size=box, pixel_size=apix, snr=1.0, max_shift=2.0, seed=seed, ctf=ctf)
    files = write_dataset(tmp_path, truth, stack, box_size=box, pixel_size=apix)
    clean = simulate_stack(truth, n, box_size=box, pixel_size=apix, max_shift=2.0, seed=seed).images.mean(0)
    r = np.hypot(*(np.indices(clean.shape) - box // 2)).ravel()
    order = np.argsort(r)
    cum = np.cumsum(clean.ravel()[order])
    expected = 1.1 * r[order][np.searchsorted(cum, 0.95 * cum[-1])] * apix

    radius, mass = estimate_extent(load_particles(files["star"]))
    assert abs(radius - expected) <= 3 * apix + 1e-6, (radius, expected)
    ctf0 = 1.0 if defocus is None else 0.1  # the amplitude contrast
    assert abs(mass - float(amps.sum())) <= 4 * stack.noise_sigma * box / math.sqrt(n * ctf0 ** 2), mass


def test_particle_extent_averages_every_image_up_to_the_sample_in_any_chunks(tmp_path, rng, monkeypatch):
    """Exact: the least-squares mean image is the same sum however the images are chunked; with no
    more images than the sample, all are used (the seed changes nothing), with more a seeded choice."""
    from cryogs.reconstruct import config

    from test_resume import tiny_dataset

    particles = load_particles(tiny_dataset(tmp_path, rng, n_particles=100)["star"])
    whole = config.estimate_extent(particles, seed=0)
    assert config.estimate_extent(particles, seed=1) == whole
    monkeypatch.setattr(config, "EXTENT_CHUNK", 7)
    np.testing.assert_allclose(config.estimate_extent(particles, seed=0), whole, rtol=1e-12)
    sampled = [config.estimate_extent(particles, n_sample=30, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2] and sampled[0] != whole
