"""What runs tell the user: progress lines in a log and labelled bars on a terminal, honest FSC and loss
figures (every FSC shows its mask; the half-map FSC of Gaussian models says it overstates the
resolution; one automatic mask per data set), and the same conventions in every command (option
names, units in the help, 1-based particle numbers, metrics keys, the half split as a STAR file,
--version, a --help that loads no torch)."""
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryogs.analysis import evaluate, figures
from cryogs.analysis import fsc as fsc_module
from cryogs.cli import COMMANDS, build_parser
from cryogs.cli import main as cryogs
from cryogs.io.load import load_particles
from cryogs.model.gaussians import GaussianModel
from cryogs.reconstruct import fit, half_maps, outputs
from cryogs.reconstruct.half_maps import half_split
from cryogs.simulate import random_ctf_params, simulate_stack, write_dataset

SMALL = ["--gaussians", "10", "--batch-size", "4", "--seed", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    gen = torch.Generator().manual_seed(3)
    model = GaussianModel(torch.randn(6, 3, generator=gen) * 3, torch.randn(6, 4, generator=gen),
                          torch.full((6, 3), 2.5), torch.ones(6))
    stack = simulate_stack(model, 16, box_size=16, pixel_size=2.0, snr=2.0, seed=4,
                           ctf=random_ctf_params(16, (1000.0, 2000.0), seed=4))
    return write_dataset(tmp_path_factory.mktemp("reports_data"), model, stack, box_size=16, pixel_size=2.0)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """reconstruct --half-maps --reference on a terminal, reconstruct --reference with --no-progress,
    backproject --reference in a log (stderr not a terminal), and cryogs fsc; with every FSC figure,
    montage, stdout and stderr kept."""
    out = tmp_path_factory.mktemp("reports")
    figures, montages = [], []

    def spy(original, into):
        def record(*args, **kwargs):
            into.append((Path(args[0]), args, kwargs))
            return original(*args, **kwargs)
        return record
    argv = {
        "halves": ["reconstruct", str(data["star"]), "--out", str(out / "halves"), "--half-maps", "--epochs", "2",
                   "--reference", str(data["map"]), *SMALL],
        "single": ["reconstruct", str(data["star"]), "--out", str(out / "single"), "--epochs", "2",
                   "--reference", str(data["map"]), "--init", "random", "--no-progress", *SMALL],
        "bp": ["backproject", str(data["star"]), "--out", str(out / "bp"), "--reference", str(data["map"]),
               "--device", "cpu"],
        "fsc": ["fsc", str(data["map"]), str(data["map"]), "--out", str(out / "fsc.png")],
    }
    result = {"out": out, "figures": figures, "montages": montages}
    with pytest.MonkeyPatch.context() as mp:
        for module in (fsc_module, evaluate, half_maps):
            mp.setattr(module, "plot_fsc", spy(module.plot_fsc, figures))
        mp.setattr(outputs, "plot_montage", spy(outputs.plot_montage, montages))
        for name, args in argv.items():
            stdout, stderr = io.StringIO(), Terminal() if name == "halves" else io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                assert cryogs(args) == 0, stderr.getvalue()
            result[name] = (stdout.getvalue(), stderr.getvalue())
    return result


# ------------------------------------------------------------------ logs and progress
def test_one_line_per_stage_and_epoch_with_the_time_elapsed_and_left(runs):
    lines = runs["halves"][0].splitlines()
    epochs = [ln for ln in lines if re.search(r"half \d: epoch \d/2", ln)]
    assert len(epochs) == 4
    assert all(re.match(r"\[\d+ s\] half \d: epoch", ln) and ln.endswith(" left") for ln in epochs), epochs
    for stage in ("set-up: reading", "start: backprojecting", "half 1: 8 particles", "half 2: 8 particles",
                  "half 1: writing the map", "averaging the half maps", "FSC against"):
        assert any(stage in ln and ln.startswith("[") for ln in lines), (stage, lines)


def test_every_bar_on_a_terminal_is_labelled(runs):
    bars = runs["halves"][1]
    for label in ("start: backproject half 1/2", "start: backproject half 2/2", "all fitting", "half 1: epoch 1/2",
                  "half 2: epoch 2/2"):
        assert label in bars, label
    unlabelled = [b for b in re.split(r"[\r\n]", bars) if re.match(r"\s*\d+%\|", b)]
    assert not unlabelled, unlabelled[:3]


def test_a_log_gets_the_reports_and_no_bars(runs):
    stdout, stderr = runs["bp"]
    assert stderr == ""  # not a terminal: no bar refreshes
    assert "backprojecting half 1" in stdout and "backprojecting half 2" in stdout


def test_no_progress_hides_the_bars_but_not_the_reports(runs):
    stdout, stderr = runs["single"]
    assert stderr == ""
    assert len([ln for ln in stdout.splitlines() if re.match(r"\[\d+ s\] epoch \d/2: mean loss", ln)]) == 2


def test_an_interrupted_run_says_how_to_resume(data, tmp_path, capsys, monkeypatch):
    def interrupt(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(fit.Trainer, "fit", interrupt)
    out = tmp_path / "run"
    assert cryogs(["reconstruct", str(data["star"]), "--out", str(out), "--init", "random", *SMALL]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"cryogs reconstruct: interrupted; continue from the last checkpoint with: " \
                  f"cryogs reconstruct --out {out} --resume"
    assert not (out / ".cryogs.lock").exists()


def test_the_set_up_script_says_it_compiles_the_extension_and_for_how_long():
    script = (Path(__file__).parents[1] / "scripts" / "setup_env.sh").read_text()
    assert "compiling the CUDA extension" in script and "minutes" in script


# ------------------------------------------------------------------ honest figures
def test_every_fsc_figure_shows_its_mask(runs):
    assert {path.name for path, _, _ in runs["figures"]} == {"fsc.png", "fsc_reference.png"}
    assert len(runs["figures"]) == 6  # half-map + reference for --half-maps, reference, bp half + reference, fsc
    for name, _, kwargs in runs["figures"]:
        mask = kwargs.get("mask", "")
        assert mask == "no mask" or re.fullmatch(r"mask: soft sphere of radius \d+\.\d Å, cosine edge 12\.0 Å", mask), \
            (name, mask)


def test_the_half_map_fsc_of_gaussians_says_it_overstates_the_resolution(runs):
    halves = [kw for name, args, kw in runs["figures"] if "half 1 vs half 2" in args[1] and "gold" not in kw["title"]]
    assert len(halves) == 1 and "overstates" in halves[0]["note"] and "reproducibility" in halves[0]["note"]
    assert all("gold-standard" not in kw["title"] for name, args, kw in runs["figures"]
               if "half 1 vs half 2" in args[1] and "backprojection" not in kw["title"])
    summary = runs["halves"][0].splitlines()[-1]
    assert "half-map FSC 0.143" in summary and "overstates the resolution" in summary


def test_one_automatic_mask_for_every_fsc_of_the_same_particles(runs):
    """reconstruct and backproject, half-map and reference FSC: one radius (it was 42.0 against 43.2 Å)."""
    radii = {json.loads((runs["out"] / run / "metrics.json").read_text())["fsc_mask_radius_angstrom"]
             for run in ("halves", "single", "bp")}
    masks = {kw["mask"] for _, _, kw in runs["figures"] if kw["mask"] != "no mask"}
    assert len(radii) == 1 and len(masks) == 1, (radii, masks)


def test_the_loss_figure_says_its_units_and_draws_the_noise_floor(monkeypatch, tmp_path):
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
    figures.plot_loss(tmp_path / "loss.png", 4, np.linspace(1, 0.6, 12), noise_floor=0.5)
    ax = saved[0].axes[0]
    assert "variance of the images" in ax.get_ylabel() and "Σ" not in ax.get_ylabel()
    assert any(np.allclose(line.get_ydata(), 0.5) and "noise floor" in line.get_label() for line in ax.get_lines())


def test_the_noise_floor_is_the_noise_over_the_image_variance(tmp_path):
    """For white noise at SNR s (no CTF), a perfect model's loss is σ²/(σ²·s + σ²) = 1/(1 + s)."""
    from cryogs.reconstruct.config import default_config

    gen = torch.Generator().manual_seed(8)
    model = GaussianModel(torch.randn(8, 3, generator=gen) * 2.5, torch.randn(8, 4, generator=gen),
                          torch.full((8, 3), 2.0), torch.ones(8))
    for snr in (0.5, 2.0):
        files = write_dataset(tmp_path / f"snr{snr}", model, simulate_stack(model, 300, box_size=32, pixel_size=1.5,
                                                                             snr=snr, seed=9),
                              box_size=32, pixel_size=1.5)
        particles = load_particles(files["star"])
        trainer = fit.Trainer(particles, default_config(particles, epochs=1, n_gaussians=5), tmp_path, progress=False)
        assert trainer.noise_floor() == pytest.approx(1 / (1 + snr), rel=0.05)


# ------------------------------------------------------------------ conventions
def test_help_and_version_load_no_torch():
    """--help answers at once: building the parser imports no torch, numpy or matplotlib."""
    code = ("import sys, contextlib, io\nfrom cryogs.cli import COMMANDS, main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    codes = [main(['--help']), main(['--version'])] + [main([c, '--help']) for c in COMMANDS]\n"
            "print(codes, sorted(m for m in ('torch', 'numpy', 'matplotlib', 'scipy', 'pandas') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert res.stdout.strip() == f"{[0] * (2 + len(COMMANDS))} []", res.stdout + res.stderr


def test_version(capsys):
    import cryogs as package

    assert cryogs(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cryogs {package.__version__}"


def _options(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {s: a for a in sub._actions for s in a.option_strings}


def test_one_name_per_concept():
    """-n is a particle count wherever it exists; the pixel size is --pixel-size everywhere (--apix still
    parses, hidden); a mask is a radius in Å and --downsample a target box in every help text."""
    for command in COMMANDS:
        opts = _options(command)
        if "-n" in opts:
            assert opts["-n"].dest == "particles", command
        if "--apix" in opts:
            assert "--pixel-size" in opts and opts["--apix"].dest == opts["--pixel-size"].dest == "pixel_size"
            assert opts["--apix"].help == "==SUPPRESS=="
        if "--mask-radius" in opts:
            assert "radius in Å" in opts["--mask-radius"].help, command
        if "--downsample" in opts:
            assert "target box size in pixels" in opts["--downsample"].help, command
    assert {c for c in COMMANDS if "--pixel-size" in _options(c)} == {"simulate", "reconstruct", "backproject", "fsc",
                                                                      "demo", "abinitio"}
    parser = build_parser()
    assert parser.parse_args(["simulate", "m.pdb", "--out", "o", "--apix", "3"]).pixel_size == 3.0
    computing = {c for c in COMMANDS if "--device" in _options(c)}  # the long-running commands
    assert "simulate" in computing and all("--no-progress" in _options(c) for c in computing)


def test_montage_titles_count_particles_and_images_from_one(runs):
    titles, = [kw["titles"] for path, _, kw in runs["montages"] if path.parent.name == "single"]
    assert titles == ["particle 1 (1@particles.mrcs)", "particle 6 (6@particles.mrcs)",
                          "particle 11 (11@particles.mrcs)", "particle 16 (16@particles.mrcs)"]


def test_every_metrics_json_starts_with_the_same_keys(runs):
    for run in ("halves", "single", "bp", "halves/half1"):
        metrics = json.loads((runs["out"] / run / "metrics.json").read_text())
        assert list(metrics)[:3] == ["n_particles", "box_size", "pixel_size_angstrom"], run
        assert metrics["box_size"] == 16 and metrics["pixel_size_angstrom"] == 2.0
    for run in ("halves", "single", "bp"):
        metrics = json.loads((runs["out"] / run / "metrics.json").read_text())
        assert {"wall_seconds", "fsc_0.5_angstrom", "fsc_mask_radius_angstrom", "fsc_mask_edge_angstrom"} <= set(metrics)


@pytest.mark.parametrize("run", ["halves", "bp"])
def test_half_maps_write_which_particle_went_into_which_half(runs, data, run):
    written = load_particles(runs["out"] / run / "half_split.star")
    particles = load_particles(data["star"])
    idx1, idx2, _ = half_split(particles, seed=1 if run == "halves" else 0)
    expected = np.zeros(len(particles), dtype=int)
    expected[idx1], expected[idx2] = 1, 2
    np.testing.assert_array_equal(written.random_subset, expected)
    np.testing.assert_allclose(written.rotations, particles.rotations, atol=1e-5)
    assert [Path(s).name for s, _ in written.image_paths] == [Path(s).name for s, _ in particles.image_paths]
    assert [i for _, i in written.image_paths] == [i for _, i in particles.image_paths]
