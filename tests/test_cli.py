"""The cryogs command: help, info, and one-line errors (no traceback) on bad input."""
import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryogs.cli import COMMANDS
from cryogs.model.gaussians import GaussianModel
from cryogs.simulate import simulate_stack, write_dataset

from helpers import mark_unfinished


def cryogs(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cryogs", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small simulated set from its own freshly seeded generator (seed printed), not torch's global RNG,
    whose state would depend on which tests ran before."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    out = tmp_path_factory.mktemp("data")
    model = GaussianModel(torch.randn(5, 3, generator=gen) * 4, torch.randn(5, 4, generator=gen),
                          torch.full((5, 3), 2.5), torch.ones(5))
    stack = simulate_stack(model, 12, box_size=16, pixel_size=2.0, seed=seed)
    return write_dataset(out, model, stack, box_size=16, pixel_size=2.0)


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryogs "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_examples(command):
    res = cryogs(command, "--help")
    assert res.returncode == 0
    assert "Example" in res.stdout
    # every option carries help text
    parser = __import__("cryogs.cli", fromlist=["build_parser"]).build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"


def test_info_reports_extension_status():
    res = cryogs("info")
    assert res.returncode == 0
    assert any(ln.startswith("CUDA extension: built") or ln.startswith("CUDA extension: not built (")
               for ln in res.stdout.splitlines()), res.stdout
    assert "torch" in res.stdout


def test_missing_stack(tmp_path, dataset):
    star = starfile.read(dataset["star"])
    star["particles"]["rlnImageName"] = [f"{i + 1:06d}@missing.mrcs" for i in range(len(star["particles"]))]
    starfile.write(star, tmp_path / "p.star")
    assert_one_line_error(cryogs("reconstruct", tmp_path / "p.star", "--out", tmp_path / "run"), "missing.mrcs")


def test_mismatched_box_sizes(tmp_path, dataset):
    star = starfile.read(dataset["star"])
    with mrcfile.new(tmp_path / "small.mrcs") as m:
        m.set_data(np.zeros((12, 12, 12), np.float32))
    star["particles"]["rlnImageName"] = [f"{i + 1:06d}@small.mrcs" for i in range(len(star["particles"]))]
    starfile.write(star, tmp_path / "p.star")
    assert_one_line_error(cryogs("reconstruct", tmp_path / "p.star", "--out", tmp_path / "run"), "small.mrcs")


def test_nan_images(tmp_path, dataset):
    with mrcfile.open(dataset["stack"]) as m:
        data = m.data.copy()
    data[3, 5, 5] = np.nan
    with mrcfile.new(tmp_path / "particles.mrcs") as m:
        m.set_data(data)
    (tmp_path / "p.star").write_text(dataset["star"].read_text())
    assert_one_line_error(cryogs("reconstruct", tmp_path / "p.star", "--out", tmp_path / "run"), "NaN")


def test_non_positive_pixel_size(tmp_path, dataset):
    star = starfile.read(dataset["star"])
    star["optics"]["rlnImagePixelSize"] = 0.0
    starfile.write(star, tmp_path / "p.star")
    (tmp_path / "particles.mrcs").write_bytes(dataset["stack"].read_bytes())
    assert_one_line_error(cryogs("reconstruct", tmp_path / "p.star", "--out", tmp_path / "run"), "pixel size")
    assert_one_line_error(cryogs("simulate", dataset["gaussians"], "--out", tmp_path / "sim", "--apix", "-1"),
                          "--apix")


def test_zero_gaussians(tmp_path, dataset):
    assert_one_line_error(cryogs("reconstruct", dataset["star"], "--out", tmp_path / "run", "--gaussians", "0"),
                          "--gaussians")


def test_missing_star_file(tmp_path):
    assert_one_line_error(cryogs("reconstruct", tmp_path / "nope.star", "--out", tmp_path / "run"), "nope.star")


def test_reconstruct_and_fsc_commands_end_to_end(tmp_path, dataset):
    res = cryogs("reconstruct", dataset["star"], "--out", tmp_path / "run", "--epochs", "1", "--gaussians", "20",
                 "--no-progress", "--reference", dataset["map"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "map.mrc").exists() and (tmp_path / "run" / "command.txt").exists()
    res = cryogs("fsc", tmp_path / "run" / "map.mrc", dataset["map"], "--out", tmp_path / "f.png")
    assert res.returncode == 0, res.stderr
    assert "FSC 0.5:" in res.stdout and (tmp_path / "f.png").exists()
    with mrcfile.open(tmp_path / "run" / "map.mrc") as m:
        assert m.voxel_size.x == pytest.approx(2.0)


def test_smoke_real_relion31_particles_downsampled_with_half_maps(tmp_path):
    """The 5 real RELION 3.1 particles (256 px, 2.806 Å) run end to end, Fourier-cropped to 32 px."""
    star = __import__("pathlib").Path(__file__).parent / "data" / "relion31.star"
    res = cryogs("reconstruct", star, "--out", tmp_path / "run", "--downsample", "32", "--epochs", "1",
                 "--gaussians", "30", "--half-maps", "--no-progress")
    assert res.returncode == 0, res.stderr
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the fixture marks all 5 particles rlnRandomSubset 1, so the halves come from a seeded random split
    assert metrics["half_split"].startswith("random split")
    assert sum(metrics["half_sizes"]) == 5
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "slices.png", "fsc.png", "half1/montage.png", "half1/loss.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert not (tmp_path / "run" / "half1" / "slices.png").exists()  # the average's figures only
    with mrcfile.open(tmp_path / "run" / "map.mrc") as m:
        assert m.data.shape == (32, 32, 32)
        assert m.voxel_size.x == pytest.approx(2.806 * 256 / 32, rel=1e-5)


def test_half_maps_resume_when_the_second_half_never_checkpointed(tmp_path, dataset):
    out = tmp_path / "run"
    args = ("reconstruct", dataset["star"], "--out", out, "--epochs", "1", "--gaussians", "10", "--half-maps",
            "--no-progress")
    assert cryogs(*args).returncode == 0
    (out / "half2" / "checkpoint.pt").unlink()  # as if stopped during half 2's first epoch
    (out / "map.mrc").unlink()
    mark_unfinished(out)
    res = cryogs(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert "starting it afresh" in res.stdout and (out / "map.mrc").exists()
    assert len((out / "half1" / "command.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("half_maps", [False, True])
def test_default_epochs_give_each_model_about_20000_images(tmp_path, monkeypatch, half_maps):
    """With --half-maps each half is a model trained on half the particles, so it gets twice the epochs."""
    import cryogs.reconstruct.fit
    import cryogs.reconstruct.half_maps
    from cryogs.cli import main

    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = GaussianModel(torch.randn(5, 3, generator=gen) * 4, torch.randn(5, 4, generator=gen),
                          torch.full((5, 3), 2.5), torch.ones(5))
    n = int(torch.randint(1100, 6667, (1,), generator=gen))  # where neither the 4-epoch floor nor the 40-epoch cap binds
    files = write_dataset(tmp_path / "data", model, simulate_stack(model, n, box_size=16, pixel_size=2.0, seed=1),
                          box_size=16, pixel_size=2.0)

    class Captured(Exception):
        pass

    def capture(particles, config, *args, **kwargs):
        raise Captured(config)

    monkeypatch.setattr(cryogs.reconstruct.half_maps, "run_half_maps", capture)
    monkeypatch.setattr(cryogs.reconstruct.fit, "run_training", capture)
    with pytest.raises(Captured) as got:
        main(["reconstruct", str(files["star"]), "--out", str(tmp_path / "run"), "--no-progress"]
             + ["--half-maps"] * half_maps)
    per_model = n // 2 if half_maps else n
    epochs = got.value.args[0].epochs
    assert epochs * per_model >= 20000 > (epochs - 1) * per_model, (n, epochs)
