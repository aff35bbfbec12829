"""cryoSPARC particle files (``.cs``): a numpy structured array, one row per particle.

Fields read (all others are ignored):

* images: ``blob/path`` (bytes, relative to the cryoSPARC project folder; a leading ``>`` is
  stripped), ``blob/idx`` (0-based index into that stack), ``blob/shape`` (box), ``blob/psize_A``
  (pixel size, Å);
* pose: ``alignments3D/pose``, an axis-angle (Rodrigues) vector in radians with
  ``Rotation.from_rotvec(pose).as_matrix() == Aᵀ``, so RELION's ``A`` is its transpose;
  ``alignments3D/shift``, in pixels;
* CTF: ``ctf/df1_A``, ``ctf/df2_A`` (Å), ``ctf/df_angle_rad`` and ``ctf/phase_shift_rad`` (radians,
  converted to degrees), ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/bfactor``
  (0 when absent);
* ``alignments3D/split`` (0/1), when present, becomes ``random_subset`` (1/2).

Shift convention
    cryoSPARC's ``alignments3D/shift`` is the RELION origin in pixels of the particle images, with
    the same sign: ``origin_Å = shift_px · blob/psize_A``. So the observed image is the centred
    projection translated by ``-shift`` pixels, and translating the image by ``+shift`` centres it.
    This is the relation used by cryoDRGN (``parse_pose_csparc``: ``trans = shift / D``, and
    ``parse_pose_star``: ``trans = rlnOrigin_px / D``, with no sign change between them; cryoDRGN
    centres an image by translating it by ``+trans·D`` pixels) and by pyem's ``csparc2star``
    (``alignments3D/shift`` → ``rlnOriginX/Y``). ``tests/test_formats.py`` checks it against
    cryoDRGN's own ``pose.cs.pkl`` for ``cryosparc_P12_J24_001_particles.cs`` and, through cryoDRGN's
    Hartley-space translation formula, against cryogs's projector.

Loading never opens an image stack: the returned :class:`~cryogs.io.particles.ParticleSet` reads
images lazily, and a missing stack or an index beyond a stack's end is reported, naming the
``.cs`` file and the particle, when the images are read (or by ``check_stacks``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cryogs.errors import CryogsError
from cryogs.physics.conventions import axis_angle_to_matrix

from .particles import CTF_KEYS, ParticleSet, resolve_stack

__all__ = ["load_cs"]

POSE_FIELD = "alignments3D/pose"
SHIFT_FIELD = "alignments3D/shift"


def _read_cs(path: Path) -> np.ndarray:
    if not path.exists():
        raise CryogsError(f"{path}: file not found")
    if path.is_dir():
        raise CryogsError(f"{path}: is a folder, expected a cryoSPARC .cs file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # ValueError, OSError, EOFError, ... for damaged or foreign files
        why = " ".join(str(err).split())
        raise CryogsError(f"{path}: not a readable cryoSPARC .cs file (numpy array): {why}") from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None:
        raise CryogsError(f"{path}: not a cryoSPARC .cs file (expected a numpy structured array with named fields)")
    data = data.reshape(-1)
    if len(data) == 0:
        raise CryogsError(f"{path}: holds no particles")
    return data


def _field(path: Path, data: np.ndarray, name: str, shape: tuple = ()) -> np.ndarray:
    """Field ``name`` as float64 ``[n, *shape]``, with a one-line error for a missing or bad one."""
    if name not in data.dtype.names:
        raise CryogsError(f"{path}: has no {name} field")
    arr = np.asarray(data[name])
    if arr.shape[1:] != shape:
        raise CryogsError(f"{path}: field {name} has shape {arr.shape[1:]} per particle, expected {shape}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise CryogsError(f"{path}: particle {k + 1} (row {k}): {name} is not finite ({arr[k]})")
    return arr


def _single(path: Path, what: str, values: np.ndarray, fmt, rtol: float = 1e-4) -> float:
    ref = values[0]
    off = np.abs(values - ref) > rtol * abs(ref)
    if off.any():
        k = int(np.flatnonzero(off)[0])
        raise CryogsError(
            f"{path}: particles have different {what}s (particle 1: {fmt(ref)}, particle {k + 1}: {fmt(values[k])}); "
            f"cryogs reconstructs from one {what}"
        )
    return float(ref)


def load_cs(
    path: str | os.PathLike,
    *,
    datadir: str | os.PathLike | None = None,
    box_size: int | None = None,
    require_poses: bool = True,
) -> ParticleSet:
    """Load a cryoSPARC particle ``.cs`` file (a refinement's output, with 3D poses).

    ``datadir`` is where to look for the stacks named in ``blob/path`` (usually the cryoSPARC
    project folder): each is looked for at ``datadir/path``, ``datadir/basename``, then next to the
    ``.cs`` file, its three nearest ancestors and the current folder (as for STAR files).
    ``box_size`` is needed only for files without ``blob/shape``; when both are given they must agree.

    Rotations are RELION ``A`` matrices (``axis_angle_to_matrix(pose)ᵀ``); shifts are RELION origins
    in Å, ``alignments3D/shift · blob/psize_A`` (see the module docstring for the sign). The pixel size
    is ``blob/psize_A`` (a float32 in the file, rounded to its shortest decimal form, e.g. 2.95) and
    must be the same for every particle. Raises :class:`CryogsError` for a file without
    ``alignments3D/pose``, unless ``require_poses=False`` (then ``rotations`` is ``None`` and the
    shifts are zero).
    """
    path = Path(path)
    data = _read_cs(path)
    names = set(data.dtype.names)
    n = len(data)

    has_poses = POSE_FIELD in names
    if not has_poses and require_poses:
        other = sorted({f.split("/")[0] for f in names if f.endswith("/pose")})
        hint = f" (it has {', '.join(o + '/pose' for o in other)}, which cryogs does not use)" if other else ""
        raise CryogsError(
            f"{path}: has no 3D poses ({POSE_FIELD}){hint}; run a refinement first or use the particles "
            "exported from a 3D refinement job (homogeneous / non-uniform / local refinement)"
        )
    for need in ("blob/path", "blob/idx", "blob/psize_A"):
        if need not in names:
            raise CryogsError(f"{path}: has no {need} field; cryogs needs the particle images (blob/*)")

    # Pixel size and box.
    pixel_size = _single(path, "pixel size", _field(path, data, "blob/psize_A"), lambda v: f"{v:g} Å")
    pixel_size = float(np.format_float_positional(np.float32(pixel_size), unique=True))
    if pixel_size <= 0:
        raise CryogsError(f"{path}: blob/psize_A must be positive, got {pixel_size:g}")
    if "blob/shape" in names:
        shape = np.asarray(data["blob/shape"]).reshape(n, -1).astype(np.int64)
        if shape.shape[1] != 2:
            raise CryogsError(f"{path}: blob/shape has {shape.shape[1]} values per particle, expected 2")
        off = (shape != shape[0]).any(axis=1)
        if off.any():
            k = int(np.flatnonzero(off)[0])
            raise CryogsError(
                f"{path}: particles have different box sizes (particle 1: {tuple(shape[0])}, "
                f"particle {k + 1}: {tuple(shape[k])}); cryogs needs one box size"
            )
        if shape[0, 0] != shape[0, 1]:
            raise CryogsError(f"{path}: images are {shape[0, 1]}x{shape[0, 0]} (blob/shape); cryogs needs square images")
        box = int(shape[0, 0])
        if box_size is not None and int(box_size) != box:
            raise CryogsError(f"{path}: box size {box_size} was given but blob/shape says {box}")
    elif box_size is not None:
        box = int(box_size)
    else:
        raise CryogsError(f"{path}: has no blob/shape field; give the box size (box_size=D)")

    # Images.
    raw_paths = np.asarray(data["blob/path"])
    codes, uniques = pd.factorize(pd.Series(raw_paths, dtype=object), sort=False)
    stack_names = []
    for u in uniques:
        name = u.decode("utf-8", errors="replace") if isinstance(u, bytes) else str(u)
        stack_names.append(name.strip().lstrip(">"))
    empty = [i for i, s in enumerate(stack_names) if not s]
    if empty:
        k = int(np.flatnonzero(codes == empty[0])[0])
        raise CryogsError(f"{path}: particle {k + 1} (row {k}) has an empty blob/path")
    ddir = Path(datadir) if datadir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise CryogsError(f"{ddir}: --datadir folder not found")
    cs_dir = path.resolve().parent
    stacks = [resolve_stack(s, cs_dir, ddir) for s in stack_names]
    stack_index = np.asarray(data["blob/idx"]).astype(np.int64).reshape(n)
    if (stack_index < 0).any():
        k = int(np.flatnonzero(stack_index < 0)[0])
        raise CryogsError(f"{path}: particle {k + 1} (row {k}) has a negative blob/idx {stack_index[k]}")

    # Pose: A = (from_rotvec(pose))ᵀ; origin (Å) = shift (px) · pixel size, same sign.
    if has_poses:
        pose = _field(path, data, POSE_FIELD, (3,))
        rotations = axis_angle_to_matrix(pose).numpy().transpose(0, 2, 1)
    else:
        rotations = None
    if has_poses and SHIFT_FIELD in names:
        shift_px = _field(path, data, SHIFT_FIELD, (2,))
        if "alignments3D/psize_A" in names:
            apsize = np.asarray(data["alignments3D/psize_A"], dtype=np.float64)
            if np.any(np.abs(apsize - pixel_size) > 1e-3 * pixel_size):
                warnings.warn(
                    f"{path}: alignments3D/psize_A ({apsize[0]:g} Å) differs from blob/psize_A ({pixel_size:g} Å); "
                    "taking alignments3D/shift in pixels of the particle images, as cryoDRGN and pyem do",
                    RuntimeWarning,
                    stacklevel=2,
                )
        shifts = shift_px * pixel_size
    else:
        if has_poses:
            warnings.warn(f"{path}: has poses but no {SHIFT_FIELD}; assuming centred particles", RuntimeWarning, stacklevel=2)
        shifts = np.zeros((n, 2))

    # CTF (RELION units).
    ctf = None
    if "ctf/df1_A" in names:
        for need in ("ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"):
            if need not in names:
                raise CryogsError(f"{path}: has ctf/df1_A but no {need} field")
        dfu = _field(path, data, "ctf/df1_A")
        ctf = {
            "defocus_u": dfu,
            "defocus_v": _field(path, data, "ctf/df2_A") if "ctf/df2_A" in names else dfu.copy(),
            "defocus_angle": np.rad2deg(_field(path, data, "ctf/df_angle_rad")) if "ctf/df_angle_rad" in names else np.zeros(n),
            "voltage": _field(path, data, "ctf/accel_kv"),
            "cs": _field(path, data, "ctf/cs_mm"),
            "amplitude_contrast": _field(path, data, "ctf/amp_contrast"),
            "phase_shift": np.rad2deg(_field(path, data, "ctf/phase_shift_rad")) if "ctf/phase_shift_rad" in names else np.zeros(n),
            "bfactor": _field(path, data, "ctf/bfactor") if "ctf/bfactor" in names else np.zeros(n),
        }
        assert set(ctf) == set(CTF_KEYS)

    random_subset = None
    if "alignments3D/split" in names:
        split = np.asarray(data["alignments3D/split"]).astype(np.int64).reshape(n)
        if np.isin(split, (0, 1)).all():
            random_subset = split + 1

    return ParticleSet(
        stacks=stacks,
        stack_id=codes.astype(np.int64),
        stack_index=stack_index,
        rotations=rotations,
        shifts=shifts,
        pixel_size=pixel_size,
        box_size=box,
        ctf=ctf,
        random_subset=random_subset,
        source=str(path),
        stack_names=stack_names,
    )
