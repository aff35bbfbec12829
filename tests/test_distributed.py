"""Multi-process training on CPU with gloo, launched by torchrun as users would on GPUs."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cryogs.model.gaussians import GaussianModel
from cryogs.render.gaussian_math import covariance_3d

from test_resume import tiny_dataset

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch built without gloo")


def _run(star, out, processes, *extra):
    args = ["-m", "cryogs", "reconstruct", str(star), "--out", str(out), "--epochs", "2", "--batch-size", "8",
            "--gaussians", "30", "--no-progress", "--device", "cpu", "--seed", "3", "--densify", *extra]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _physical(folder):
    """Means, amplitudes and covariances: what the model means (the quaternions of near-isotropic
    Gaussians are ill-defined and Adam turns rounding-level gradients into full steps)."""
    m = GaussianModel.load(folder / "gaussians.npz").arrays()
    cov = covariance_3d(torch.from_numpy(m["quats"]).double(), torch.from_numpy(m["scales"]).double()).numpy()
    return m["means"], m["amplitudes"], cov


@pytest.mark.statistical
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path, rng):
    """Statistical (seeded: see the ``statistical`` marker). Random data could put a density-control decision at its
    threshold, where one and two processes (summing in different orders) may decide differently."""
    files = tiny_dataset(tmp_path / "data", rng, n_particles=64, box=20)
    _run(files["star"], tmp_path / "one", 1, "--refine-poses", "--refine-start", "0.5", "--pose-steps", "2")
    # each rank checks after every epoch that its model is bitwise the rank-0 model (density control
    # decisions included) and fails otherwise, so a clean exit proves they stayed in sync
    _run(files["star"], tmp_path / "two", 2, "--refine-poses", "--refine-start", "0.5", "--pose-steps", "2")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    one, two = _physical(tmp_path / "one"), _physical(tmp_path / "two")
    assert one[0].shape == two[0].shape  # the same density-control decisions as one process
    # summation order differs between one and two processes: float32 rounding, which Adam can turn into
    # one step of the other sign; at the final learning rate (0.5 px × 0.02) that moves a centre by
    # 0.02 px (on seed 0, 2.4e-3 Å of 0.04 Å)
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    final_step = (config["lr_means"] or 0.5 * metrics["pixel_size_angstrom"]) * config["final_lr_fraction"]
    np.testing.assert_allclose(one[0], two[0], atol=2 * final_step)  # Å
    np.testing.assert_allclose(one[1], two[1], rtol=2e-3)
    # a rounding-level gradient can flip the sign of one Adam step of a log-scale (lr 0.02), which moves
    # that Gaussian's variance by up to 4 %: the covariances agree to that
    np.testing.assert_allclose(one[2], two[2], atol=0.04 * float(np.abs(one[2]).max()))
    assert not (tmp_path / "two" / "half1").exists()


def test_half_maps_train_on_separate_processes(tmp_path, rng):
    files = tiny_dataset(tmp_path / "data", rng, n_particles=48, box=20)
    _run(files["star"], tmp_path / "halves", 2, "--half-maps", "--epochs", "1")
    out = tmp_path / "halves"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and sum(metrics["half_sizes"]) == 48
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "fsc.png", "half1/metrics.json", "half2/metrics.json"):
        assert (out / name).stat().st_size > 0, name
    # each half trained as one process on its own particles
    for k in (1, 2):
        assert json.loads((out / f"half{k}" / "metrics.json").read_text())["processes"] == 1


def test_broadcast_gives_each_group_its_first_ranks_tensors(tmp_path):
    """What makes a start computed on every rank (which GPU atomics may round differently) the same on
    all of them: in the whole world and in the half groups of --half-maps."""
    script = tmp_path / "broadcast.py"
    script.write_text(textwrap.dedent("""
        import torch
        from cryogs.reconstruct import distributed
        world, _ = distributed.init("cpu")
        _, half = distributed.split_halves(world)
        for group, first in ((world, 0), (half, 2 * (world.rank // 2))):
            mine = torch.full((3,), float(world.rank) + 1)
            assert not group.in_sync([mine])
            group.broadcast_([mine])
            assert torch.equal(mine, torch.full((3,), first + 1.0)), (world.rank, mine)
            assert group.in_sync([mine])
        # a clean teardown: a process leaving with gloo's threads alive aborts ("terminate called
        # without an active exception") on a loaded machine
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                          str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
