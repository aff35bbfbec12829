"""MRC maps and image stacks, in cryogs's ``[z, y, x]`` / ``[n, y, x]`` layout with Å units.

* :func:`write_mrc` writes float32 maps (``.mrc``/``.map``, space group 1) and image stacks
  (``.mrcs``, space group 0) atomically, with the voxel size and origin set and axis order
  (mapc, mapr, maps) = (1, 2, 3).
* :func:`read_mrc` reads a whole map and honours the file's mapc/mapr/maps, which mrcfile itself
  does not: the result is always ``V[z, y, x]``.
* :func:`open_stack` memory-maps an image stack read-only, so images are read from disk only when
  indexed.

The voxel size stored in a particle stack's header is often wrong (1 Å or 0); cryogs takes the
particle pixel size from the STAR file, never from the stack.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import mrcfile
import numpy as np

from cryogs.errors import CryogsError

from .atomic import atomic_path

__all__ = ["write_mrc", "read_mrc", "read_map_geometry", "open_stack", "mrc_axis_permutation"]

_STACK_SUFFIXES = (".mrcs",)


def _as_xyz(value, what: str, path) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)):
        raise CryogsError(f"{path}: {what} must be one number or three (x, y, z), got {value!r}")
    return float(arr[0]), float(arr[1]), float(arr[2])


def write_mrc(
    path: str | os.PathLike,
    data,
    pixel_size: float | Sequence[float],
    *,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    stack: bool | None = None,
) -> None:
    """Write a map ``[z, y, x]`` or an image stack ``[n, y, x]`` (or one image ``[y, x]``) as float32.

    ``pixel_size`` is the voxel size in Å, one number or (x, y, z). ``origin`` is the header
    origin in Å, (x, y, z). ``stack`` defaults to ``True`` for a ``.mrcs`` suffix or 2D data and
    ``False`` otherwise; a stack gets space group 0 and a map space group 1. The file appears
    atomically: a crash never leaves a half-written file at ``path``.
    """
    path = Path(path)
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    if arr.ndim not in (2, 3):
        raise CryogsError(f"{path}: can only write 2D images or 3D maps/stacks, got shape {arr.shape}")
    if np.iscomplexobj(arr):
        raise CryogsError(f"{path}: refusing to write complex data")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    voxel = _as_xyz(pixel_size, "pixel size", path)
    if min(voxel) <= 0:
        raise CryogsError(f"{path}: pixel size must be positive, got {pixel_size!r}")
    org = _as_xyz(origin, "origin", path)
    if stack is None:
        stack = path.suffix.lower() in _STACK_SUFFIXES or arr.ndim == 2

    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            if arr.ndim == 3:
                if stack:
                    mrc.set_image_stack()
                else:
                    mrc.set_volume()
            mrc.voxel_size = voxel
            mrc.header.origin = org
            mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 1, 2, 3
            mrc.update_header_stats()


def mrc_axis_permutation(mapc: int, mapr: int, maps: int) -> tuple[int, int, int]:
    """Transpose that turns mrcfile's ``data[section, row, column]`` into ``V[z, y, x]``.

    ``mapc``/``mapr``/``maps`` say which spatial axis (1 = x, 2 = y, 3 = z) runs along the
    file's columns, rows and sections. Raises ``ValueError`` unless they are a permutation of 1, 2, 3.
    """
    order = (int(maps), int(mapr), int(mapc))  # spatial axis of data axes 0, 1, 2
    if sorted(order) != [1, 2, 3]:
        raise ValueError(f"mapc/mapr/maps = ({mapc}, {mapr}, {maps}) is not a permutation of 1, 2, 3")
    return tuple(order.index(s) for s in (3, 2, 1))  # type: ignore[return-value]


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CryogsError(f"{path}: file not found")
    if path.is_dir():
        raise CryogsError(f"{path}: is a folder, expected an MRC file")


def _open(path: Path, opener):
    """Open with mrcfile permissively; turn mrcfile's failures into one-line CryogsErrors."""
    _check_exists(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = opener(str(path), mode="r", permissive=True)
        except Exception as err:  # mrcfile raises ValueError, OSError, ... for damaged files
            raise CryogsError(f"{path}: not a readable MRC file ({err})") from None
    if mrc.data is None:
        why = "; ".join(str(w.message) for w in caught) or "no data block"
        mrc.close()
        raise CryogsError(f"{path}: not a readable MRC file or truncated ({why})")
    if np.iscomplexobj(mrc.data):
        mrc.close()
        raise CryogsError(f"{path}: complex-valued MRC (mode 4) is not supported")
    return mrc


def _axes(path: Path, header) -> tuple[int, int, int]:
    try:
        return mrc_axis_permutation(header.mapc, header.mapr, header.maps)
    except ValueError:
        # Some old writers leave these fields zero; the MRC default order is the only reading.
        warnings.warn(
            f"{path}: invalid mapc/mapr/maps ({int(header.mapc)}, {int(header.mapr)}, {int(header.maps)}); "
            "assuming the standard order (1, 2, 3)",
            RuntimeWarning,
            stacklevel=3,
        )
        return (0, 1, 2)


def read_mrc(path: str | os.PathLike, *, return_origin: bool = False):
    """Read a map as ``(V[z, y, x] float32, voxel_size (x, y, z) in Å)``.

    The file's axis order (mapc, mapr, maps) is honoured, so the result is ``[z, y, x]`` whatever
    the file layout; the voxel size is the header's cell size over its sampling, per spatial axis
    (it is 0 where the header leaves the cell empty). A 2D file gives shape ``[1, y, x]``.

    With ``return_origin=True`` a third item is returned: the origin (x, y, z) in Å, taken from the
    header's ``origin`` field, or from ``nxstart/nystart/nzstart`` × voxel size when that is zero.
    """
    path = Path(path)
    mrc = _open(path, mrcfile.open)
    try:
        header = mrc.header
        data = np.asarray(mrc.data)
        if data.ndim == 4:
            raise CryogsError(f"{path}: is a stack of volumes (4D); cryogs reads single maps only")
        if data.ndim == 2:
            data = data[None]
        perm = _axes(path, header)
        vol = np.ascontiguousarray(data.transpose(perm), dtype=np.float32)
        vs = mrc.voxel_size
        voxel = (float(vs.x), float(vs.y), float(vs.z))
        origin = (float(header.origin.x), float(header.origin.y), float(header.origin.z))
        if origin == (0.0, 0.0, 0.0):
            # nxstart/nystart/nzstart count along columns/rows/sections: map them to x, y, z.
            starts_crs = (int(header.nxstart), int(header.nystart), int(header.nzstart))
            axis_crs = (int(header.mapc), int(header.mapr), int(header.maps))
            if sorted(axis_crs) != [1, 2, 3]:
                axis_crs = (1, 2, 3)
            start_xyz = [0, 0, 0]
            for start, axis in zip(starts_crs, axis_crs):
                start_xyz[axis - 1] = start
            origin = tuple(float(s * v) for s, v in zip(start_xyz, voxel))
    finally:
        mrc.close()
    if return_origin:
        return vol, voxel, origin
    return vol, voxel


def read_map_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``(shape (z, y, x), voxel size (x, y, z) in Å)`` of a map, from its header alone (to check a map
    before a long run)."""
    path = Path(path)
    _check_exists(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(str(path), mode="r", permissive=True, header_only=True) as mrc:
                header, vs = mrc.header, mrc.voxel_size
                crs = (int(header.nx), int(header.ny), int(header.nz))
                voxel = (float(vs.x), float(vs.y), float(vs.z))
                axes = (int(header.mapc), int(header.mapr), int(header.maps))
    except Exception as err:  # mrcfile raises ValueError, OSError, ... for damaged files
        raise CryogsError(f"{path}: not a readable MRC file ({err})") from None
    if sorted(axes) != [1, 2, 3]:
        axes = (1, 2, 3)
    xyz = [0, 0, 0]
    for n, axis in zip(crs, axes):
        xyz[axis - 1] = n
    return (xyz[2], xyz[1], xyz[0]), voxel


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an image stack read-only as ``[n, y, x]`` (raw file dtype; cast when reading).

    Nothing but the header is read until the returned array is indexed. A single-image file gives
    ``n = 1``. The array keeps the mapping alive on its own (the file handle used to read the header
    is closed). Raises :class:`CryogsError` for a missing, corrupt or truncated file.
    """
    path = Path(path)
    mrc = _open(path, mrcfile.mmap)
    try:
        data = mrc.data
        header = mrc.header
        if data.ndim == 4:
            raise CryogsError(f"{path}: is a stack of volumes (4D), expected a stack of 2D images")
        if data.ndim == 2:
            data = data[None]
        axes = (int(header.mapc), int(header.mapr), int(header.maps))
        if axes == (2, 1, 3):
            data = data.transpose(0, 2, 1)
        elif axes != (1, 2, 3) and sorted(axes) == [1, 2, 3]:
            raise CryogsError(
                f"{path}: image stacks must have sections along z (maps = 3), got mapc/mapr/maps = {axes}"
            )
        # The memmap holds its own mapping; closing the MrcMemmap only marks it read-only.
        view = data
    finally:
        mrc.close()
    return view
