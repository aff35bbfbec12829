"""RELION STAR particle sets: real fixtures, round trips, and bad input giving one-line errors."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryogs.errors import CryogsError
from cryogs.io.load import load_particles
from cryogs.io.mrc import open_stack, write_mrc
from cryogs.io.particles import CTF_KEYS, fourier_crop
from cryogs.io.star import load_star, write_star
from cryogs.physics.conventions import euler_to_matrix

DATA = Path(__file__).parent / "data"


def _copy_relion31(tmp_path: Path) -> Path:
    shutil.copy(DATA / "relion31.star", tmp_path / "relion31.star")
    shutil.copy(DATA / "relion31.mrcs", tmp_path / "relion31.mrcs")
    return tmp_path / "relion31.star"


def _edit_particle_line(src: Path, dst: Path, row: int, old: str, new: str) -> int:
    """Replace ``old`` by ``new`` in the ``row``-th particle line; return its 1-based line number."""
    lines = src.read_text().splitlines(keepends=True)
    hits = [i for i, l in enumerate(lines) if "@relion31.mrcs" in l]
    i = hits[row]
    assert old in lines[i]
    lines[i] = lines[i].replace(old, new, 1)
    dst.write_text("".join(lines))
    return i + 1


# --- real fixtures ----------------------------------------------------------------------------


def test_relion31_fixture():
    ps = load_star(DATA / "relion31.star")
    assert len(ps) == 5
    assert ps.pixel_size == pytest.approx(2.806)  # from the STAR file; the MRC header says 1.0
    assert ps.box_size == 256
    ref = starfile.read(DATA / "relion31.star")["particles"]
    eul = ref[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=float)
    np.testing.assert_allclose(ps.rotations[0], euler_to_matrix(eul[0]).numpy(), atol=1e-12)
    # Independent check against the convention's scipy statement: A = R_zyz(rot, tilt, psi)^T.
    np.testing.assert_allclose(
        ps.rotations, Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix().transpose(0, 2, 1), atol=1e-12
    )
    np.testing.assert_allclose(ps.shifts, ref[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=float))
    assert ps.shifts[0] == pytest.approx([0.019324, -0.64686])  # Å, not multiplied by the pixel size
    np.testing.assert_array_equal(ps.random_subset, [1, 1, 1, 1, 1])
    assert set(ps.ctf) == set(CTF_KEYS)
    assert ps.ctf["defocus_u"][0] == pytest.approx(13108.082418)
    assert ps.ctf["defocus_angle"][0] == pytest.approx(-160.39)
    assert ps.ctf["voltage"][0] == 300 and ps.ctf["cs"][0] == pytest.approx(0.01)
    assert ps.ctf["amplitude_contrast"][0] == pytest.approx(0.1)
    assert not ps.ctf_premultiplied
    assert ps.image_paths[3] == (str(DATA / "relion31.mrcs"), 3)
    imgs = ps.images([4, 0])
    assert imgs.shape == (2, 256, 256) and imgs.dtype == np.float32
    raw = open_stack(DATA / "relion31.mrcs")
    np.testing.assert_array_equal(imgs[0], raw[4])
    np.testing.assert_array_equal(imgs[1], raw[0])


def test_empiar_relion30_fixture():
    with pytest.raises(CryogsError, match="poses") as err:
        load_star(DATA / "empiar_10076_7.star")
    assert "empiar_10076_7.star" in str(err.value)
    ps = load_star(DATA / "empiar_10076_7.star", require_poses=False)
    assert len(ps) == 7
    assert ps.pixel_size == pytest.approx(5 * 1e4 / 38168) and ps.pixel_size == pytest.approx(1.31, abs=1e-3)
    assert ps.box_size == 320  # no rlnImageSize: read from the stack header
    assert ps.rotations is None
    np.testing.assert_array_equal(ps.shifts, 0.0)
    c = ps.ctf
    assert c["defocus_u"][0] == pytest.approx(15301.1) and c["defocus_v"][0] == pytest.approx(14916.4)
    assert c["defocus_angle"][0] == pytest.approx(5.28)
    assert c["voltage"][0] == 300 and c["cs"][0] == pytest.approx(2.7)
    assert c["amplitude_contrast"][0] == pytest.approx(0.07)
    np.testing.assert_array_equal(c["phase_shift"], 0.0)
    assert ps.images([6]).shape == (1, 320, 320)


def test_relion30_origins_in_pixels_become_angstrom(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((2, 8, 8)), 1.0)
    (tmp_path / "p.star").write_text(
        "data_\n\nloop_\n_rlnImageName\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n_rlnOriginX\n_rlnOriginY\n"
        "_rlnDetectorPixelSize\n_rlnMagnification\n"
        "1@s.mrcs 10 20 30 1.5 -2.0 14 50000\n2@s.mrcs 0 0 0 0 3 14 50000\n"
    )
    ps = load_star(tmp_path / "p.star")
    assert ps.pixel_size == pytest.approx(2.8)
    np.testing.assert_allclose(ps.shifts, [[1.5 * 2.8, -2.0 * 2.8], [0.0, 3 * 2.8]])
    assert ps.ctf is None
    assert ps.box_size == 8


def test_relion5_fixture():
    ps = load_star(DATA / "relion5.star")  # extra optics columns (Zernike, MagMat) are ignored
    assert len(ps) == 17
    assert ps.pixel_size == pytest.approx(0.89)
    assert ps.box_size == 448
    np.testing.assert_array_equal(ps.ctf["voltage"], 100.0)
    np.testing.assert_array_equal(ps.ctf["cs"], 1.6)
    assert ps.shifts[0] == pytest.approx([-3.12578, -1.41031])
    assert sorted(Path(s).name for s in ps.stacks) == ["toy_images_a.mrcs", "toy_images_b.mrcs"]
    assert list(ps.random_subset[:3]) == [1, 2, 2]
    # Its stacks are not shipped: reading must fail naming the stack and the particle.
    with pytest.raises(CryogsError, match=r"toy_images_a\.mrcs.*particle 1 of .*relion5\.star"):
        ps.images([0])


def test_six_optics_groups():
    with pytest.raises(CryogsError, match="pixel size") as err:
        load_star(DATA / "relion31.6opticsgroups.star")
    msg = str(err.value)
    assert "relion31.6opticsgroups.star" in msg and "1.24" in msg and "1.25" in msg and "\n" not in msg
    ps = load_star(DATA / "relion31.6opticsgroups.star", optics_groups=[1, 3, 4, 6])
    ref = starfile.read(DATA / "relion31.6opticsgroups.star")
    counts = ref["particles"]["rlnOpticsGroup"].value_counts()
    assert len(ps) == sum(counts[g] for g in (1, 3, 4, 6))
    assert ps.pixel_size == pytest.approx(1.25) and ps.box_size == 196
    # Per-particle optics come from each particle's own group (group 4 has Cs 2.6).
    cs_of_group = dict(zip(ref["optics"]["rlnOpticsGroup"], ref["optics"]["rlnSphericalAberration"]))
    np.testing.assert_allclose(ps.ctf["cs"], [cs_of_group[g] for g in ps.optics_group])
    assert set(ps.ctf["cs"]) == {2.6, 2.7}
    np.testing.assert_array_equal(ps.ctf["voltage"], 200.0)
    assert Path(ps.stacks[0]).name == "0003_shiny.mrcs"


# --- write and read back ---------------------------------------------------------------------


def test_write_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n, D = 12, 16
    write_mrc(tmp_path / "stack.mrcs", rng.standard_normal((n, D, D)), 1.7)
    rots = Rotation.random(n, random_state=2).as_matrix()
    rots[0] = np.eye(3)  # gimbal-lock case (tilt = 0)
    shifts = rng.uniform(-5, 5, (n, 2))
    ctf = {
        "defocus_u": rng.uniform(8000, 20000, n),
        "defocus_v": rng.uniform(8000, 20000, n),
        "defocus_angle": rng.uniform(-180, 180, n),
        "voltage": np.where(np.arange(n) < 5, 300.0, 200.0),
        "cs": np.full(n, 2.7),
        "amplitude_contrast": np.full(n, 0.07),
        "phase_shift": np.zeros(n),
        "bfactor": np.zeros(n),
    }
    subset = (np.arange(n) % 2) + 1
    out = tmp_path / "out.star"
    write_star(out, "stack.mrcs", rots, shifts, 1.7, D, ctf=ctf, random_subset=subset)
    text = out.read_text()
    assert "data_optics" in text and "data_particles" in text and "000001@stack.mrcs" in text
    ps = load_star(out)
    assert len(ps) == n and ps.pixel_size == pytest.approx(1.7) and ps.box_size == D
    np.testing.assert_allclose(ps.rotations, rots, atol=1e-6)
    np.testing.assert_allclose(ps.shifts, shifts, atol=1e-6)
    for k in CTF_KEYS:
        np.testing.assert_allclose(ps.ctf[k], ctf[k], atol=1e-5)
    assert len(set(ps.optics_group.tolist())) == 2  # two voltages -> two optics groups
    np.testing.assert_array_equal(ps.random_subset, subset)
    np.testing.assert_array_equal(ps.images([11])[0], open_stack(tmp_path / "stack.mrcs")[11])
    raw = starfile.read(out)
    assert {"rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnVoltage",
            "rlnSphericalAberration", "rlnAmplitudeContrast"} <= set(raw["optics"].columns)


def test_subset_and_pickle(tmp_path):
    ps = load_star(_copy_relion31(tmp_path))
    sub = ps.subset([3, 1])
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.rotations, ps.rotations[[3, 1]])
    np.testing.assert_array_equal(sub.images([0]), ps.images([3]))
    assert "particle 4 of" in sub.describe(0)  # keeps the source row
    ps.images([0])  # populate the mmap cache
    again = pickle.loads(pickle.dumps(ps))
    assert len(pickle.dumps(ps)) < 100_000  # memory maps are not pickled
    np.testing.assert_array_equal(again.images([2]), ps.images([2]))
    mask = np.array([True, False, True, False, False])
    assert len(ps.subset(mask)) == 2


def test_datadir_and_basename_fallback(tmp_path):
    (tmp_path / "stacks").mkdir()
    (tmp_path / "meta").mkdir()
    shutil.copy(DATA / "relion31.mrcs", tmp_path / "stacks" / "relion31.mrcs")
    text = (DATA / "relion31.star").read_text().replace("@relion31.mrcs", "@Extract/job1/relion31.mrcs")
    (tmp_path / "meta" / "p.star").write_text(text)
    ps = load_star(tmp_path / "meta" / "p.star", datadir=tmp_path / "stacks")  # datadir/basename
    assert ps.stacks == [str(tmp_path / "stacks" / "relion31.mrcs")]
    assert ps.images([0]).shape == (1, 256, 256)
    # RELION project layout: STAR in Refine3D/job9/, stack path relative to the project folder.
    proj = tmp_path / "proj"
    (proj / "Refine3D" / "job9").mkdir(parents=True)
    (proj / "Extract" / "job1").mkdir(parents=True)
    shutil.copy(DATA / "relion31.mrcs", proj / "Extract" / "job1" / "relion31.mrcs")
    (proj / "Refine3D" / "job9" / "run_data.star").write_text(text)
    ps = load_star(proj / "Refine3D" / "job9" / "run_data.star")
    assert ps.images([4]).shape == (1, 256, 256)


def test_load_particles_dispatch(tmp_path):
    assert len(load_particles(DATA / "relion31.star")) == 5
    assert len(load_particles(DATA / "cryosparc_P12_J24_001_particles.cs")) == 2019
    with pytest.raises(CryogsError, match=r"particles\.txt: an image stack needs poses"):
        load_particles(tmp_path / "particles.txt")
    with pytest.raises(CryogsError, match=r"empiar_10076_7\.cs: has no 3D poses"):
        load_particles(DATA / "empiar_10076_7.cs")
    ps = load_particles(DATA / "relion31.star", invert=True, downsample=64)
    assert ps.box_size == 64 and ps.pixel_size == pytest.approx(2.806 * 4)
    np.testing.assert_allclose(ps.images([1]), -fourier_crop(open_stack(DATA / "relion31.mrcs")[[1]], 64), atol=1e-5)


# --- transforms: invert and Fourier-crop downsampling ----------------------------------------


def _fresh_rng() -> np.random.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def _gaussian(D: int, sigma: float, centre=(0.0, 0.0), mass: float = 1.0) -> np.ndarray:
    """Mass-per-pixel samples of a 2D Gaussian centred ``centre`` (x, y) px from index D//2."""
    y, x = np.mgrid[:D, :D] - D // 2
    r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2
    return mass / (2 * np.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))


@pytest.mark.parametrize("D, d", [(96, 48), (96, 45), (97, 50), (97, 41), (80, 79)])
def test_fourier_crop_gaussian_closed_form(D, d):
    """A band-limited image Fourier-cropped equals the image resampled: a Gaussian of σ px at u px from
    the centre becomes a Gaussian of σ·d/D px at u·d/D px, with the same mass. (σ is wide enough to be
    band-limited at the new size and narrow enough to vanish at the box edges.)"""
    r = _fresh_rng()
    sigma = r.uniform(0.055, 0.07) * D
    u = r.uniform(-0.06, 0.06, 2) * D
    mass = r.uniform(0.5, 3.0)
    img = _gaussian(D, sigma, u, mass)
    out = fourier_crop(img, d)
    assert out.shape == (d, d) and out.dtype == np.float32
    want = _gaussian(d, sigma * d / D, u * d / D, mass)
    np.testing.assert_allclose(out, want, atol=2e-6 * want.max())
    assert out.sum() == pytest.approx(mass, rel=1e-5)


@pytest.mark.parametrize("D, d", [(40, 20), (40, 17), (41, 24), (41, 41), (33, 2)])
def test_fourier_crop_keeps_sum_and_centre(D, d):
    r = _fresh_rng()
    imgs = r.standard_normal((5, D, D))
    out = fourier_crop(imgs, d)
    np.testing.assert_allclose(out.sum(axis=(1, 2)), imgs.sum(axis=(1, 2)), rtol=1e-5, atol=1e-4)
    # A centred blob stays centred (its centroid is at index d//2), even or odd sizes.
    blob = fourier_crop(_gaussian(D, 3.0 * D / 40), d).astype(np.float64)
    yy, xx = np.mgrid[:d, :d] - d // 2
    if d > 8:
        assert abs((blob * xx).sum() / blob.sum()) < 1e-4 and abs((blob * yy).sum() / blob.sum()) < 1e-4
    # Same as scipy's Fourier resampling along each axis about the centre, times the pixel-area ratio.
    from scipy.signal import resample

    ref = np.fft.ifftshift(imgs, axes=(1, 2))
    ref = np.fft.fftshift(resample(resample(ref, d, axis=1), d, axis=2), axes=(1, 2)) * (D / d) ** 2
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_transformed_particle_set(tmp_path):
    r = _fresh_rng()
    n, D, apix = 6, 36, 1.3
    raw = r.standard_normal((n, D, D)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", raw, apix)
    shifts = r.uniform(-4, 4, (n, 2))
    write_star(tmp_path / "p.star", "s.mrcs", Rotation.random(n, random_state=r).as_matrix(), shifts, apix, D)
    ps = load_star(tmp_path / "p.star")

    inv = ps.transformed(invert=True)
    np.testing.assert_array_equal(inv.images([2, 0]), -raw[[2, 0]])
    np.testing.assert_array_equal(inv.transformed(invert=True).images([3]), raw[[3]])  # relative: twice restores
    np.testing.assert_array_equal(ps.images([2]), raw[[2]])  # the original set is unchanged

    for d in (24, 25):
        small = ps.transformed(downsample=d)
        assert small.box_size == d and small.pixel_size == pytest.approx(apix * D / d)
        np.testing.assert_allclose(small.shifts, ps.shifts)  # Å, unchanged
        np.testing.assert_array_equal(small.rotations, ps.rotations)
        got = small.images([4, 1])
        assert got.shape == (2, d, d) and got.dtype == np.float32
        np.testing.assert_allclose(got, fourier_crop(raw[[4, 1]], d), atol=1e-6)
        np.testing.assert_allclose(got.sum(axis=(1, 2)), raw[[4, 1]].sum(axis=(1, 2)), rtol=1e-4, atol=1e-3)

    both = ps.transformed(invert=True, downsample=30).transformed(downsample=20)
    assert both.box_size == 20 and both.pixel_size == pytest.approx(apix * D / 20)
    np.testing.assert_allclose(both.images([5]), -fourier_crop(raw[[5]], 20), atol=1e-6)
    sub = both.subset([5, 0])  # subsets and pickles keep the transforms
    np.testing.assert_allclose(sub.images([0]), both.images([5]), atol=0)
    again = pickle.loads(pickle.dumps(sub))
    np.testing.assert_allclose(again.images([1]), both.images([0]), atol=0)
    assert ps.transformed(downsample=D).box_size == D

    for bad in (D + 1, 1, 0):
        with pytest.raises(CryogsError, match=rf"p\.star: cannot downsample {D}px images to {bad}px") as err:
            ps.transformed(downsample=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(CryogsError, match=r"whole number"):
        ps.transformed(downsample=12.5)
    with pytest.raises(CryogsError, match=r"cannot downsample 30px images to 31px"):
        ps.transformed(downsample=30).transformed(downsample=31)


# --- bad input -------------------------------------------------------------------------------


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_image_name_column(tmp_path):
    src = _copy_relion31(tmp_path)
    text = src.read_text().replace("_rlnImageName", "_rlnSomethingElse")
    bad = tmp_path / "noname.star"
    bad.write_text(text)
    with pytest.raises(CryogsError, match="rlnImageName") as err:
        load_star(bad)
    assert "noname.star" in _one_line(err)


def test_missing_angles_column(tmp_path):
    src = _copy_relion31(tmp_path)
    bad = tmp_path / "notilt.star"
    bad.write_text(src.read_text().replace("_rlnAngleTilt", "_rlnAngleTiltPrior"))
    with pytest.raises(CryogsError, match=r"notilt\.star.*poses.*rlnAngleTilt"):
        load_star(bad)


def test_text_in_numeric_column(tmp_path):
    src = _copy_relion31(tmp_path)
    bad = tmp_path / "text.star"
    line = _edit_particle_line(src, bad, 2, "-99.55600", "oops")
    with pytest.raises(CryogsError) as err:
        load_star(bad)
    msg = _one_line(err)
    assert "text.star" in msg and "rlnAngleRot" in msg and f"line {line}" in msg and "'oops'" in msg
    assert "particle 3" in msg


def test_short_row(tmp_path):
    src = _copy_relion31(tmp_path)
    lines = src.read_text().splitlines(keepends=True)
    i = [k for k, l in enumerate(lines) if "000004@relion31.mrcs" in l][0]
    lines[i] = " ".join(lines[i].split()[:12]) + "\n"
    bad = tmp_path / "short.star"
    bad.write_text("".join(lines))
    with pytest.raises(CryogsError, match=rf"short\.star: line {i + 1} \(particle 4\)"):
        load_star(bad)


def test_bad_image_name(tmp_path):
    src = _copy_relion31(tmp_path)
    bad = tmp_path / "name.star"
    _edit_particle_line(src, bad, 1, "000002@relion31.mrcs", "x@relion31.mrcs")
    with pytest.raises(CryogsError, match=r"name\.star.*particle 2.*x@relion31\.mrcs"):
        load_star(bad)


def test_not_a_star_file(tmp_path):
    bad = tmp_path / "garbage.star"
    bad.write_bytes(b"\x00\x01 not a star file \xff\n")
    with pytest.raises(CryogsError, match="garbage.star"):
        load_star(bad)
    with pytest.raises(CryogsError, match="absent.star"):
        load_star(tmp_path / "absent.star")


def test_missing_stack(tmp_path):
    shutil.copy(DATA / "relion31.star", tmp_path / "lonely.star")
    ps = load_star(tmp_path / "lonely.star")  # loading is lazy
    with pytest.raises(CryogsError, match=r"relion31\.mrcs.*particle 1 of .*lonely\.star.*--datadir") as err:
        ps.images([0])
    _one_line(err)
    with pytest.raises(CryogsError, match="relion31.mrcs"):
        ps.check_stacks()


def test_index_beyond_stack(tmp_path):
    src = _copy_relion31(tmp_path)
    bad = tmp_path / "beyond.star"
    _edit_particle_line(src, bad, 4, "000005@relion31.mrcs", "000009@relion31.mrcs")
    ps = load_star(bad)
    ps.images([0, 1])  # the other particles are fine
    with pytest.raises(CryogsError, match=r"particle 5 of .*beyond\.star.*image 9 of stack .*relion31\.mrcs.*only 5"):
        ps.images([0, 4])
    with pytest.raises(CryogsError, match="only 5 images"):
        ps.check_stacks()


def test_box_mismatch(tmp_path):
    src = _copy_relion31(tmp_path)
    write_mrc(tmp_path / "relion31.mrcs", np.zeros((5, 128, 128)), 2.806)
    ps = load_star(src)
    with pytest.raises(CryogsError, match=r"relion31\.mrcs.*128x128.*box 256"):
        ps.images([0])


def test_mixed_box_sizes(tmp_path):
    text = (DATA / "relion31.6opticsgroups.star").read_text()
    lines = text.splitlines(keepends=True)
    i = [k for k, l in enumerate(lines) if l.startswith("3 opticsGroup2")][0]
    lines[i] = lines[i].replace(" 196 ", " 200 ", 1)
    bad = tmp_path / "boxes.star"
    bad.write_text("".join(lines))
    with pytest.raises(CryogsError, match=r"boxes\.star.*box size.*196 px.*200 px"):
        load_star(bad, optics_groups=[1, 3])  # same pixel size, different boxes


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_image(tmp_path):
    src = _copy_relion31(tmp_path)
    stack = np.array(open_stack(tmp_path / "relion31.mrcs"))
    stack[2, 10, 20] = np.nan
    write_mrc(tmp_path / "relion31.mrcs", stack, 1.0)
    ps = load_star(src)
    ps.images([0, 1])
    with pytest.raises(CryogsError, match=r"NaN or Inf in particle 3 of .*relion31\.star.*relion31\.mrcs"):
        ps.images([1, 2])
