"""Malformed inputs and arguments, as a hostile tester would give them: every one ends in one line on
stderr that starts with ``cryogs COMMAND: error:`` and names what is wrong (the file, the line or
particle, the option), with exit status 2 and no traceback, before any expensive step.

Each case is ``(id, make, fragments)``: ``make(tmp, data)`` writes whatever bad file the case needs
into ``tmp`` and returns the command line; ``data`` is one small valid data set (RELION 3.1 STAR
with CTF, its stack, a cryoDRGN pose/ctf pkl pair, a cryoSPARC .cs, ground-truth map).
"""
import json
import pickle

import mrcfile
import numpy as np
import pytest
import torch

from cryogs.cli import main as cryogs
from cryogs.model.gaussians import GaussianModel
from cryogs.simulate import random_ctf_params, simulate_stack, write_dataset

N, BOX, APIX = 12, 16, 2.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    gen = torch.Generator().manual_seed(11)
    model = GaussianModel(torch.randn(6, 3, generator=gen) * 3, torch.randn(6, 4, generator=gen),
                          torch.full((6, 3), 2.5), torch.ones(6))
    stack = simulate_stack(model, N, box_size=BOX, pixel_size=APIX, snr=2.0, seed=1,
                           ctf=random_ctf_params(N, (1000.0, 2000.0), seed=1))
    folder = tmp_path_factory.mktemp("bad_input_data")
    files = write_dataset(folder, model, stack, box_size=BOX, pixel_size=APIX)
    files["text"] = files["star"].read_text()
    with open(folder / "pose.pkl", "wb") as fh:
        pickle.dump((stack.rotations, np.zeros((N, 2))), fh)
    ctf = np.column_stack([np.full(N, BOX), np.full(N, APIX), stack.ctf["defocus_u"], stack.ctf["defocus_v"],
                           stack.ctf["defocus_angle"], np.full(N, 300.0), np.full(N, 2.7), np.full(N, 0.1),
                           np.zeros(N)])
    with open(folder / "ctf.pkl", "wb") as fh:
        pickle.dump(ctf, fh)
    files["pose"], files["ctf"] = folder / "pose.pkl", folder / "ctf.pkl"
    files["cs"] = folder / "particles.cs"
    np.save(files["cs"], _cs_array(stack.rotations), allow_pickle=False)
    (folder / "particles.cs.npy").rename(files["cs"])
    return files


def _cs_array(rotations, **change):
    """A cryoSPARC-like structured array for the data set's stack (axis-angle poses)."""
    from scipy.spatial.transform import Rotation

    fields = {"blob/path": ("S20", b"particles.mrcs"), "blob/idx": ("<u4", np.arange(N)),
              "blob/shape": ("<u4", (BOX, BOX), (2,)), "blob/psize_A": ("<f4", APIX),
              "alignments3D/pose": ("<f4", Rotation.from_matrix(np.transpose(rotations, (0, 2, 1))).as_rotvec(), (3,)),
              "alignments3D/shift": ("<f4", 0.0, (2,))}
    for name, value in change.items():
        if value is None:
            fields.pop(name)
        else:
            fields[name] = (fields[name][0], value, *fields[name][2:])
    arr = np.zeros(N, dtype=[(k, v[0], *v[2:]) for k, v in fields.items()])
    for k, v in fields.items():
        arr[k] = v[1]
    return arr


# ------------------------------------------------------------------ helpers that write the bad files
def star(tmp, data, edit, name="bad.star"):
    """The data set's STAR file with ``edit(text) -> text`` applied, beside a copy of its stack."""
    (tmp / "particles.mrcs").write_bytes(data["stack"].read_bytes())
    (tmp / name).write_text(edit(data["text"]))
    return tmp / name


def rec(path, *more):
    return ["reconstruct", str(path), "--out", "OUT", "--device", "cpu", "--no-progress", *more]


def good(data, *more):
    return rec(data["star"], *more)


def row(text, k):
    """Line ``k`` (0-based) of the particles loop."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("000001@"))
    return lines[start + k]


def replace_row(text, k, new):
    return text.replace(row(text, k), new)


def add_column(text, name, values):
    """A particles column ``_name`` with one value per row."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("000001@"))
    lines.insert(start, f"_{name}")
    for k, value in enumerate(values):
        lines[start + 1 + k] += f"\t{value}"
    return "\n".join(lines) + "\n"


def set_field(text, k, column, value):
    """Column ``column`` (0-based) of particle row ``k`` set to ``value``."""
    fields = row(text, k).split("\t")
    fields[column] = value
    return replace_row(text, k, "\t".join(fields))


def stack_file(tmp, array, name="s.mrcs"):
    with mrcfile.new(tmp / name, overwrite=True) as m:
        m.set_data(np.asarray(array, np.float32))
    return tmp / name


def pkl(tmp, obj, name="p.pkl"):
    with open(tmp / name, "wb") as fh:
        pickle.dump(obj, fh)
    return tmp / name


def cs(tmp, data, name="bad.cs", **change):
    (tmp / "particles.mrcs").write_bytes(data["stack"].read_bytes())
    rotations = np.stack([np.eye(3)] * N)
    np.save(tmp / "x.npy", _cs_array(rotations, **change), allow_pickle=False)
    (tmp / "x.npy").rename(tmp / name)
    return tmp / name


def write(tmp, name, content):
    path = tmp / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def mrcs(tmp, data, *more):
    return ["reconstruct", str(data["stack"]), "--out", "OUT", "--device", "cpu", "--no-progress", *more]


def fsc(*args):
    return ["fsc", *map(str, args)]


def volume(tmp, name, shape=(BOX,) * 3, voxel=APIX):
    with mrcfile.new(tmp / name, overwrite=True) as m:
        m.set_data(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        m.voxel_size = voxel
    return tmp / name


CASES = [
    # ---------------------------------------------------------------- RELION STAR files
    ("star-empty", lambda t, d: rec(write(t, "e.star", "")), ["e.star"]),
    ("star-binary", lambda t, d: rec(write(t, "b.star", bytes(range(256)) * 4)), ["b.star"]),
    ("star-no-blocks", lambda t, d: rec(write(t, "n.star", "just some text\nno blocks\n")), ["n.star"]),
    ("star-no-image-name", lambda t, d: rec(star(t, d, lambda s: s.replace("_rlnImageName #1", "_rlnFoo #1"))),
     ["bad.star", "_rlnImageName"]),
    ("star-no-particles", lambda t, d: rec(star(t, d, lambda s: s[:s.index("000001@")])), ["bad.star", "no particles"]),
    ("star-short-row", lambda t, d: rec(star(t, d, lambda s: replace_row(s, 3, row(s, 3).rsplit("\t", 3)[0]))),
     ["bad.star", "particle 4"]),
    ("star-long-row", lambda t, d: rec(star(t, d, lambda s: replace_row(s, 2, row(s, 2) + "\t7\t8"))),
     ["bad.star"]),
    ("star-text-angle", lambda t, d: rec(star(t, d, lambda s: set_field(s, 5, 1, "abc"))),
     ["bad.star", "particle 6", "abc"]),
    ("star-image-name-no-index", lambda t, d: rec(star(t, d, lambda s: s.replace("000002@particles", "x@particles"))),
     ["bad.star", "particle 2", "index@stack"]),
    ("star-image-index-zero", lambda t, d: rec(star(t, d, lambda s: s.replace("000002@particles", "0@particles"))),
     ["bad.star", "particle 2"]),
    ("star-missing-stack", lambda t, d: rec(star(t, d, lambda s: s.replace("@particles.mrcs", "@gone.mrcs"))),
     ["gone.mrcs"]),
    ("star-index-beyond-stack", lambda t, d: rec(star(t, d, lambda s: s.replace("000012@particles", "000099@particles"))),
     ["particle 12", "99"]),
    ("star-stack-wrong-box", lambda t, d: rec(star(t, d, lambda s: s.replace("@particles.mrcs", "@s.mrcs")))
     if stack_file(t, np.zeros((N, 8, 8))) else None, ["s.mrcs", "box"]),
    ("star-unknown-optics-group", lambda t, d: rec(star(t, d, lambda s: set_field(s, 0, 6, "7"))),
     ["bad.star", "optics group 7"]),
    ("star-zero-pixel-size", lambda t, d: rec(star(t, d, lambda s: s.replace("opticsGroup1\t2.000000", "opticsGroup1\t0"))),
     ["bad.star", "pixel size"]),
    ("star-no-pixel-size", lambda t, d: rec(star(t, d, lambda s: s.replace("_rlnImagePixelSize", "_rlnFooSize"))),
     ["bad.star", "pixel size"]),
    ("star-no-angles", lambda t, d: rec(star(t, d, lambda s: s.replace("_rlnAngleTilt", "_rlnFooTilt"))),
     ["bad.star", "_rlnAngleTilt"]),
    ("star-defocus-without-voltage", lambda t, d: rec(star(t, d, lambda s: s.replace("_rlnVoltage", "_rlnFooVoltage"))),
     ["bad.star", "_rlnVoltage"]),
    ("star-origin-x-without-y", lambda t, d: rec(star(t, d, lambda s: s.replace("_rlnOriginYAngst", "_rlnFooY"))),
     ["bad.star", "_rlnOriginYAngst"]),
    ("star-is-a-folder", lambda t, d: rec((t / "dir.star").mkdir() or t / "dir.star"), ["dir.star", "folder"]),
    ("star-missing", lambda t, d: rec(t / "nope.star"), ["nope.star"]),
    ("star-with-poses-option", lambda t, d: good(d, "--poses", str(d["pose"])), ["--poses"]),
    ("star-no-such-optics-group", lambda t, d: good(d, "--optics-groups", "5"), ["optics group"]),
    ("star-nan-image", lambda t, d: rec(star(t, d, lambda s: s.replace("@particles.mrcs", "@s.mrcs")))
     if stack_file(t, np.where(np.arange(N)[:, None, None] == 4, np.nan, np.ones((N, BOX, BOX)))) else None,
     ["NaN", "particle 5"]),
    ("star-fractional-random-subset", lambda t, d: rec(star(t, d, lambda s: add_column(
        s, "rlnRandomSubset", ["1", "2", "1.5"] + ["1"] * (N - 3)))), ["bad.star", "particle 3", "_rlnRandomSubset"]),
    ("star-datadir-missing", lambda t, d: good(d, "--datadir", str(t / "nodir")), ["nodir"]),
    # ---------------------------------------------------------------- cryoSPARC .cs files
    ("cs-not-numpy", lambda t, d: rec(write(t, "x.cs", "hello")), ["x.cs"]),
    ("cs-plain-array", lambda t, d: rec(np.save(t / "p.npy", np.zeros(3)) or (t / "p.npy").rename(t / "p.cs") or t / "p.cs"),
     ["p.cs", "structured"]),
    ("cs-no-poses", lambda t, d: rec(cs(t, d, **{"alignments3D/pose": None})), ["bad.cs", "alignments3D/pose"]),
    ("cs-no-blob-path", lambda t, d: rec(cs(t, d, **{"blob/path": None})), ["bad.cs", "blob/path"]),
    ("cs-nan-pose", lambda t, d: rec(cs(t, d, **{"alignments3D/pose": np.where(np.arange(N)[:, None] == 3, np.nan, 0.1)})),
     ["bad.cs", "particle 4"]),
    ("cs-two-pixel-sizes", lambda t, d: rec(cs(t, d, **{"blob/psize_A": np.where(np.arange(N) == 2, 3.0, APIX)})),
     ["bad.cs", "pixel size"]),
    ("cs-missing-stack", lambda t, d: rec(cs(t, d, **{"blob/path": b"nowhere.mrcs"})), ["nowhere.mrcs"]),
    ("cs-wrong-box", lambda t, d: rec(cs(t, d, **{"blob/shape": (20, 20)})), ["box"]),
    ("cs-empty", lambda t, d: rec(np.save(t / "e.npy", _cs_array(np.stack([np.eye(3)] * N))[:0]) or
                                  (t / "e.npy").rename(t / "e.cs") or t / "e.cs"), ["e.cs", "no particles"]),
    ("cs-with-ctf-option", lambda t, d: rec(d["cs"], "--ctf", str(d["ctf"])), ["--ctf"]),
    # ---------------------------------------------------------------- cryoDRGN stacks and pickles
    ("mrcs-without-poses", lambda t, d: mrcs(t, d), ["--poses"]),
    ("pose-not-a-pickle", lambda t, d: mrcs(t, d, "--poses", str(write(t, "p.pkl", "text")), "--ctf", str(d["ctf"])),
     ["p.pkl"]),
    ("pose-wrong-shape", lambda t, d: mrcs(t, d, "--poses", str(pkl(t, np.zeros((N, 2)))), "--ctf", str(d["ctf"])),
     ["p.pkl", "[N, 3, 3]"]),
    ("pose-wrong-count", lambda t, d: mrcs(t, d, "--poses", str(pkl(t, np.stack([np.eye(3)] * 5))),
                                           "--ctf", str(d["ctf"])), ["p.pkl", "5"]),
    ("pose-not-rotations", lambda t, d: mrcs(t, d, "--poses", str(pkl(t, np.stack([2 * np.eye(3)] * N))),
                                             "--ctf", str(d["ctf"])), ["p.pkl", "particle 1", "rotation"]),
    ("pose-nan", lambda t, d: mrcs(t, d, "--poses", str(pkl(t, np.where(np.arange(N)[:, None, None] == 7, np.nan,
                                                                        np.eye(3)))), "--ctf", str(d["ctf"])),
     ["p.pkl", "particle 8"]),
    ("pose-missing", lambda t, d: mrcs(t, d, "--poses", str(t / "none.pkl"), "--ctf", str(d["ctf"])), ["none.pkl"]),
    ("ctf-wrong-shape", lambda t, d: mrcs(t, d, "--poses", str(d["pose"]), "--ctf", str(pkl(t, np.zeros((N, 4))))),
     ["p.pkl", "[N, 9]"]),
    ("ctf-negative-apix", lambda t, d: mrcs(t, d, "--poses", str(d["pose"]), "--ctf",
                                            str(pkl(t, np.tile([BOX, -1.0, 1e4, 1e4, 0, 300, 2.7, 0.1, 0], (N, 1))))),
     ["p.pkl", "particle 1", "Apix"]),
    ("stack-without-pixel-size", lambda t, d: mrcs(t, d, "--poses", str(d["pose"])), ["--pixel-size"]),
    ("pkl-as-particles", lambda t, d: rec(d["pose"]), ["pose.pkl", "--poses"]),
    ("stack-list-missing-stack", lambda t, d: rec(write(t, "l.txt", f"{d['stack']}\nmissing.mrcs\n"), "--poses",
                                                  str(d["pose"]), "--pixel-size", "2"), ["l.txt", "line 2", "missing.mrcs"]),
    ("stack-list-empty", lambda t, d: rec(write(t, "l.txt", "# nothing\n"), "--poses", str(d["pose"]),
                                          "--pixel-size", "2"), ["l.txt", "no image stacks"]),
    ("stack-truncated", lambda t, d: rec(write(t, "t.mrcs", d["stack"].read_bytes()[:2000]), "--poses", str(d["pose"]),
                                         "--pixel-size", "2"), ["t.mrcs"]),
    ("stack-not-square", lambda t, d: rec(stack_file(t, np.zeros((N, BOX, BOX + 2))), "--poses", str(d["pose"]),
                                          "--pixel-size", "2"), ["s.mrcs", "square"]),
    # ---------------------------------------------------------------- index files
    ("ind-missing", lambda t, d: good(d, "--ind", str(t / "none.pkl")), ["none.pkl"]),
    ("ind-beyond-last", lambda t, d: good(d, "--ind", str(pkl(t, np.array([0, 3, 40])))), ["p.pkl", "entry 3", "40"]),
    ("ind-negative", lambda t, d: good(d, "--ind", str(pkl(t, np.array([0, -1])))), ["p.pkl", "entry 2"]),
    ("ind-repeated", lambda t, d: good(d, "--ind", str(pkl(t, np.array([1, 2, 1])))), ["p.pkl", "appears twice"]),
    ("ind-boolean-mask", lambda t, d: good(d, "--ind", str(pkl(t, np.ones(N, bool)))), ["p.pkl", "boolean"]),
    ("ind-text-not-integers", lambda t, d: good(d, "--ind", str(write(t, "i.txt", "1 2 2.5\n"))), ["i.txt", "entry 3"]),
    ("ind-unknown-type", lambda t, d: good(d, "--ind", str(write(t, "i.csv", "1,2\n"))), ["i.csv"]),
    ("ind-empty", lambda t, d: good(d, "--ind", str(write(t, "i.txt", "\n"))), ["i.txt"]),
    # ---------------------------------------------------------------- MRC maps
    ("reference-missing", lambda t, d: good(d, "--reference", str(t / "none.mrc")), ["none.mrc"]),
    ("reference-wrong-box", lambda t, d: good(d, "--reference", str(volume(t, "r.mrc", (20,) * 3))),
     ["--reference", "r.mrc", "box"]),
    ("reference-wrong-voxel", lambda t, d: good(d, "--reference", str(volume(t, "r.mrc", voxel=1.0))),
     ["--reference", "r.mrc", "voxel size"]),
    ("reference-after-downsample", lambda t, d: good(d, "--reference", str(d["map"]), "--downsample", "8"),
     ["--reference", "box"]),
    ("reference-garbage", lambda t, d: good(d, "--reference", str(write(t, "g.mrc", b"\0" * 100))), ["g.mrc"]),
    ("init-map-missing", lambda t, d: good(d, "--init", "map", str(t / "none.mrc")), ["--init", "none.mrc"]),
    ("fsc-different-boxes", lambda t, d: fsc(volume(t, "a.mrc"), volume(t, "b.mrc", (20,) * 3)), ["box"]),
    ("fsc-different-voxels", lambda t, d: fsc(volume(t, "a.mrc"), volume(t, "b.mrc", voxel=3.0)), ["voxel"]),
    ("fsc-garbage-map", lambda t, d: fsc(write(t, "g.mrc", b"x" * 3000), d["map"]), ["g.mrc"]),
    ("fsc-missing-map", lambda t, d: fsc(t / "none.mrc", d["map"]), ["none.mrc"]),
    ("fsc-image-not-map", lambda t, d: fsc(stack_file(t, np.zeros((BOX, BOX)), "i.mrc"), d["map"]), ["i.mrc"]),
    # ---------------------------------------------------------------- options
    ("epochs-zero", lambda t, d: good(d, "--epochs", "0"), ["--epochs"]),
    ("gaussians-zero", lambda t, d: good(d, "--gaussians", "0"), ["--gaussians"]),
    ("gaussians-a-billion", lambda t, d: good(d, "--gaussians", "1000000000", "--init", "random"),
     ["1,000,000,000 Gaussians", "GiB"]),
    ("gaussians-a-billion-on-a-map", lambda t, d: good(d, "--gaussians", "1000000000", "--init", "map", str(d["map"])),
     ["1,000,000,000 Gaussians", "GiB"]),
    ("gaussians-not-a-number", lambda t, d: good(d, "--gaussians", "many"), ["--gaussians", "many"]),
    ("batch-size-zero", lambda t, d: good(d, "--batch-size", "0"), ["--batch-size"]),
    ("learning-rate-negative", lambda t, d: good(d, "--lr-means", "-1"), ["--lr-means"]),
    ("coarse-above-one", lambda t, d: good(d, "--coarse", "2"), ["--coarse"]),
    ("refine-start-negative", lambda t, d: good(d, "--refine-start", "-0.1"), ["--refine-start"]),
    ("checkpoint-every-zero", lambda t, d: good(d, "--checkpoint-every", "0"), ["--checkpoint-every"]),
    ("prior-weight-nan", lambda t, d: good(d, "--reg-tv", "nan"), ["--reg-tv"]),
    ("device-no-gpu-here", lambda t, d: good(d, "--device", "cuda:7"), ["--device", "cuda:7"]),
    ("device-nonsense", lambda t, d: good(d, "--device", "warp-drive"), ["--device", "warp-drive"]),
    ("downsample-zero", lambda t, d: good(d, "--downsample", "0"), ["--downsample"]),
    ("downsample-larger-than-box", lambda t, d: good(d, "--downsample", "64"), ["downsample", "64"]),
    ("mask-radius-negative", lambda t, d: good(d, "--half-maps", "--mask-radius", "-5"), ["--mask-radius"]),
    ("mask-radius-sub-pixel", lambda t, d: good(d, "--half-maps", "--mask-radius", "0.5"), ["mask radius", "0.5"]),
    ("pixel-size-negative", lambda t, d: mrcs(t, d, "--poses", str(d["pose"]), "--pixel-size", "-2"), ["--pixel-size"]),
    ("init-unknown", lambda t, d: good(d, "--init", "mesh"), ["--init"]),
    ("resume-without-run", lambda t, d: good(d, "--resume"), ["--resume", "no cryogs run"]),
    ("resume-and-overwrite", lambda t, d: good(d, "--resume", "--overwrite"), ["--resume", "--overwrite"]),
    ("no-particles-without-resume", lambda t, d: ["reconstruct", "--out", "OUT", "--device", "cpu"], ["particle file"]),
    ("fsc-mask-sub-voxel", lambda t, d: fsc(d["map"], d["map"], "--mask-radius", "1"), ["mask radius"]),
    ("fsc-pixel-size-zero", lambda t, d: fsc(d["map"], d["map"], "--pixel-size", "0"), ["--pixel-size"]),
    ("simulate-snr-zero", lambda t, d: ["simulate", str(d["gaussians"]), "--out", "OUT", "--snr", "0"], ["--snr"]),
    ("simulate-no-particles", lambda t, d: ["simulate", str(d["gaussians"]), "--out", "OUT", "-n", "0"],
     ["--particles"]),
    ("simulate-defocus-reversed", lambda t, d: ["simulate", str(d["gaussians"]), "--out", "OUT", "--defocus", "3000",
                                                "1000"], ["--defocus"]),
    ("simulate-unknown-source", lambda t, d: ["simulate", str(write(t, "m.xyz", "1 2 3")), "--out", "OUT"], ["m.xyz"]),
    ("backproject-wiener-negative", lambda t, d: ["backproject", str(d["star"]), "--out", "OUT", "--wiener", "-1"],
     ["--wiener"]),
    ("backproject-mask-without-fsc", lambda t, d: ["backproject", str(d["star"]), "--out", "OUT", "--no-half-maps",
                                                   "--mask-radius", "10"], ["--mask-radius"]),
    # ---------------------------------------------------------------- output folders
    ("out-is-a-file", lambda t, d: [a if a != "OUT" else str(write(t, "f.txt", "x")) for a in good(d)],
     ["--out", "f.txt", "file"]),
    ("out-inside-a-file", lambda t, d: [a if a != "OUT" else str(write(t, "f.txt", "x") / "run") for a in good(d)],
     ["f.txt", "not a folder"]),
    ("out-cannot-be-made", lambda t, d: [a if a != "OUT" else "/proc/cryogs-run" for a in good(d, "--epochs", "1")],
     ["/proc/cryogs-run"]),
    ("out-holds-files", lambda t, d: [a if a != "OUT" else str(write(t, "full", "") and t) for a in good(d)],
     ["--out", "--overwrite"]),
    ("backproject-out-holds-files", lambda t, d: ["backproject", str(d["star"]), "--out", str(d["star"].parent)],
     ["--out", "--overwrite"]),
    ("simulate-out-is-a-file", lambda t, d: ["simulate", str(d["gaussians"]), "--out", str(d["star"])],
     ["--out", "file"]),
    ("fsc-out-is-a-folder", lambda t, d: fsc(d["map"], d["map"], "--out", t), ["--out", "folder"]),
    ("fsc-out-not-an-image", lambda t, d: fsc(d["map"], d["map"], "--out", t / "fsc.mrc"), ["--out", ".mrc"]),
]


def test_the_table_is_large_and_its_names_unique():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("make, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, data, make, fragments, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in make(tmp_path, data)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cryogs(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"cryogs {argv[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command left files behind"


def test_metrics_json_is_strict_json(tmp_path):
    """NaN and infinities (a resolution never reached, the correlation of a constant map) become null:
    Python's json would write bare NaN/Infinity, which other readers reject."""
    from cryogs.io.atomic import write_json

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == \
        {"a": None, "b": [1.0, None], "c": {"d": None}}
