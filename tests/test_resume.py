"""Resumable jobs: a training process killed with SIGKILL in the middle of an epoch, then resumed, ends
where an uninterrupted run ends, and visits no particle twice in that epoch."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from cryogs.model.gaussians import GaussianModel
from cryogs.simulate import simulate_stack, write_dataset

from helpers import random_mixture


def tiny_dataset(folder, gen, *, n_particles=192, box=24, apix=2.0, snr=1.0):
    means, quats, scales, amps = random_mixture(12, gen, spread=5.0, scale_range=(2.0, 3.5), dtype=torch.float32)
    truth = GaussianModel(means.clamp(-10, 10), quats, scales, amps)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    stack = simulate_stack(truth, n_particles, box_size=box, pixel_size=apix, snr=snr, max_shift=2.0, seed=seed)
    return write_dataset(folder, truth, stack, box_size=box, pixel_size=apix)


def reconstruct_args(star, out, *extra):
    return [sys.executable, "-m", "cryogs", "reconstruct", str(star), "--out", str(out), "--epochs", "3",
            "--batch-size", "8", "--gaussians", "40", "--checkpoint-every", "3", "--refine-poses",
            "--refine-start", "0.3", "--pose-steps", "2", "--densify", "--no-progress", "--device", "cpu", "--seed", "5", *extra]


def _checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, rng):
    files = tiny_dataset(tmp_path / "data", rng)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
    full = tmp_path / "full"
    subprocess.run(reconstruct_args(files["star"], full), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(reconstruct_args(files["star"], killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck, deadline = None, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ck = _checkpoint(killed / "checkpoint.pt")
            if ck is not None and ck["batch"] > 0:  # inside an epoch
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ck is not None and ck["batch"] > 0, "no mid-epoch checkpoint seen before the end"
    # the checkpoint records which particles this epoch has trained on: exactly the first batches of its order
    n = len(ck["visited"])
    order = np.random.default_rng([5, ck["epoch"]]).permutation(n)
    assert set(np.flatnonzero(ck["visited"])) == set(order[:ck["batch"] * 8])

    # resumed, the trainer checks every step that no particle comes twice and every epoch that none is missed
    subprocess.run(reconstruct_args(files["star"], killed, "--resume"), check=True, env=env, capture_output=True)
    a, b = (GaussianModel.load(d / "gaussians.npz").arrays() for d in (full, killed))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    ca, cb = (_checkpoint(d / "checkpoint.pt") for d in (full, killed))
    assert len(ca["losses"]) == len(cb["losses"]) == 3 * 24
    assert torch.allclose(ca["poses"]["corrections"], cb["poses"]["corrections"], atol=1e-6)
    assert (killed / "refined_poses.star").exists()
