"""The stopping rule: held-out particles, the rule on their losses, and a fit that stops, anneals on
every particle and resumes exactly."""
import math

import numpy as np
import pytest
import torch

from cryogs.io.load import load_particles
from cryogs.io.loader import EpochSampler
from cryogs.reconstruct import convergence
from cryogs.reconstruct.config import default_config
from cryogs.reconstruct.convergence import ANNEAL_EPOCHS, MIN_EPOCHS, HeldOutRule, heldout_indices
from cryogs.reconstruct.fit import planned_steps, run_training

from test_resume import tiny_dataset


def test_heldout_indices_are_a_seeded_tenth_within_bounds():
    assert heldout_indices(639, 0) is None  # 64 would need 640 particles
    assert len(heldout_indices(640, 0)) == 64 and len(heldout_indices(10**6, 0)) == 512
    a, b = heldout_indices(3000, 1), heldout_indices(3000, 1)
    assert np.array_equal(a, b) and len(np.unique(a)) == 300 and (np.diff(a) > 0).all()
    assert not np.array_equal(a, heldout_indices(3000, 2))


def test_sampler_population_covers_exactly_its_particles(rng):
    pop = np.sort(torch.randperm(50, generator=rng)[:37].numpy())
    sampler = EpochSampler(50, 8, seed=3, population=pop)
    assert sampler.size == 37 and sampler.batches_per_epoch == 5
    seen = np.concatenate(list(sampler))
    assert np.array_equal(np.sort(seen), pop)
    sampler.set_population(None)
    sampler.set_epoch(1)
    assert np.array_equal(np.sort(np.concatenate(list(sampler))), np.arange(50))


def _losses(mean, noise, n, gen):
    return mean + noise * torch.randn(n, generator=gen, dtype=torch.float64).numpy()


def test_rule_stops_when_the_loss_over_span_epochs_no_longer_falls_significantly(rng):
    """Exact: per-image losses fall by ``f`` per epoch on top of a fixed noise vector ``v`` whose sign
    alternates, so every paired change has standard error ``2σ/√n``: one epoch's fall is 1.5 SE (a
    rule on single epochs would stop), three epochs' fall 4.5 SE. The rule waits; once the loss is
    flat from epoch 6 on, the fall over the last three epochs is 3 SE after epoch 7 and 1.5 after 8.
    (Before epoch 3 the fall is counted from the start, epoch 0.)"""
    assert convergence.SPAN == 3 and convergence.Z == 2 and convergence.MIN_EPOCHS <= 4
    n, sigma = 200, 1e-3
    v = torch.randn(n, generator=rng, dtype=torch.float64).numpy()
    v = (v - v.mean()) / v.std(ddof=1)
    base = _losses(1.0, 0.1, n, rng)
    se = 2 * sigma / math.sqrt(n)
    f = 1.5 * se

    def losses(e):
        return base - min(e, 6) * f + (-1) ** e * sigma * v

    rule = HeldOutRule()
    stops = [rule.update(e, losses(e)) for e in range(9)]
    assert stops == [False] * 8 + [True]
    z = [r["improvement"] / r["standard_error"] for r in rule.history[1:]]
    assert z[1] > 1e6  # epoch 2 against the start: the noise cancels, 2f with no standard error
    np.testing.assert_allclose(z[:1] + z[2:], [1.5, 4.5, 4.5, 4.5, 4.5, 3.0, 1.5], rtol=1e-9)
    assert "converged" in rule.reason() and "3 epochs" in rule.reason()


def test_rule_never_stops_before_min_epochs():
    rule = HeldOutRule()
    flat = np.linspace(1.0, 2.0, 100)
    results = [rule.update(e, flat) for e in range(convergence.MIN_EPOCHS + 1)]
    assert results == [False] * convergence.MIN_EPOCHS + [True]


def test_rule_state_round_trips():
    rule = HeldOutRule()
    for e, shift in enumerate([0.0, 0.1, 0.1]):
        rule.update(e, np.linspace(0, 1, 80) - shift)
    other = HeldOutRule()
    other.load_state_dict(rule.state_dict())
    h = np.linspace(0, 1, 80) - 0.1
    assert other.update(3, h) == rule.update(3, h) and other.history == rule.history


@pytest.mark.statistical
def test_noisy_fit_stops_early_anneals_on_every_particle_and_resumes_exactly(tmp_path, rng):
    """Statistical (seeded: see the ``statistical`` marker). 700 noisy images of a small mixture
    (SNR 0.05): the held-out loss stops falling long before 30 epochs. The last ANNEAL_EPOCHS epochs
    train on all 700 particles with the learning rates falling to their final value, and a run
    stopped during them resumes to the same model."""
    files = tiny_dataset(tmp_path / "data", rng, n_particles=700, box=12, snr=0.05)
    particles = load_particles(files["star"])
    config = default_config(particles, epochs=30, batch_size=64, n_gaussians=12)
    trainer = run_training(particles, config, tmp_path / "run", progress=False)
    assert len(trainer.heldout) == 70
    assert trainer.epoch < 30 and trainer.epoch == trainer.end_epoch
    assert trainer.stop_reason.startswith("converged")
    fired = trainer.epoch - ANNEAL_EPOCHS  # the epoch after which the rule fired
    assert fired >= MIN_EPOCHS
    last = math.ceil(700 / 64)
    assert trainer.step_count == fired * math.ceil(630 / 64) + ANNEAL_EPOCHS * last
    lr0 = 0.5 * particles.pixel_size
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * config.final_lr_fraction, rel=1e-6)
    assert [r["epoch"] for r in trainer.rule.history] == list(range(fired + 1))
    assert planned_steps(700, config) == 29 * math.ceil(630 / 64) + last

    # the same run, killed two steps into its annealing epochs, then resumed
    config2 = default_config(particles, epochs=30, batch_size=64, n_gaussians=12, checkpoint_every=1)
    stop_at = trainer.step_count - ANNEAL_EPOCHS * last + 2

    class Killed(Exception):
        pass

    import cryogs.reconstruct.fit as fit
    original = fit.Trainer.save_checkpoint

    def save_then_maybe_die(self):
        original(self)
        if self.step_count == stop_at:
            raise Killed
    fit.Trainer.save_checkpoint = save_then_maybe_die
    try:
        with pytest.raises(Killed):
            run_training(particles, config2, tmp_path / "killed", progress=False)
    finally:
        fit.Trainer.save_checkpoint = original
    resumed = run_training(particles, config2, tmp_path / "killed", resume=True, progress=False)
    assert resumed.epoch == trainer.epoch and resumed.step_count == trainer.step_count
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
