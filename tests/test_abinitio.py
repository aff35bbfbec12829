"""Ab initio reconstruction (issue 21): poses and map from images alone, recovered up to a global
rotation and the hand; a killed run resumes; bad input is one line. Small and fast (box 32, 3 Å/px,
400 particles, search box 24, 2 random starts, 6 iterations; one random start alone fails on this
set); the full case is benchmarks/abinitio.py. Commands run in-process where they can (a subprocess
costs seconds of imports)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cryogs.analysis.align import align_maps, mirror_map
from cryogs.analysis.fsc import fsc, resolution_at
from cryogs.analysis.pose_error import MIRROR, pose_errors
from cryogs.io.mrc import read_mrc, write_mrc
from cryogs.io.star import load_star
from cryogs.physics.conventions import random_rotations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cryogs(*args):
    """``cryogs ARGS`` in this process: exit status and what it printed."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from cryogs.cli import main

    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def adk(tmp_path_factory):
    out = tmp_path_factory.mktemp("abinitio") / "sim"
    res = cryogs("simulate", os.path.join(ROOT, "cryogs", "data", "adk_open.pdb"), "--out", out, "-n", 400,
                 "--box", 32, "--pixel-size", 3.0, "--snr", 1, "--max-shift", 3, "--defocus", 10000, 25000,
                 "--seed", 3, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    return out


def abinitio_args(star, out):
    return [sys.executable, "-m", "cryogs", "abinitio", str(star), "--out", str(out), "--search-box", "24",
            "--starts", "2", "--iterations", "6", "--candidates", "4", "--epochs", "1", "--refine-start", "0",
            "--pose-steps", "2", "--no-progress", "--device", "cpu"]


def test_pose_errors_see_through_a_global_rotation_and_the_mirror():
    gen = torch.Generator().manual_seed(0)
    true = random_rotations(200, generator=gen, dtype=torch.float64).numpy()
    g = random_rotations(1, generator=gen, dtype=torch.float64).numpy()[0]
    assert pose_errors(true @ g, true)["median_degrees"] < 1e-5
    mirrored = pose_errors(MIRROR @ true @ MIRROR @ g, true)
    assert mirrored["mirrored"] and mirrored["median_degrees"] < 1e-5
    other = random_rotations(200, generator=gen, dtype=torch.float64).numpy()
    assert pose_errors(other, true)["within_10_degrees"] < 0.2


def test_align_finds_rotation_translation_and_hand(tmp_path, adk):
    truth, voxel = read_mrc(adk / "gt_map.mrc")
    R = random_rotations(1, generator=torch.Generator().manual_seed(4))[0]
    from cryogs.analysis.align import _apply

    moved = mirror_map(_apply(torch.tensor(truth), R, torch.tensor([1.0, -2.0, 0.5])).numpy())
    result = align_maps(moved, truth, grid_step=20, coarse_box=16, rounds=3)
    assert result["mirrored"]
    f, c = fsc(result["aligned"], truth, pixel_size=voxel[0], mask_radius=40)
    assert resolution_at(f, c, 0.5) < 8.0


def test_flip_twice_is_the_identity_and_keeps_the_voxel_size(tmp_path):
    vol = np.random.default_rng(0).normal(size=(10, 10, 10)).astype(np.float32)
    write_mrc(tmp_path / "a.mrc", vol, 2.5)
    assert cryogs("flip", tmp_path / "a.mrc", "--out", tmp_path / "b.mrc").returncode == 0
    assert cryogs("flip", tmp_path / "b.mrc", "--out", tmp_path / "c.mrc").returncode == 0
    b, vb = read_mrc(tmp_path / "b.mrc")
    c, vc = read_mrc(tmp_path / "c.mrc")
    assert vb[0] == pytest.approx(2.5) and vc[0] == pytest.approx(2.5)
    assert np.array_equal(c, vol) and not np.array_equal(b, vol)
    assert b[5 + 2, 3, 4] == vol[5 - 2, 3, 4]  # z ↦ −z about the centre D//2


@pytest.mark.statistical
def test_killed_run_resumes_and_recovers_poses_and_map(tmp_path, adk):
    """SIGKILL once the search has checkpointed, then --resume: the run finishes, its particles.star reads
    back with every input column, and poses and map match the truth up to rotation and hand."""
    out = tmp_path / "ab"
    proc = subprocess.Popen(abinitio_args(adk / "particles.star", out), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "abinitio_search.pt").exists():
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "abinitio_search.pt").exists()
    res = cryogs("abinitio", "--out", out, "--resume", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "resuming the search" in res.stdout and "mirror" in res.stdout
    est, tru = load_star(out / "particles.star"), load_star(adk / "particles.star")
    errors = pose_errors(est.rotations, tru.rotations)
    assert errors["median_degrees"] < 6 and errors["within_10_degrees"] > 0.9, errors["median_degrees"]
    assert est.ctf is not None and np.allclose(est.ctf["defocus_u"], tru.ctf["defocus_u"])
    volume, voxel = read_mrc(out / "map.mrc")
    assert voxel[0] == pytest.approx(3.0)
    truth, _ = read_mrc(adk / "gt_map.mrc")
    aligned = align_maps(volume, truth, grid_step=20, coarse_box=16, rounds=3)["aligned"]
    f, c = fsc(aligned, truth, pixel_size=3.0, mask_radius=40)
    assert resolution_at(f, c, 0.5) < 14
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_particles"] == 400 and "mirror" in metrics["handedness"]
    # the search before the kill counts in the total, not in this invocation's wall time
    assert metrics["seconds_all_invocations"] > metrics["search_seconds"] > 0
    assert metrics["search_iterations"][-1]["seconds"] == pytest.approx(metrics["search_seconds"])
    for name in ("viewing_directions.png", "abinitio.png", "slices.png", "montage.png", "gaussians.npz"):
        assert (out / name).is_file()
    again = cryogs("abinitio", "--out", out, "--resume")
    assert again.returncode == 0 and "nothing to resume" in again.stdout


def one_line_error(res, *fragments):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_is_one_line(tmp_path, adk):
    one_line_error(cryogs("abinitio", tmp_path / "none.star", "--out", tmp_path / "o1"), "file not found")
    one_line_error(cryogs("abinitio", "--out", tmp_path / "o2", "--resume"), "no cryogs run")
    (tmp_path / "bad.star").write_text("data_\nloop_\n_rlnFoo #1\n1\n")
    one_line_error(cryogs("abinitio", tmp_path / "bad.star", "--out", tmp_path / "o3"), "bad.star")
    np.save(tmp_path / "few.npy", np.arange(5))
    one_line_error(cryogs("abinitio", adk / "particles.star", "--ind", tmp_path / "few.npy", "--out", tmp_path / "o4"),
                   "too few")
    one_line_error(cryogs("abinitio", adk / "particles.mrcs", "--out", tmp_path / "o5"), "--pixel-size")
    write_mrc(tmp_path / "m16.mrc", np.zeros((16, 16, 16), np.float32), 3.0)
    one_line_error(cryogs("align", tmp_path / "m16.mrc", adk / "gt_map.mrc", "--out", tmp_path / "x.mrc"), "one box")
    one_line_error(cryogs("flip", tmp_path / "missing.mrc", "--out", tmp_path / "y.mrc"), "missing.mrc")


def test_particles_star_from_a_relion30_file_keeps_its_columns(tmp_path, adk):
    """A RELION 3.0 input (no optics block, origins in pixels) gets an optics block, origins in Å and
    every other column, and reads back with the same poses."""
    import starfile

    from cryogs.io.star import write_star_with_poses

    par = starfile.read(adk / "particles.star", always_dict=True)["particles"]
    par = par.drop(columns=["rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"])
    par["rlnOriginX"], par["rlnOriginY"] = 0.5, -0.5
    par["rlnDetectorPixelSize"], par["rlnMagnification"] = 3.0, 10000.0
    par["rlnVoltage"], par["rlnSphericalAberration"], par["rlnAmplitudeContrast"] = 300.0, 2.7, 0.1
    par["rlnImageSize"], par["rlnMyExtra"] = 32, 7
    starfile.write({"particles": par}, tmp_path / "p30.star")
    p = load_star(tmp_path / "p30.star", require_poses=False)
    names = [f"{i + 1:06d}@{s}" for s, i in p.image_paths]
    write_star_with_poses(tmp_path / "out.star", p, p.rotations, p.shifts, names)
    q = load_star(tmp_path / "out.star")
    assert (q.pixel_size, q.box_size, len(q)) == (3.0, 32, len(p))
    assert np.allclose(q.rotations, p.rotations, atol=1e-5) and np.allclose(q.shifts, [[1.5, -1.5]] * len(p))
    columns = starfile.read(tmp_path / "out.star")["particles"].columns
    assert "rlnMyExtra" in columns and "rlnOriginX" not in columns and "rlnOriginXAngst" in columns
