"""MRC read/write: round trips, axis order (EMD-3001), stacks, atomic writes, bad files."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryogs.errors import CryogsError
from cryogs.io.mrc import mrc_axis_permutation, open_stack, read_mrc, write_mrc

DATA = Path(__file__).parent / "data"


def _coord_volume(nz, ny, nx):
    """V[z, y, x] = 10000 z + 100 y + x: every voxel knows where it is."""
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return (10000 * z + 100 * y + x).astype(np.float32)


def test_map_round_trip(tmp_path):
    vol = _coord_volume(6, 5, 4)
    p = tmp_path / "map.mrc"
    write_mrc(p, vol, (1.1, 1.2, 1.3), origin=(-5.0, 2.5, 7.0))
    out, voxel, origin = read_mrc(p, return_origin=True)
    np.testing.assert_array_equal(out, vol)
    assert out.dtype == np.float32
    np.testing.assert_allclose(voxel, (1.1, 1.2, 1.3), rtol=1e-6)
    np.testing.assert_allclose(origin, (-5.0, 2.5, 7.0))
    with mrcfile.open(p) as m:
        assert (m.header.mapc, m.header.mapr, m.header.maps) == (1, 2, 3)
        assert int(m.header.ispg) == 1
        assert (m.header.nx, m.header.ny, m.header.nz) == (4, 5, 6)  # nx counts x (columns)
        assert m.data.dtype == np.float32
        assert m.validate(print_file=open(os.devnull, "w"))


def test_stack_round_trip_and_mmap(tmp_path):
    stack = np.random.default_rng(0).standard_normal((7, 16, 16)).astype(np.float64)
    p = tmp_path / "parts.mrcs"
    write_mrc(p, stack, 2.5)
    with mrcfile.open(p) as m:
        assert int(m.header.ispg) == 0
        assert m.is_image_stack()
        np.testing.assert_allclose(m.voxel_size.x, 2.5)
    view = open_stack(p)
    assert isinstance(view, np.memmap)
    assert view.shape == (7, 16, 16)
    assert not view.flags.writeable
    np.testing.assert_allclose(view[3], stack[3].astype(np.float32))
    np.testing.assert_allclose(view[[6, 1]], stack[[6, 1]].astype(np.float32))


def test_single_image_reads_as_stack_of_one(tmp_path):
    p = tmp_path / "one.mrc"
    write_mrc(p, np.ones((8, 8)), 1.0)
    assert open_stack(p).shape == (1, 8, 8)


def test_axis_permutation_closed_form():
    assert mrc_axis_permutation(1, 2, 3) == (0, 1, 2)
    # data[section=y, row=x, column=z] -> [z, y, x]
    assert mrc_axis_permutation(3, 1, 2) == (2, 0, 1)
    with pytest.raises(ValueError):
        mrc_axis_permutation(1, 1, 3)


@pytest.mark.parametrize("order", [(3, 1, 2), (2, 3, 1), (1, 3, 2), (3, 2, 1), (2, 1, 3)])
def test_non_standard_axis_order_is_honoured(tmp_path, order):
    """Write a file whose columns/rows/sections run along other axes; read_mrc must undo it."""
    vol = _coord_volume(5, 4, 3)  # [z, y, x]
    mapc, mapr, maps = order
    # data axes are (section, row, column) = spatial axes (maps, mapr, mapc); vol axes are (z, y, x)
    spatial_to_vol_axis = {3: 0, 2: 1, 1: 2}
    data = np.ascontiguousarray(vol.transpose([spatial_to_vol_axis[s] for s in (maps, mapr, mapc)]))
    p = tmp_path / "perm.mrc"
    with mrcfile.new(p) as m:
        m.set_data(data)
        m.header.mapc, m.header.mapr, m.header.maps = mapc, mapr, maps
        m.header.mx, m.header.my, m.header.mz = 3, 4, 5  # samples along x, y, z
        m.header.cella = (3 * 1.0, 4 * 2.0, 5 * 3.0)
    out, voxel = read_mrc(p)
    np.testing.assert_array_equal(out, vol)
    np.testing.assert_allclose(voxel, (1.0, 2.0, 3.0))


def test_emd3001_axis_order_and_voxels():
    p = DATA / "EMD-3001.map"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(p, permissive=True) as m:
            h = m.header
            raw = np.array(m.data)
            order = (int(h.mapc), int(h.mapr), int(h.maps))
            ncrs = (int(h.nx), int(h.ny), int(h.nz))  # columns, rows, sections
    assert order == (3, 1, 2)
    vol, voxel = read_mrc(p)
    # Length along spatial axis s is the count of whichever of columns/rows/sections maps to s.
    length = {axis: n for axis, n in zip(order, ncrs)}
    assert vol.shape == (length[3], length[2], length[1]) == (73, 25, 43)
    # raw[section=y, row=x, column=z]
    for z, y, x in [(0, 0, 0), (10, 3, 7), (72, 24, 42), (40, 12, 20)]:
        assert vol[z, y, x] == raw[y, x, z]
    np.testing.assert_allclose(voxel, (17.93 / 40, 4.71 / 12, 33.03 / 72), rtol=1e-5)
    assert len(set(np.round(voxel, 4))) == 3  # non-cubic voxels


def test_emd3197_origin_from_nxstart():
    vol, voxel, origin = read_mrc(DATA / "EMD-3197.map", return_origin=True)
    assert vol.shape == (20, 20, 20)
    np.testing.assert_allclose(voxel, 11.4, rtol=1e-6)
    np.testing.assert_allclose(origin, (-2 * 11.4, 0.0, 0.0), rtol=1e-6)


def test_real_stacks_open():
    s = open_stack(DATA / "relion31.mrcs")
    assert s.shape == (5, 256, 256)
    e = open_stack(DATA / "empiar_10076_7.mrc")  # a stack labelled as a volume, no MAP id
    assert e.shape == (7, 320, 320)
    assert np.isfinite(np.asarray(e[6], dtype=np.float32)).all()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CryogsError, match="nothere.mrcs"):
        open_stack(tmp_path / "nothere.mrcs")
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"this is not an mrc file" * 3)
    with pytest.raises(CryogsError, match="junk.mrcs"):
        open_stack(junk)
    # Truncated: a valid header whose data block is cut short.
    good = tmp_path / "good.mrcs"
    write_mrc(good, np.zeros((4, 32, 32)), 1.0)
    cut = tmp_path / "cut.mrcs"
    cut.write_bytes(good.read_bytes()[: 1024 + 32 * 32 * 4 * 2])
    with pytest.raises(CryogsError, match="cut.mrcs"):
        open_stack(cut)
    with pytest.raises(CryogsError, match="cut.mrcs"):
        read_mrc(cut)


def test_write_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "map.mrc"
    write_mrc(p, np.ones((4, 4, 4)), 1.0)
    before = p.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "update_header_stats", boom, raising=False)
    with pytest.raises(RuntimeError):
        write_mrc(p, np.zeros((8, 8, 8)), 2.0)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["map.mrc"]  # no temp file left


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(CryogsError, match="bad.mrc"):
        write_mrc(tmp_path / "bad.mrc", np.zeros((2, 2, 2, 2)), 1.0)
    with pytest.raises(CryogsError, match="bad.mrc"):
        write_mrc(tmp_path / "bad.mrc", np.zeros((2, 2, 2)), 0.0)
    with pytest.raises(CryogsError, match="does not exist"):
        write_mrc(tmp_path / "nofolder" / "x.mrc", np.zeros((2, 2, 2)), 1.0)


def test_torch_input(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "t.mrc"
    write_mrc(p, torch.arange(27.0).reshape(3, 3, 3), 1.0)
    out, _ = read_mrc(p)
    np.testing.assert_array_equal(out.ravel(), np.arange(27.0))


def test_read_copy_of_fixture_still_works(tmp_path):
    # The fixtures are read-only in the shared folder; copies must read the same.
    q = tmp_path / "copy.map"
    shutil.copy(DATA / "EMD-3197.map", q)
    a, _ = read_mrc(q)
    b, _ = read_mrc(DATA / "EMD-3197.map")
    np.testing.assert_array_equal(a, b)
