"""Run folders a user can trust: --resume continues the run that was started (its particle file and
every option, as recorded in run.json) and refuses anything that contradicts it; a finished run is
not redone; a new run never writes into a folder holding other files unless --overwrite; two runs
never write into one folder at once; `cryogs fsc` never replaces a file it was not told to write."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import torch

from cryogs.cli import main as cryogs
from cryogs.model.gaussians import GaussianModel
from cryogs.simulate import simulate_stack, write_dataset

from helpers import mark_unfinished

FAST = ["--epochs", "1", "--gaussians", "10", "--batch-size", "8", "--init", "random", "--seed", "3", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 particles (box 16, 2 Å) of a fixed random mixture, no CTF."""
    gen = torch.Generator().manual_seed(5)
    model = GaussianModel(torch.randn(6, 3, generator=gen) * 3, torch.randn(6, 4, generator=gen),
                          torch.full((6, 3), 2.5), torch.ones(6))
    stack = simulate_stack(model, 16, box_size=16, pixel_size=2.0, snr=2.0, seed=2)
    return write_dataset(tmp_path_factory.mktemp("runs_data"), model, stack, box_size=16, pixel_size=2.0)


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A run that was stopped (its record says so) in a fresh folder; tests copy it before resuming."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), *FAST]) == 0
    mark_unfinished(out)
    return out


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryogs "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """Every file of a folder with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_resume_takes_the_particle_file_and_options_from_the_record(tmp_path, data):
    """A run started with --invert on images of inverted contrast, stopped before its first checkpoint and
    resumed with nothing but --out and --resume, ends where the uninterrupted run ends (the old resume
    needed the particle file again and took --invert, --ind, ... from the new command line)."""
    with mrcfile.open(data["stack"]) as m:
        inverted = -m.data
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(data["star"], folder)
    with mrcfile.new(folder / "particles.mrcs") as m:
        m.set_data(inverted)
    common = [str(folder / "particles.star"), "--invert", "--ind", str(_indices(tmp_path)), *FAST]
    assert cryogs(["reconstruct", *common, "--out", str(tmp_path / "full")]) == 0
    assert cryogs(["reconstruct", *common, "--out", str(tmp_path / "stopped")]) == 0
    (tmp_path / "stopped" / "checkpoint.pt").unlink()  # as if killed during the first epoch
    mark_unfinished(tmp_path / "stopped")
    assert cryogs(["reconstruct", "--out", str(tmp_path / "stopped"), "--resume", "--device", "cpu",
                   "--no-progress"]) == 0
    full, resumed = (GaussianModel.load(tmp_path / d / "gaussians.npz").arrays() for d in ("full", "stopped"))
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], rtol=0, atol=1e-5, err_msg=k)
    assert json.loads((tmp_path / "stopped" / "metrics.json").read_text())["n_particles"] == 12


def _indices(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text(" ".join(map(str, range(2, 14))))
    return path


@pytest.mark.parametrize("extra, named", [
    (["--epochs", "2"], "--epochs 2"), (["--invert"], "--invert"), (["--half-maps"], "--half-maps"),
    (["--downsample", "8"], "--downsample 8"), (["--mask-radius", "9"], "--mask-radius 9"),
    (["--seed", "4"], "--seed 4"), (["--batch-size", "4"], "--batch-size 4"), (["--reference", "MAP"], "--reference"),
])
def test_resume_refuses_an_option_the_run_was_not_started_with(tmp_path, stopped, data, extra, named, capsys):
    """A conflicting option is refused in one line naming it, and nothing in the folder changes (the old
    resume ignored training options silently and took data options from the new command line)."""
    out = copy_of(stopped, tmp_path)
    before = snapshot(out)
    extra = [str(data["map"]) if a == "MAP" else a for a in extra]
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), "--resume", "--device", "cpu", *extra]) == 2
    one_line_error(capsys, "--resume", named, "conflicts")
    assert snapshot(out) == before


def test_resume_refuses_another_or_a_changed_particle_file(tmp_path, stopped, data, capsys):
    out = copy_of(stopped, tmp_path)
    before = snapshot(out)
    other = tmp_path / "other.star"
    other.write_text(data["star"].read_text().replace("000016@", "000015@"))
    assert cryogs(["reconstruct", str(other), "--out", str(out), "--resume", "--device", "cpu"]) == 2
    one_line_error(capsys, "other.star", "conflicts")
    moved = tmp_path / "moved.star"  # the same content elsewhere is the same input
    moved.write_text(data["star"].read_text())
    record = json.loads((out / "run.json").read_text())
    record["inputs"]["particles"][0]["path"] = str(moved)
    record["options"]["particles"] = str(moved)
    (out / "run.json").write_text(json.dumps(record))
    moved.write_text(data["star"].read_text() + "\n# edited\n")
    assert cryogs(["reconstruct", "--out", str(out), "--resume", "--device", "cpu"]) == 2
    one_line_error(capsys, "moved.star", "changed since")
    assert {k: v for k, v in snapshot(out).items() if k != "run.json"} == \
        {k: v for k, v in before.items() if k != "run.json"}


def test_a_finished_half_maps_run_is_not_redone(tmp_path, data, capsys):
    """Resumed without --half-maps (the old resume then trained one model on all particles and replaced
    map.mrc), a finished half-map run is left exactly as it is."""
    out = tmp_path / "halves"
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), "--half-maps", *FAST]) == 0
    assert (out / "command.txt").read_text().count("--half-maps") == 1  # the run folder's own command.txt
    before = snapshot(out)
    capsys.readouterr()
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), "--resume", "--device", "cpu",
                   "--no-progress"]) == 0
    assert "has finished; nothing to resume" in capsys.readouterr().out
    assert snapshot(out) == before


def test_a_new_run_refuses_a_folder_that_holds_files(tmp_path, data, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), *FAST]) == 2
    one_line_error(capsys, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), *FAST, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "map.mrc").exists()


def test_a_folder_locked_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, data, capsys):
    """The lock names a process that lives (a real one, so the check is the operating system's): the run
    is refused. Once that process is gone, the stale lock is taken over and released at the end."""
    out = tmp_path / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".cryogs.lock").write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), *FAST]) == 2
        one_line_error(capsys, f"in use by cryogs process {sleeper.pid}")
        assert [p.name for p in out.iterdir()] == [".cryogs.lock"]
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), *FAST]) == 0
    assert "taking it over" in capsys.readouterr().out
    assert not (out / ".cryogs.lock").exists() and (out / "map.mrc").exists()


def test_every_command_with_an_output_folder_logs_its_command_line(tmp_path, data):
    argv = ["backproject", str(data["star"]), "--out", str(tmp_path / "bp"), "--no-progress", "--device", "cpu"]
    assert cryogs(argv) == 0
    assert (tmp_path / "bp" / "command.txt").read_text().splitlines() == [" ".join(["cryogs", *argv])]
    assert json.loads((tmp_path / "bp" / "run.json").read_text())["status"] == "finished"
    argv = ["simulate", str(data["gaussians"]), "--out", str(tmp_path / "sim"), "-n", "2", "--box", "8",
            "--device", "cpu"]
    assert cryogs(argv) == 0
    assert (tmp_path / "sim" / "command.txt").read_text().splitlines() == [" ".join(["cryogs", *argv])]


def test_fsc_writes_only_files_it_is_told_to_or_new_ones(tmp_path, data, monkeypatch):
    """The old default, fsc.png beside MAP1, replaced a run's own FSC figure."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(data["map"], run / "a.mrc")
    shutil.copy(data["map"], run / "b.mrc")
    (run / "fsc.png").write_bytes(b"the run's own figure")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for _ in range(2):
        assert cryogs(["fsc", str(run / "a.mrc"), str(run / "b.mrc")]) == 0
    assert (run / "fsc.png").read_bytes() == b"the run's own figure"
    assert sorted(p.name for p in here.iterdir()) == ["fsc_a_b.png", "fsc_a_b.txt", "fsc_a_b_2.png", "fsc_a_b_2.txt"]
    assert cryogs(["fsc", str(run / "a.mrc"), str(run / "b.mrc"), "--out", str(run / "fsc.png")]) == 0
    assert (run / "fsc.png").read_bytes()[:4] == b"\x89PNG"  # named: replaced
