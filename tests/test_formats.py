"""cryoSPARC .cs and cryoDRGN stack + pkl inputs: fixtures, parity with cryoDRGN's own conversion,
the shift sign, index files, and bad input giving one-line errors."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import cryogs.io.mrc
import cryogs.io.particles
from cryogs import project
from cryogs.errors import CryogsError
from cryogs.io.cryodrgn import load_cryodrgn
from cryogs.io.cryosparc import load_cs
from cryogs.io.load import load_particles
from cryogs.io.mrc import write_mrc
from cryogs.io.particles import CTF_KEYS, load_indices
from cryogs.io.star import load_star

from helpers import random_mixture

DATA = Path(__file__).parent / "data"
P12 = DATA / "cryosparc_P12_J24_001_particles.cs"


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _fresh_rng() -> np.random.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def _pickle(path: Path, obj) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)
    return path


def _write_cs(path: Path, n: int, *, box: int, psize: float, stack: str, idx=None, pose=None, shift=None) -> Path:
    """A minimal cryoSPARC-style structured array, saved under a .cs name."""
    fields = [("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
              ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    if pose is not None:
        fields += [("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4")]
    a = np.zeros(n, dtype=fields)
    a["uid"] = np.arange(n)
    a["blob/path"] = (">" + stack).encode()
    a["blob/idx"] = np.arange(n) if idx is None else idx
    a["blob/shape"] = box
    a["blob/psize_A"] = psize
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
    a["ctf/df1_A"], a["ctf/df2_A"], a["ctf/df_angle_rad"] = 12000, 11500, 0.3
    if pose is not None:
        a["alignments3D/pose"], a["alignments3D/shift"], a["alignments3D/psize_A"] = pose, shift, psize
    with open(path, "wb") as fh:  # a file handle: np.save would otherwise append .npy
        np.save(fh, a)
    return path


# --- fixtures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, n, apix, dfu0, has_rot",
    [
        ("relion31.star", {}, 5, 2.806, 13108.082418, True),
        ("relion31.6opticsgroups.star", {"optics_groups": [2, 5]}, None, 1.24, None, True),
        ("relion5.star", {}, 17, 0.89, None, True),
        ("empiar_10076_7.star", {"require_poses": False}, 7, 1.31, 15301.1, False),
        ("empiar_10076_7.cs", {"require_poses": False}, 7, 1.31, 15301.1, False),
        ("cryosparc_P12_J24_001_particles.cs", {}, 2019, 2.95, 45591.37, True),
    ],
)
def test_every_fixture_parses(name, kwargs, n, apix, dfu0, has_rot):
    ps = load_particles(DATA / name, **kwargs)
    if n is not None:
        assert len(ps) == n
    assert ps.pixel_size == pytest.approx(apix, abs=2e-3)
    assert set(ps.ctf) == set(CTF_KEYS)
    if dfu0 is not None:
        assert ps.ctf["defocus_u"][0] == pytest.approx(dfu0, rel=1e-6)
    assert (ps.rotations is not None) == has_rot
    if has_rot:
        R = ps.rotations
        np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)


def test_p12_fixture_fields():
    ps = load_cs(P12)
    raw = np.load(P12)
    assert len(ps) == 2019 and ps.box_size == 180 and ps.pixel_size == 2.95  # float32 2.95 shown as 2.95
    # particle 0: A = from_rotvec(pose)^T (an independent statement of the convention, via scipy)
    np.testing.assert_allclose(ps.rotations[0], Rotation.from_rotvec(raw["alignments3D/pose"][0]).as_matrix().T, atol=1e-6)
    np.testing.assert_allclose(ps.shifts[0], np.array([11.334375, -1.828125]) * 2.95, rtol=1e-6)
    c = {k: v[0] for k, v in ps.ctf.items()}
    assert c["defocus_u"] == pytest.approx(45591.37) and c["defocus_v"] == pytest.approx(45309.793)
    assert c["defocus_angle"] == pytest.approx(np.rad2deg(-1.3636448)) and c["voltage"] == 200
    assert c["cs"] == 2.0 and c["amplitude_contrast"] == pytest.approx(0.07) and c["phase_shift"] == 0 and c["bfactor"] == 0
    # blob/path is resolved next to the .cs (the stacks are not shipped), blob/idx stays 0-based
    assert ps.stacks[0].endswith("20150917_05196_DNA-TET-25k-DE20_raw.region_000.sum-all_003-072_particles.mrc")
    assert len(ps.stacks) == 50
    np.testing.assert_array_equal(ps.stack_index, raw["blob/idx"])
    assert set(ps.random_subset.tolist()) == {1, 2}


def test_cs_matches_cryodrgn_pkls():
    ps = load_cs(P12)
    rot, trans = pickle.loads((DATA / "pose.cs.pkl").read_bytes())
    ctf = pickle.loads((DATA / "ctf2.pkl").read_bytes())
    np.testing.assert_allclose(ps.rotations, rot, atol=1e-5, rtol=0)
    D, p = ps.box_size, ps.pixel_size
    np.testing.assert_allclose(ps.shifts / (D * p), trans, rtol=1e-5, atol=0)  # trans = origin / (D·apix)
    mine = np.column_stack(
        [np.full(len(ps), D), np.full(len(ps), p)] + [ps.ctf[k] for k in CTF_KEYS[:7]]
    )
    np.testing.assert_allclose(mine, ctf, rtol=1e-5, atol=0)


def test_cs_loading_opens_no_stack(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a stack was opened while loading")

    monkeypatch.setattr(cryogs.io.particles, "open_stack", refuse)
    monkeypatch.setattr(cryogs.io.mrc, "open_stack", refuse)
    ps = load_cs(P12)
    assert len(ps) == 2019
    monkeypatch.undo()
    with pytest.raises(CryogsError, match=r"\.mrc not found.*particle 1 of .*P12_J24_001_particles\.cs.*--datadir") as err:
        ps.images([0])
    _one_line(err)


def test_empiar_cs_agrees_with_star():
    cs = load_cs(DATA / "empiar_10076_7.cs", require_poses=False)
    st = load_star(DATA / "empiar_10076_7.star", require_poses=False)
    assert len(cs) == len(st) == 7 and cs.box_size == st.box_size == 320
    assert cs.pixel_size == pytest.approx(st.pixel_size, rel=1e-6)
    for k in CTF_KEYS:
        np.testing.assert_allclose(cs.ctf[k], st.ctf[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert cs.image_paths == st.image_paths
    np.testing.assert_array_equal(cs.images([0, 6]), st.images([0, 6]))
    np.testing.assert_array_equal(cs.shifts, st.shifts)  # neither carries alignments


def test_cryodrgn_round_trip_with_cs(tmp_path):
    """cryoDRGN's own conversion of the .cs (pose.cs.pkl + ctf2.pkl) loads to the same particles."""
    cs = load_cs(P12)
    # Full set, tiny 8-px stand-in images: the ctf.pkl's D·Apix (the box width) fixes the pixel size,
    # and fractional translations give the same origins in Å.
    write_mrc(tmp_path / "tiny.mrcs", np.zeros((2019, 8, 8), np.float32), 1.0)
    ps = load_cryodrgn(tmp_path / "tiny.mrcs", poses=DATA / "pose.cs.pkl", ctf=DATA / "ctf2.pkl")
    assert len(ps) == 2019 and ps.box_size == 8
    assert ps.pixel_size == pytest.approx(180 * 2.95 / 8, rel=1e-6)
    np.testing.assert_allclose(ps.rotations, cs.rotations, atol=1e-5)
    np.testing.assert_allclose(ps.shifts, cs.shifts, rtol=1e-5, atol=1e-9)
    for k in CTF_KEYS:
        np.testing.assert_allclose(ps.ctf[k], cs.ctf[k], rtol=1e-5, atol=1e-9, err_msg=k)
    # A subset at full size, through a .txt list of stacks (paths relative to the txt).
    rot, trans = pickle.loads((DATA / "pose.cs.pkl").read_bytes())
    ctf = pickle.loads((DATA / "ctf2.pkl").read_bytes())
    (tmp_path / "st").mkdir()
    write_mrc(tmp_path / "st" / "a.mrcs", np.zeros((2, 180, 180), np.float32), 1.0)
    write_mrc(tmp_path / "st" / "b.mrcs", np.zeros((3, 180, 180), np.float32), 1.0)
    (tmp_path / "list.txt").write_text("st/a.mrcs\n\nst/b.mrcs\n")
    sub = load_particles(tmp_path / "list.txt", poses=_pickle(tmp_path / "p.pkl", (rot[:5], trans[:5])),
                         ctf=_pickle(tmp_path / "c.pkl", ctf[:5]))
    assert sub.pixel_size == pytest.approx(2.95) and sub.box_size == 180
    assert [Path(s).name for s, _ in sub.image_paths] == ["a.mrcs", "a.mrcs", "b.mrcs", "b.mrcs", "b.mrcs"]
    assert [i for _, i in sub.image_paths] == [0, 1, 0, 1, 2]
    np.testing.assert_allclose(sub.shifts, cs.shifts[:5], rtol=1e-5)
    # A bare rotation array: centred particles; no ctf.pkl: the pixel size must be given.
    bare = load_cryodrgn(tmp_path / "st" / "a.mrcs", poses=_pickle(tmp_path / "r.pkl", rot[:2]), pixel_size=2.0)
    assert bare.ctf is None and bare.pixel_size == 2.0
    np.testing.assert_array_equal(bare.shifts, 0.0)


# --- the shift sign, checked with images ----------------------------------------------------


def _cryodrgn_translate(img: np.ndarray, t) -> np.ndarray:
    """cryoDRGN's ``Lattice.translate_ht(ht2_center(img), t)`` in numpy: the formula
    ``H'(k) = cos(2π k·t) H(k) + sin(2π k·t) H(-k)`` on the centred Hartley transform
    ``H = Re F - Im F``, ``F = fftshift(fft2(fftshift(img)))``, k in cycles/px, t = (tx, ty) px."""
    D = img.shape[-1]
    F = np.fft.fftshift(np.fft.fft2(np.fft.fftshift(img)))
    H = F.real - F.imag
    i = np.arange(D)
    neg = (2 * (D // 2) - i) % D  # index of -k
    Hm = H[neg][:, neg]
    k = (i - D // 2) / D
    phase = 2 * np.pi * (k[None, :] * t[0] + k[:, None] * t[1])
    H2 = np.cos(phase) * H + np.sin(phase) * Hm
    H2m = H2[neg][:, neg]
    F2 = (H2 + H2m) / 2 - 1j * (H2 - H2m) / 2
    return np.fft.ifftshift(np.fft.ifft2(np.fft.ifftshift(F2))).real


def test_cryodrgn_translation_moves_content_by_plus_t():
    D = 48
    y, x = np.mgrid[:D, :D] - D // 2
    blob = lambda cx, cy: np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 2.5**2))  # noqa: E731
    np.testing.assert_allclose(_cryodrgn_translate(blob(0, 0), (3.0, -5.0)), blob(3, -5), atol=1e-9)


def test_shift_sign_against_projector_and_cryodrgn(tmp_path, rng):
    """origin = +shift·apix: cryoDRGN's centring (translate by +trans·D = +shift px) of an image that
    cryogs renders with the loaded origin gives the centred projection; the opposite sign does not."""
    n, D, apix = 4, 64, 2.0
    # No mass may wrap around in the FFT translation: |μ| ≤ 8√3 Å and |shift| ≤ 4√2 px keep every centre within
    # 12.6 px of the middle, ≥ 18.4 px = 5.2σ (σ ≤ 7 Å) from the edges, where each of the 6 Gaussians is below
    # 1e-6 of its peak (≤ the image maximum): far under the 1e-4 asked.
    _, quats, scales, amps = random_mixture(6, rng, scale_range=(4.0, 7.0))
    means = (2 * torch.rand(6, 3, generator=rng, dtype=torch.float64) - 1) * 8
    r = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))
    pose = Rotation.random(n, random_state=r).as_rotvec().astype(np.float32)
    shift = r.uniform(-4, 4, (n, 2)).astype(np.float32)  # cryoSPARC pixels
    write_mrc(tmp_path / "s.mrcs", np.zeros((n, D, D), np.float32), apix)
    ps = load_cs(_write_cs(tmp_path / "p.cs", n, box=D, psize=apix, stack="s.mrcs", pose=pose, shift=shift))
    np.testing.assert_allclose(ps.shifts, shift * apix, rtol=1e-6)
    rot = torch.from_numpy(ps.rotations)
    kw = dict(box_size=D, pixel_size=apix, backend="dense")
    observed = project(means, quats, scales, amps, rot, torch.from_numpy(ps.shifts), **kw).numpy()
    centred = project(means, quats, scales, amps, rot, None, **kw).numpy()
    trans = shift.astype(np.float64) / D  # cryoDRGN parse_pose_csparc
    for i in range(n):
        scale = np.abs(centred[i]).max()
        good = _cryodrgn_translate(observed[i], trans[i] * D)
        bad = _cryodrgn_translate(observed[i], -trans[i] * D)
        assert np.abs(good - centred[i]).max() < 1e-4 * scale
        if np.linalg.norm(shift[i]) > 0.5:  # moved ≥ 1 px the wrong way: over 4000 images ≥ 17x this threshold
            assert np.abs(bad - centred[i]).max() > 1e-2 * scale
    # The same poses through cryoDRGN's pose.pkl give the same origins.
    pk = _pickle(tmp_path / "pose.pkl", (ps.rotations.astype(np.float32), trans.astype(np.float32)))
    dr = load_cryodrgn(tmp_path / "s.mrcs", poses=pk, pixel_size=apix)
    np.testing.assert_allclose(dr.shifts, ps.shifts, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dr.rotations, ps.rotations, atol=1e-6)


# --- index files ----------------------------------------------------------------------------


def test_load_indices(tmp_path):
    r = _fresh_rng()
    idx = r.choice(100, size=17, replace=False)
    np.testing.assert_array_equal(load_indices(_pickle(tmp_path / "i.pkl", idx), 100), idx)
    np.save(tmp_path / "i.npy", idx.astype(np.int32))
    got = load_indices(tmp_path / "i.npy", 100)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, idx)
    (tmp_path / "i.txt").write_text("# kept\n" + "\n".join(map(str, idx)) + "\n")
    np.testing.assert_array_equal(load_indices(tmp_path / "i.txt"), idx)
    np.testing.assert_array_equal(load_indices(_pickle(tmp_path / "f.pkl", [3.0, 1.0])), [3, 1])
    ps = load_particles(DATA / "relion31.star", ind=_pickle(tmp_path / "s.pkl", np.array([4, 0])))
    assert len(ps) == 2 and ps.describe(0).startswith("particle 5 of")


@pytest.mark.parametrize(
    "content, pattern",
    [
        (np.array([1, 5, 100]), r"entry 3 is 100, beyond the last particle .*100 particles"),
        (np.array([2, -1]), r"entry 2 is -1.*count from 0"),
        (np.array([1.0, 2.5]), r"entry 2 is 2\.5, not a whole-number"),
        (np.array([4, 7, 4]), r"index 4 appears twice \(entries 1 and 3\)"),
        (np.zeros((2, 2), dtype=int), r"1D array.*\(2, 2\)"),
        (np.array([True, False]), r"boolean mask"),
        (np.array([], dtype=int), r"no particle indices"),
        ({"a": 1}, r"expected an array of particle indices"),
    ],
)
def test_bad_indices(tmp_path, content, pattern):
    path = _pickle(tmp_path / "ind.pkl", content)
    with pytest.raises(CryogsError, match=pattern) as err:
        load_indices(path, 100)
    assert "ind.pkl" in _one_line(err)


def test_bad_index_files(tmp_path):
    (tmp_path / "bad.txt").write_text("1\n2\nthree\n")
    with pytest.raises(CryogsError, match=r"bad\.txt: not a readable index file.*three") as err:
        load_indices(tmp_path / "bad.txt")
    _one_line(err)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CryogsError, match=r"junk\.pkl: not a readable"):
        load_indices(tmp_path / "junk.pkl")
    with pytest.raises(CryogsError, match=r"absent\.pkl: index file not found"):
        load_indices(tmp_path / "absent.pkl")
    (tmp_path / "i.csv").write_text("1,2")
    with pytest.raises(CryogsError, match=r"i\.csv: unknown index file type"):
        load_indices(tmp_path / "i.csv")


# --- bad input ------------------------------------------------------------------------------


def test_cs_without_poses():
    with pytest.raises(CryogsError, match=r"empiar_10076_7\.cs: has no 3D poses \(alignments3D/pose\); run a refinement first") as err:
        load_particles(DATA / "empiar_10076_7.cs")
    _one_line(err)


def test_cs_index_beyond_stack(tmp_path):
    r = _fresh_rng()
    write_mrc(tmp_path / "three.mrcs", r.standard_normal((3, 16, 16)).astype(np.float32), 1.5)
    pose = Rotation.random(4, random_state=r).as_rotvec()
    cs = _write_cs(tmp_path / "far.cs", 4, box=16, psize=1.5, stack="three.mrcs", idx=[0, 2, 1, 7],
                   pose=pose, shift=np.zeros((4, 2)))
    ps = load_particles(cs)
    assert ps.stacks == [str(tmp_path / "three.mrcs")]  # '>' stripped, resolved next to the .cs
    np.testing.assert_array_equal(ps.images([1]), cryogs.io.mrc.open_stack(tmp_path / "three.mrcs")[[2]])
    with pytest.raises(CryogsError, match=r"particle 4 of .*far\.cs asks for image 8 of stack .*three\.mrcs.*only 3") as err:
        ps.images([0, 3])
    _one_line(err)
    with pytest.raises(CryogsError, match="only 3 images"):
        ps.check_stacks()
    # wrong box in the stack
    big = _write_cs(tmp_path / "box.cs", 3, box=20, psize=1.5, stack="three.mrcs", pose=pose[:3], shift=np.zeros((3, 2)))
    with pytest.raises(CryogsError, match=r"three\.mrcs has 16x16 images but .*box\.cs says box 20"):
        load_cs(big).images([0])


def test_not_a_cs_file(tmp_path):
    (tmp_path / "junk.cs").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CryogsError, match=r"junk\.cs: not a readable cryoSPARC \.cs file") as err:
        load_cs(tmp_path / "junk.cs")
    _one_line(err)
    with open(tmp_path / "plain.cs", "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(CryogsError, match=r"plain\.cs: not a cryoSPARC \.cs file"):
        load_cs(tmp_path / "plain.cs")


@pytest.fixture
def small_stack(tmp_path):
    write_mrc(tmp_path / "five.mrcs", _fresh_rng().standard_normal((5, 12, 12)).astype(np.float32), 1.0)
    return tmp_path / "five.mrcs"


def test_pose_count_mismatch(tmp_path, small_stack):
    rot = Rotation.random(6, random_state=0).as_matrix().transpose(0, 2, 1)
    pk = _pickle(tmp_path / "pose.pkl", (rot, np.zeros((6, 2))))
    with pytest.raises(CryogsError, match=r"pose\.pkl: has poses for 6 particles but there are 5 particle images") as err:
        load_cryodrgn(small_stack, poses=pk, pixel_size=1.0)
    _one_line(err)
    pk = _pickle(tmp_path / "trans.pkl", (rot[:5], np.zeros((4, 2))))
    with pytest.raises(CryogsError, match=r"trans\.pkl: translations must have shape \[5, 2\]"):
        load_cryodrgn(small_stack, poses=pk, pixel_size=1.0)
    notrot = rot[:5].copy()
    notrot[3] *= 2
    with pytest.raises(CryogsError, match=r"notrot\.pkl: pose of particle 4 is not a rotation"):
        load_cryodrgn(small_stack, poses=_pickle(tmp_path / "notrot.pkl", notrot), pixel_size=1.0)
    with pytest.raises(CryogsError, match=r"shape\.pkl: expected rotations of shape \[N, 3, 3\]"):
        load_cryodrgn(small_stack, poses=_pickle(tmp_path / "shape.pkl", np.zeros((5, 4))), pixel_size=1.0)


def test_ctf_pkl_bad_shape_and_pixel_size(tmp_path, small_stack):
    rot = Rotation.random(5, random_state=0).as_matrix()
    pk = _pickle(tmp_path / "pose.pkl", (rot, np.zeros((5, 2))))
    with pytest.raises(CryogsError, match=r"ctf\.pkl: expected a CTF table of shape \[N, 9\].*\(5, 8\)") as err:
        load_cryodrgn(small_stack, poses=pk, ctf=_pickle(tmp_path / "ctf.pkl", np.ones((5, 8))))
    _one_line(err)
    table = np.tile([12.0, 1.0, 10000, 9000, 10, 300, 2.7, 0.1, 0], (4, 1))
    with pytest.raises(CryogsError, match=r"c4\.pkl: has CTF parameters for 4 particles but there are 5"):
        load_cryodrgn(small_stack, poses=pk, ctf=_pickle(tmp_path / "c4.pkl", table))
    with pytest.raises(CryogsError, match=r"five\.mrcs: --pixel-size is required") as err:
        load_cryodrgn(small_stack, poses=pk)
    _one_line(err)
    c5 = _pickle(tmp_path / "c5.pkl", np.tile(table[:1], (5, 1)))
    with pytest.raises(CryogsError, match=r"c5\.pkl: gives a pixel size of 1 Å .* but --pixel-size is 2 Å"):
        load_cryodrgn(small_stack, poses=pk, ctf=c5, pixel_size=2.0)
    assert load_cryodrgn(small_stack, poses=pk, ctf=c5, pixel_size=1.0).pixel_size == 1.0


def test_stack_list_errors(tmp_path, small_stack):
    (tmp_path / "list.txt").write_text("five.mrcs\nmissing.mrcs\n")
    pk = _pickle(tmp_path / "pose.pkl", Rotation.random(10, random_state=0).as_matrix())
    with pytest.raises(CryogsError, match=r"list\.txt: line 2: stack missing\.mrcs not found.*--datadir") as err:
        load_cryodrgn(tmp_path / "list.txt", poses=pk, pixel_size=1.0)
    _one_line(err)
    (tmp_path / "sub").mkdir()
    shutil.copy(small_stack, tmp_path / "sub" / "missing.mrcs")
    ps = load_cryodrgn(tmp_path / "list.txt", poses=pk, pixel_size=1.0, datadir=tmp_path / "sub")
    assert len(ps) == 10 and ps.image_paths[7] == (str(tmp_path / "sub" / "missing.mrcs"), 2)


def test_load_particles_dispatch_errors(tmp_path, small_stack):
    with pytest.raises(CryogsError, match=r"five\.mrcs: an image stack needs poses.*--poses") as err:
        load_particles(small_stack)
    _one_line(err)
    with pytest.raises(CryogsError, match=r"pose\.cs\.pkl: a \.pkl holds poses or CTF"):
        load_particles(DATA / "pose.cs.pkl")
    with pytest.raises(CryogsError, match=r"relion31\.star: --poses only apply to image stacks"):
        load_particles(DATA / "relion31.star", poses=DATA / "pose.cs.pkl")
    with pytest.raises(CryogsError, match=r"x\.foo: unknown particle file type"):
        load_particles(tmp_path / "x.foo")
