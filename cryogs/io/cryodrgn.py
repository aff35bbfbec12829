"""cryoDRGN inputs: an image stack (or a ``.txt`` list of stacks) with a ``pose.pkl`` and a ``ctf.pkl``.

``pose.pkl``
    Either a tuple ``(rot [N,3,3], trans [N,2])`` or a bare rotation array ``[N,3,3]`` (then the
    particles are taken as centred). ``rot`` are RELION-convention matrices ``A`` (map → image;
    cryoDRGN's ``parse_pose_star`` builds them from rlnAngleRot/Tilt/Psi exactly as
    :func:`cryogs.physics.conventions.euler_to_matrix` does). ``trans`` are fractions of the box.

Shift convention
    cryoDRGN centres an observed image by translating it by ``+trans·D`` pixels (its training loop
    applies ``Lattice.translate_ht(y, +trans·D)`` to the data before comparing with the centred
    model slice), and builds ``trans`` as ``rlnOrigin_px / D`` from a STAR file and as
    ``alignments3D/shift / D`` from a cryoSPARC file. A RELION origin ``o`` means the observed
    image is the centred projection translated by ``-o``, i.e. translating by ``+o`` centres it.
    Hence ``origin_Å = trans · D · pixel_size`` (same sign), where ``D·pixel_size`` is the box
    width in Å (the same before and after cryoDRGN downsampling, so fractional translations stay valid).

``ctf.pkl``
    An ``[N, 9]`` array ``[D, Apix, dfU (Å), dfV (Å), dfAngle (°), kV, Cs (mm), w, phase (°)]``.
    As in cryoDRGN, its ``D``/``Apix`` may describe the original, larger images: the pixel size of
    the given images (box ``D_img``) is ``D · Apix / D_img``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from cryogs.errors import CryogsError

from .mrc import open_stack
from .particles import ParticleSet, resolve_stack

__all__ = ["load_cryodrgn", "load_pose_pkl", "load_ctf_pkl"]

#: Columns of a cryoDRGN ctf.pkl.
CTF_PKL_COLUMNS = ("D", "Apix", "defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift")


def _load_pickle(path: Path, what: str):
    if not path.exists():
        raise CryogsError(f"{path}: {what} file not found")
    if path.is_dir():
        raise CryogsError(f"{path}: is a folder, expected a {what} .pkl file")
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as err:  # UnpicklingError, EOFError, ModuleNotFoundError, ...
        raise CryogsError(f"{path}: not a readable {what} pickle ({' '.join(str(err).split())})") from None


def _as_float_array(path: Path, obj, what: str) -> np.ndarray:
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError):
        raise CryogsError(f"{path}: {what} is not a numeric array (got {type(obj).__name__})") from None
    return arr


def _first_bad_row(arr: np.ndarray) -> int | None:
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def load_pose_pkl(path: str | os.PathLike, n: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cryoDRGN ``pose.pkl``: ``(rot [N,3,3] RELION A, trans [N,2] fractions of the box or None)``.

    With ``n`` the number of particles must match. Rotations must be proper rotation matrices.
    """
    path = Path(path)
    obj = _load_pickle(path, "pose")
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and np.ndim(obj[0]) == 3:
        rot = _as_float_array(path, obj[0], "the rotation array")
        trans = _as_float_array(path, obj[1], "the translation array") if len(obj) == 2 else None
    else:
        rot, trans = _as_float_array(path, obj, "the pose array"), None
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise CryogsError(
            f"{path}: expected rotations of shape [N, 3, 3] (a tuple (rot, trans) or a rotation array), got {rot.shape}"
        )
    N = rot.shape[0]
    if trans is not None and trans.shape != (N, 2):
        raise CryogsError(f"{path}: translations must have shape [{N}, 2] to match {N} rotations, got {trans.shape}")
    if n is not None and N != n:
        raise CryogsError(f"{path}: has poses for {N} particles but there are {n} particle images")
    k = _first_bad_row(rot)
    if k is None and trans is not None:
        k = _first_bad_row(trans)
    if k is not None:
        raise CryogsError(f"{path}: particle {k + 1} has a NaN or Inf pose")
    # float32 pickles are accurate to ~1e-6; anything far off is not a rotation.
    ortho = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).reshape(N, -1).max(axis=1)
    det = np.linalg.det(rot)
    bad = (ortho > 1e-3) | (np.abs(det - 1) > 1e-3)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise CryogsError(
            f"{path}: pose of particle {k + 1} is not a rotation matrix (|R Rᵀ - I| = {ortho[k]:.2g}, det = {det[k]:.4g})"
        )
    return rot, trans


def load_ctf_pkl(path: str | os.PathLike, n: int | None = None) -> np.ndarray:
    """Read a cryoDRGN ``ctf.pkl``: an ``[N, 9]`` float64 array (columns :data:`CTF_PKL_COLUMNS`)."""
    path = Path(path)
    arr = _as_float_array(path, _load_pickle(path, "CTF"), "the CTF table")
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise CryogsError(
            f"{path}: expected a CTF table of shape [N, 9] (D, Apix, dfU, dfV, dfAngle, kV, Cs, w, phase), got {arr.shape}"
        )
    if n is not None and arr.shape[0] != n:
        raise CryogsError(f"{path}: has CTF parameters for {arr.shape[0]} particles but there are {n} particle images")
    k = _first_bad_row(arr)
    if k is not None:
        raise CryogsError(f"{path}: particle {k + 1} has a NaN or Inf CTF parameter")
    bad = (arr[:, 0] <= 0) | (arr[:, 1] <= 0) | (arr[:, 5] <= 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise CryogsError(f"{path}: particle {k + 1}: D, Apix and kV must be positive, got {arr[k, [0, 1, 5]].tolist()}")
    return arr


def _stack_list(path: Path, datadir: Path | None) -> tuple[list[str], list[str], list[int]]:
    """Stacks named in a ``.txt`` (one per line, relative to the txt): resolved paths, names, lines."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CryogsError(f"{path}: cannot read the list of stacks ({err})") from None
    names, line_nos = [], []
    for no, line in enumerate(lines, 1):
        name = line.strip()
        if name and not name.startswith("#"):
            names.append(name)
            line_nos.append(no)
    if not names:
        raise CryogsError(f"{path}: lists no image stacks (expected one .mrcs path per line)")
    here = path.resolve().parent
    return [resolve_stack(s, here, datadir) for s in names], names, line_nos


def load_cryodrgn(
    particles_path: str | os.PathLike,
    *,
    poses: str | os.PathLike | None,
    ctf: str | os.PathLike | None = None,
    pixel_size: float | None = None,
    datadir: str | os.PathLike | None = None,
) -> ParticleSet:
    """Load cryoDRGN-style inputs: images from a ``.mrcs`` stack or a ``.txt`` list of stacks.

    The particles are the stacks' images in order. ``poses`` is a ``pose.pkl`` (see the module
    docstring; its N must equal the image count), ``ctf`` an optional ``ctf.pkl``. The pixel size
    comes from the ctf.pkl (rescaled to the images' box, as cryoDRGN does), else from
    ``pixel_size``; if both are given they must agree. Stack headers are read here (to count the
    images); the images themselves are read lazily.
    """
    path = Path(particles_path)
    if not path.exists():
        raise CryogsError(f"{path}: file not found")
    if path.is_dir():
        raise CryogsError(f"{path}: is a folder, expected an image stack (.mrcs) or a .txt list of stacks")
    ddir = Path(datadir) if datadir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise CryogsError(f"{ddir}: --datadir folder not found")

    if path.suffix.lower() == ".txt":
        stacks, names, line_nos = _stack_list(path, ddir)
    else:
        stacks, names, line_nos = [str(path)], [str(path)], [None]

    counts, box = [], None
    for stack, name, line in zip(stacks, names, line_nos):
        where = f"{path}: line {line}: " if line is not None else ""
        if not os.path.exists(stack):
            raise CryogsError(f"{where}stack {name} not found (looked for {stack}); give the folder that holds the stacks with --datadir")
        try:
            shape = open_stack(stack).shape
        except CryogsError as err:
            raise CryogsError(f"{where}{err}") from None
        if shape[1] != shape[2]:
            raise CryogsError(f"{where}{stack}: images are {shape[2]}x{shape[1]}, cryogs needs square images")
        if box is None:
            box = int(shape[1])
        elif shape[1] != box:
            raise CryogsError(f"{where}{stack}: images are {shape[1]}px but {stacks[0]} has {box}px; all stacks need one box size")
        counts.append(int(shape[0]))
    n = int(sum(counts))
    if n == 0:
        raise CryogsError(f"{path}: holds no images")
    stack_id = np.repeat(np.arange(len(stacks), dtype=np.int64), counts)
    stack_index = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])

    # no poses (ab initio): rotations None and zero shifts
    rot, trans = load_pose_pkl(poses, n) if poses is not None else (None, None)

    ctf_dict = None
    apix = None
    if ctf is not None:
        table = load_ctf_pkl(ctf, n)
        width = table[:, 0] * table[:, 1]  # box width in Å, which downsampling keeps
        if np.any(np.abs(width - width[0]) > 1e-4 * width[0]):
            k = int(np.flatnonzero(np.abs(width - width[0]) > 1e-4 * width[0])[0])
            raise CryogsError(
                f"{ctf}: particles have different pixel sizes (particle 1: D={table[0, 0]:g}, Apix={table[0, 1]:g}; "
                f"particle {k + 1}: D={table[k, 0]:g}, Apix={table[k, 1]:g}); cryogs needs one"
            )
        apix = float(width[0] / box)
        if pixel_size is not None and abs(float(pixel_size) - apix) > 1e-3 * apix:
            raise CryogsError(
                f"{ctf}: gives a pixel size of {apix:g} Å for the {box}px images (D={table[0, 0]:g}, Apix={table[0, 1]:g}) "
                f"but --pixel-size is {float(pixel_size):g} Å"
            )
        ctf_dict = {
            "defocus_u": table[:, 2].copy(),
            "defocus_v": table[:, 3].copy(),
            "defocus_angle": table[:, 4].copy(),
            "voltage": table[:, 5].copy(),
            "cs": table[:, 6].copy(),
            "amplitude_contrast": table[:, 7].copy(),
            "phase_shift": table[:, 8].copy(),
            "bfactor": np.zeros(n),
        }
    elif pixel_size is not None:
        apix = float(pixel_size)
        if not apix > 0:
            raise CryogsError(f"--pixel-size must be positive, got {pixel_size!r}")
    else:
        raise CryogsError(
            f"{path}: --pixel-size is required for an image stack without a ctf.pkl (--ctf), which would give it"
        )

    # trans (fraction of the box) -> RELION origin (Å): o = trans · D · apix, same sign (module docstring).
    shifts = np.zeros((n, 2)) if trans is None else trans * (box * apix)

    return ParticleSet(
        stacks=stacks,
        stack_id=stack_id,
        stack_index=stack_index,
        rotations=rot,
        shifts=shifts,
        pixel_size=apix,
        box_size=box,
        ctf=ctf_dict,
        source=str(path),
        stack_names=names,
    )
