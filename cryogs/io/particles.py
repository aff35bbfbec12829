"""Particle sets: poses, shifts, CTF parameters and lazily read images.

Readers: RELION STAR files (:func:`load_star`, here), cryoSPARC ``.cs`` files
(:func:`cryogs.cryosparc.load_cs`) and cryoDRGN stacks + ``pose.pkl``/``ctf.pkl``
(:func:`cryogs.cryodrgn.load_cryodrgn`); :func:`load_particles` picks one by extension.

Units and conventions (see :mod:`cryogs.conventions`):

* ``rotations[i]`` is RELION's matrix ``A`` for (rlnAngleRot, rlnAngleTilt, rlnAnglePsi).
* ``shifts[i]`` is RELION's origin (x, y) in Å (``rlnOriginXAngst/YAngst``; RELION 3.0's
  ``rlnOriginX/Y`` in pixels are multiplied by the pixel size).
* The pixel size always comes from the STAR file (``rlnImagePixelSize``, or RELION 3.0's
  ``rlnDetectorPixelSize · 1e4 / rlnMagnification``), never from the MRC header.
* CTF arrays are in RELION units: defocus in Å, angles in degrees, voltage in kV, Cs in mm.

Images are read on demand from memory-mapped stacks (:meth:`ParticleSet.images`), so a set of
millions of particles costs only its metadata in memory. :meth:`ParticleSet.transformed` gives a set
whose images are inverted and/or Fourier-cropped as they are read (:func:`fourier_crop`).
"""
from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import starfile
import torch

from .atomic import atomic_path
from .conventions import euler_to_matrix, matrix_to_euler
from .errors import CryogsError
from .fourier import fourier_crop_tensor
from .mrc import open_stack

__all__ = [
    "ParticleSet",
    "load_star",
    "load_particles",
    "write_star",
    "fourier_crop",
    "load_indices",
    "CTF_KEYS",
]

#: Keys of :attr:`ParticleSet.ctf`, each an ``[n]`` float64 array in RELION units.
CTF_KEYS = (
    "defocus_u",  # Å
    "defocus_v",  # Å
    "defocus_angle",  # degrees
    "voltage",  # kV
    "cs",  # mm
    "amplitude_contrast",  # fraction
    "phase_shift",  # degrees
    "bfactor",  # Å²
)

_CTF_COLUMNS = {
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage",
    "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "phase_shift": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor",
}

_MAX_OPEN_STACKS = 256  # each open stack holds a file descriptor


# --------------------------------------------------------------------------------------------
# ParticleSet
# --------------------------------------------------------------------------------------------


@dataclass
class ParticleSet:
    """Particles of one reconstruction: one pixel size, one box size.

    Images are addressed compactly: particle ``i`` is image ``stack_index[i]`` (0-based) of the
    file ``stacks[stack_id[i]]``. :attr:`image_paths` gives the same as ``(path, index)`` pairs.
    ``rows[i]`` is the particle's 0-based row in the source file (for error messages).
    ``rotations`` is ``None`` only for sets loaded with ``require_poses=False`` from a file
    without angles.
    """

    stacks: list[str]
    stack_id: np.ndarray  # [n] int64
    stack_index: np.ndarray  # [n] int64, 0-based
    rotations: np.ndarray | None  # [n, 3, 3] float64, RELION A
    shifts: np.ndarray  # [n, 2] float64, RELION origin (x, y) in Å
    pixel_size: float  # Å
    box_size: int
    ctf: dict[str, np.ndarray] | None = None
    random_subset: np.ndarray | None = None  # [n] int64 (1 or 2) or None
    source: str = ""
    ctf_premultiplied: bool = False
    ctf_phase_flipped: bool = False
    optics_group: np.ndarray | None = None  # [n] int64
    rows: np.ndarray | None = None  # [n] int64
    first_data_line: int | None = None  # file line of row 0 (found lazily from star_block)
    star_block: str | None = None  # name of the source STAR block, for line numbers in messages
    stack_names: list[str] | None = None  # stacks as named in the file (before path resolution)
    stack_box: int | None = None  # side of the images on disk (differs from box_size once downsampled)
    invert: bool = False  # images are multiplied by -1 as they are read
    _cache: "OrderedDict[int, np.ndarray]" = field(default_factory=OrderedDict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.stack_id)
        self.stack_id = np.asarray(self.stack_id, dtype=np.int64)
        self.stack_index = np.asarray(self.stack_index, dtype=np.int64)
        self.shifts = np.asarray(self.shifts, dtype=np.float64).reshape(n, 2)
        if self.rotations is not None:
            self.rotations = np.asarray(self.rotations, dtype=np.float64).reshape(n, 3, 3)
        if self.rows is None:
            self.rows = np.arange(n, dtype=np.int64)
        self.pixel_size = float(self.pixel_size)
        self.box_size = int(self.box_size)
        self.stack_box = self.box_size if self.stack_box is None else int(self.stack_box)
        self.invert = bool(self.invert)

    # -- basics ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.stack_id)

    @property
    def image_paths(self) -> list[tuple[str, int]]:
        """``(stack_path, index)`` per particle, ``index`` 0-based."""
        return [(self.stacks[s], int(i)) for s, i in zip(self.stack_id, self.stack_index)]

    def describe(self, i: int) -> str:
        """Human-readable name of particle ``i`` for messages: row, line, stack image."""
        row = int(self.rows[i])
        where = f"particle {row + 1}"
        if self.source:
            where += f" of {self.source}"
            if self.first_data_line is None and self.star_block is not None:
                self.first_data_line = _first_data_lines(Path(self.source)).get(self.star_block)
            if self.first_data_line is not None:
                where += f" (line {self.first_data_line + row})"
        return where

    def subset(self, indices) -> "ParticleSet":
        """A new set with the given particles (integer indices or a boolean mask), in that order."""
        idx = _as_index_array(indices, len(self))
        sl = lambda a: None if a is None else a[idx]  # noqa: E731
        return replace(
            self,
            stack_id=self.stack_id[idx],
            stack_index=self.stack_index[idx],
            rotations=sl(self.rotations),
            shifts=self.shifts[idx],
            ctf=None if self.ctf is None else {k: v[idx] for k, v in self.ctf.items()},
            random_subset=sl(self.random_subset),
            optics_group=sl(self.optics_group),
            rows=self.rows[idx],
            _cache=OrderedDict(),
        )

    # -- images ------------------------------------------------------------------------------

    def _stack(self, sid: int, particle: int) -> np.ndarray:
        arr = self._cache.get(sid)
        if arr is not None:
            self._cache.move_to_end(sid)
            return arr
        path = self.stacks[sid]
        if not os.path.exists(path):
            named = self.stack_names[sid] if self.stack_names else path
            looked = f" (looked for {path} and nearby)" if named != path else ""
            raise CryogsError(
                f"stack {named} not found{looked}, needed by {self.describe(particle)}; "
                "give the folder that holds the stacks with --datadir"
            )
        arr = open_stack(path)
        if arr.shape[1:] != (self.stack_box, self.stack_box):
            says = f"{self.source} says" if self.source else "the particle file says"
            raise CryogsError(
                f"stack {path} has {arr.shape[2]}x{arr.shape[1]} images but {says} box "
                f"{self.stack_box} ({self.describe(particle)})"
            )
        self._cache[sid] = arr
        while len(self._cache) > _MAX_OPEN_STACKS:
            self._cache.popitem(last=False)
        return arr

    def images(self, indices, *, check: bool = True) -> np.ndarray:
        """Read particles ``indices`` as a ``[k, D, D]`` float32 array, in the order given.

        Only those images are read (memory-mapped stacks, opened once and cached). Raises
        :class:`CryogsError` for a missing stack, an index beyond a stack's end, a box mismatch,
        or (with ``check``) a NaN/Inf pixel. The set's transforms (:meth:`transformed`) are applied
        to the images read, so ``D`` is :attr:`box_size` (the downsampled side, if any).
        """
        idx = _as_index_array(indices, len(self))
        S = self.stack_box
        out = np.empty((len(idx), S, S), dtype=np.float32)
        sids = self.stack_id[idx]
        for sid in np.unique(sids):
            pos = np.flatnonzero(sids == sid)
            arr = self._stack(int(sid), int(idx[pos[0]]))
            local = self.stack_index[idx[pos]]
            too_far = local >= arr.shape[0]
            if too_far.any():
                bad = int(idx[pos[np.argmax(too_far)]])
                raise CryogsError(
                    f"{self.describe(bad)} asks for image {int(self.stack_index[bad]) + 1} of stack "
                    f"{self.stacks[sid]}, which has only {arr.shape[0]} images"
                )
            order = np.argsort(local, kind="stable")
            out[pos[order]] = arr[local[order]]
        if check and not np.isfinite(out).all():
            k = int(np.flatnonzero(~np.isfinite(out).reshape(len(out), -1).all(axis=1))[0])
            p = int(idx[k])
            raise CryogsError(
                f"NaN or Inf in {self.describe(p)}, image {int(self.stack_index[p]) + 1} of stack "
                f"{self.stacks[self.stack_id[p]]}"
            )
        if self.box_size != S:
            out = fourier_crop(out, self.box_size)
        if self.invert:
            np.negative(out, out=out)
        return out

    def transformed(self, *, invert: bool = False, downsample: int | None = None) -> "ParticleSet":
        """A new set whose images are transformed as they are read (streaming stays lazy).

        ``invert=True`` multiplies the images by -1 (relative to this set: inverting twice restores
        them). ``downsample=D'`` Fourier-crops the images to ``D'×D'`` (:func:`fourier_crop`): the
        image sum (total mass) is kept, :attr:`pixel_size` becomes ``p·D/D'`` and :attr:`box_size`
        ``D'``; shifts (Å), rotations and CTF parameters are unchanged. ``D'`` may be even or odd
        and must be at most the current box; ``None`` or the current box leaves the size as is.
        Crops compose exactly, each from the images on disk.
        """
        box, apix = self.box_size, self.pixel_size
        if downsample is not None:
            if isinstance(downsample, bool) or not float(downsample).is_integer():
                raise CryogsError(f"{self.source or 'particles'}: --downsample must be a whole number of pixels, got {downsample!r}")
            d = int(downsample)
            if d < 2 or d > self.box_size:
                raise CryogsError(
                    f"{self.source or 'particles'}: cannot downsample {self.box_size}px images to {d}px; "
                    f"give a box between 2 and {self.box_size}"
                )
            box, apix = d, self.pixel_size * self.box_size / d
        return replace(self, box_size=box, pixel_size=apix, invert=self.invert ^ bool(invert), _cache=OrderedDict())

    def check_stacks(self) -> None:
        """Open every stack once (headers only) and check it exists, holds every image the particles
        ask for, and has the right box. Cheap; call it before a long run to fail early."""
        order = np.lexsort((-self.stack_index, self.stack_id))
        first = np.ones(len(order), dtype=bool)
        first[1:] = self.stack_id[order][1:] != self.stack_id[order][:-1]
        for p in order[first]:  # the particle with the largest index in each stack
            sid = int(self.stack_id[p])
            arr = self._stack(sid, int(p))
            if self.stack_index[p] >= arr.shape[0]:
                raise CryogsError(
                    f"{self.describe(int(p))} asks for image {int(self.stack_index[p]) + 1} of stack "
                    f"{self.stacks[sid]}, which has only {arr.shape[0]} images"
                )

    def close(self) -> None:
        """Drop the cached memory maps (they are reopened on demand)."""
        self._cache.clear()

    def __getstate__(self):
        # Memory maps must not be pickled (DataLoader workers): they would be copied in full.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state


def fourier_crop(images, size: int, *, chunk: int = 64) -> np.ndarray:
    """Downsample ``[..., D, D]`` images to ``[..., size, size]`` float32 by Fourier cropping
    (:func:`cryogs.fourier.fourier_crop_tensor`, in float64), ``chunk`` images at a time to bound memory."""
    a = np.asarray(images)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise CryogsError(f"fourier_crop needs square images [..., D, D], got shape {a.shape}")
    D, d = a.shape[-1], int(size)
    lead = a.shape[:-2]
    flat = a.reshape(-1, D, D)
    out = np.empty((flat.shape[0], d, d), dtype=np.float32)
    for start in range(0, flat.shape[0], chunk):
        block = torch.from_numpy(flat[start:start + chunk].astype(np.float64))
        out[start:start + chunk] = fourier_crop_tensor(block, d).numpy()
    return out.reshape(*lead, d, d)


def load_indices(path: str | os.PathLike, n: int | None = None) -> np.ndarray:
    """Particle indices (0-based, ``int64``) for ``--ind``: a cryoDRGN ``.pkl``, a ``.npy``, or a
    ``.txt`` of whitespace-separated integers.

    Every entry must be a whole number ``≥ 0`` and (with ``n``, the particle count) ``< n``, with
    no repeats; a problem raises :class:`CryogsError` naming the file and the entry.
    """
    path = Path(path)
    if not path.exists():
        raise CryogsError(f"{path}: index file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pkl":
            with open(path, "rb") as fh:
                raw = pickle.load(fh)
        elif suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        elif suffix == ".txt":
            raw = np.loadtxt(path, dtype=np.float64, ndmin=1, comments="#")
        else:
            raise CryogsError(f"{path}: unknown index file type {suffix or '(no extension)'!r}; expected .pkl, .npy or .txt")
    except CryogsError:
        raise
    except Exception as err:  # pickle, numpy and loadtxt raise many kinds
        raise CryogsError(f"{path}: not a readable index file ({' '.join(str(err).split())})") from None
    try:
        arr = np.asarray(raw)
    except Exception:
        arr = np.asarray([], dtype=object)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CryogsError(f"{path}: expected an array of particle indices, got {type(raw).__name__} of {arr.dtype}")
    if arr.dtype.kind == "b":
        raise CryogsError(f"{path}: holds a boolean mask, expected particle indices (use np.flatnonzero)")
    if arr.ndim > 1 and suffix == ".txt":
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise CryogsError(f"{path}: expected a 1D array of particle indices, got shape {arr.shape}")
    if arr.size == 0:
        raise CryogsError(f"{path}: holds no particle indices")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise CryogsError(f"{path}: entry {k + 1} is {float(arr[k])!r}, not a whole-number particle index")
    idx = arr.astype(np.int64)
    if (idx < 0).any():
        k = int(np.flatnonzero(idx < 0)[0])
        raise CryogsError(f"{path}: entry {k + 1} is {idx[k]}, but particle indices count from 0")
    if n is not None and (idx >= n).any():
        k = int(np.flatnonzero(idx >= n)[0])
        raise CryogsError(f"{path}: entry {k + 1} is {idx[k]}, beyond the last particle (index {n - 1} of {n} particles)")
    uniq, first, counts = np.unique(idx, return_index=True, return_counts=True)
    if (counts > 1).any():
        j = int(np.flatnonzero(counts > 1)[0])
        second = int(np.flatnonzero(idx == uniq[j])[1])
        raise CryogsError(f"{path}: particle index {uniq[j]} appears twice (entries {first[j] + 1} and {second + 1})")
    return idx


def _as_index_array(indices, n: int) -> np.ndarray:
    if hasattr(indices, "detach"):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean mask of shape {idx.shape} for {n} particles")
        return np.flatnonzero(idx)
    idx = idx.reshape(-1).astype(np.int64, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"particle index out of range for {n} particles")
    return np.where(idx < 0, idx + n, idx)


# --------------------------------------------------------------------------------------------
# Reading STAR files
# --------------------------------------------------------------------------------------------


def _first_data_lines(path: Path) -> dict[str, int]:
    """1-based line number of the first data row of each loop block (only used for messages)."""
    lines: dict[str, int] = {}
    block = None
    in_header = False
    try:
        with open(path, errors="replace") as fh:
            for no, raw in enumerate(fh, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("data_"):
                    block, in_header = line[5:].split()[0] if line[5:].split() else "", False
                elif line.startswith("loop_"):
                    in_header = True
                elif line.startswith("_"):
                    continue
                elif in_header and block is not None and block not in lines:
                    lines[block] = no
                    in_header = False
    except OSError:
        pass
    return lines


class _Table:
    """A STAR loop block with the helpers that turn its columns into checked numpy arrays."""

    def __init__(self, path: Path, name: str, df: pd.DataFrame):
        self.path, self.name, self.df = path, name, df.reset_index(drop=True)
        self._line0: int | None | bool = False

    def line0(self) -> int | None:
        if self._line0 is False:
            self._line0 = _first_data_lines(self.path).get(self.name)
        return self._line0  # type: ignore[return-value]

    def where(self, row: int) -> str:
        line0 = self.line0()
        what = "particle" if self.name != "optics" else "optics group row"
        if line0 is None:
            return f"{what} {row + 1}"
        return f"line {line0 + row} ({what} {row + 1})"

    def has(self, col: str) -> bool:
        return col in self.df.columns

    def numeric(self, col: str) -> np.ndarray:
        raw = self.df[col]
        vals = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(vals)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = raw.iloc[row]
            if pd.isna(value):
                why = "is missing (a row with too few values?)"
            else:
                why = f"has non-numeric value {str(value)!r}"
            raise CryogsError(f"{self.path}: {self.where(row)}: column _{col} {why}")
        return vals

    def integer(self, col: str) -> np.ndarray:
        vals = self.numeric(col)
        frac = vals != np.round(vals)
        if frac.any():
            row = int(np.flatnonzero(frac)[0])
            raise CryogsError(f"{self.path}: {self.where(row)}: column _{col} must be an integer, got {vals[row]}")
        return vals.astype(np.int64)


def _read_blocks(path: Path) -> dict:
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile/pandas raise many types for malformed files
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CryogsError(f"{path}: not a readable STAR file ({msg})") from None
    out = {}
    for name, block in blocks.items():
        if isinstance(block, dict):  # a non-loop block: one row
            block = pd.DataFrame([block])
        if isinstance(block, pd.DataFrame):
            out[name] = block
    return out


def _pick_particles(path: Path, blocks: dict) -> tuple[str, pd.DataFrame]:
    if not blocks:
        raise CryogsError(f"{path}: no data blocks found; is this a RELION STAR file?")
    if "particles" in blocks:
        name = "particles"
    else:
        named = [n for n, b in blocks.items() if n != "optics" and "rlnImageName" in b.columns]
        candidates = named or [n for n in blocks if n != "optics"]
        if not candidates:
            raise CryogsError(f"{path}: has an optics block but no particles block")
        name = candidates[0]
    df = blocks[name]
    if "rlnImageName" not in df.columns:
        raise CryogsError(f"{path}: block data_{name} has no _rlnImageName column (the particle images)")
    if len(df) == 0:
        raise CryogsError(f"{path}: block data_{name} has no particles")
    return name, df


def _join_optics(path: Path, parts: _Table, optics: _Table | None) -> tuple[_Table, np.ndarray | None]:
    """Copy each optics-group column onto the particles (particle columns win)."""
    if optics is None:
        return parts, None
    if not optics.has("rlnOpticsGroup"):
        raise CryogsError(f"{path}: optics block has no _rlnOpticsGroup column")
    gids = optics.integer("rlnOpticsGroup")
    if len(set(gids.tolist())) != len(gids):
        raise CryogsError(f"{path}: optics block lists an rlnOpticsGroup more than once")
    if parts.has("rlnOpticsGroup"):
        pg = parts.integer("rlnOpticsGroup")
    elif len(gids) == 1:
        pg = np.full(len(parts.df), gids[0], dtype=np.int64)
    else:
        raise CryogsError(f"{path}: {len(gids)} optics groups but particles have no _rlnOpticsGroup column")
    lookup = pd.Series(np.arange(len(gids)), index=gids)
    pos = lookup.reindex(pg).to_numpy()
    missing = np.isnan(pos.astype(np.float64))
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise CryogsError(f"{path}: {parts.where(row)}: optics group {pg[row]} is not in the optics block")
    pos = pos.astype(np.int64)
    df = parts.df.copy()
    for col in optics.df.columns:
        if col not in df.columns:
            df[col] = optics.df[col].to_numpy()[pos]
    joined = _Table(path, parts.name, df)
    joined._line0 = parts._line0
    joined.particle_columns = set(parts.df.columns)  # type: ignore[attr-defined]
    # Keep optics-derived columns reporting against the optics block's lines.
    joined.optics_table, joined.optics_pos = optics, pos  # type: ignore[attr-defined]
    return joined, pg


def _numeric_joined(t: _Table, col: str) -> np.ndarray:
    """Numeric column of a joined table; errors in optics columns name the optics block line."""
    optics = getattr(t, "optics_table", None)
    if optics is not None and optics.has(col) and col not in t.particle_columns:  # type: ignore[attr-defined]
        # The column came from the optics block: report problems against its lines.
        return optics.numeric(col)[t.optics_pos]  # type: ignore[attr-defined]
    return t.numeric(col)


def _candidates(name: str, star_dir: Path, datadir: Path | None) -> list[Path]:
    p = Path(name)
    out: list[Path] = []
    if p.is_absolute():
        out.append(p)
        rel = Path(p.name)
    else:
        rel = p
    if datadir is not None:
        out += [datadir / rel, datadir / p.name]
    out += [star_dir / rel, star_dir / p.name]
    if not p.is_absolute():
        # RELION names stacks relative to its project folder, which is usually an ancestor of the
        # job folder holding the STAR file, or the folder the user runs from.
        out += [anc / rel for anc in list(star_dir.parents)[:3]]
        out.append(Path.cwd() / rel)
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _resolve_stack(name: str, star_dir: Path, datadir: Path | None) -> str:
    cands = _candidates(name, star_dir, datadir)
    for c in cands:
        if c.is_file():
            return str(c)
    return str(cands[0])


def _parse_image_names(t: _Table) -> tuple[np.ndarray, np.ndarray]:
    """``idx@stack`` strings to (0-based index, stack name); a name without ``@`` is image 1."""
    names = t.df["rlnImageName"].astype(str).str.strip()
    left, sep, right = (names.str.partition("@")[k] for k in range(3))
    has_at = (sep == "@").to_numpy()
    stack = np.where(has_at, right.to_numpy(dtype=object), names.to_numpy(dtype=object))
    idx_text = np.where(has_at, left.to_numpy(dtype=object), "1")
    idx = pd.to_numeric(pd.Series(idx_text), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(idx) | (idx < 1) | (idx != np.round(idx)) | (stack == "")
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CryogsError(
            f"{t.path}: {t.where(row)}: _rlnImageName {names.iloc[row]!r} is not of the form "
            "index@stack.mrcs (index counted from 1)"
        )
    return idx.astype(np.int64) - 1, stack


def _one_value(path: Path, what: str, values: np.ndarray, groups: np.ndarray | None, fmt, rtol=1e-4) -> float:
    """The single value of a per-particle quantity, or a CryogsError listing the different ones."""
    ref = values[0]
    if np.all(np.abs(values - ref) <= rtol * abs(ref)):
        return float(ref)
    if groups is not None:
        per = {}
        for g, v in zip(groups.tolist(), values.tolist()):
            per.setdefault(g, v)
        listing = ", ".join(f"group {g}: {fmt(v)}" for g, v in sorted(per.items()))
        raise CryogsError(
            f"{path}: optics groups have different {what}s ({listing}); cryogs reconstructs from one "
            f"{what} — select one {what} with --optics-groups (optics_groups= in Python), or re-extract"
        )
    uniq = np.unique(values)
    listing = ", ".join(fmt(v) for v in uniq[:6]) + (", ..." if len(uniq) > 6 else "")
    raise CryogsError(f"{path}: particles have different {what}s ({listing}); cryogs needs one {what}")


def load_star(
    path: str | os.PathLike,
    *,
    datadir: str | os.PathLike | None = None,
    require_poses: bool = True,
    optics_groups: int | Sequence[int] | None = None,
) -> ParticleSet:
    """Load a RELION 3.0, 3.1 or 5 particle STAR file.

    ``datadir`` is where to look for the stacks named in ``_rlnImageName`` (``idx@stack``, idx
    1-based). Each stack is looked for at ``datadir/name``, ``datadir/basename``, then
    ``star_dir/name``, ``star_dir/basename``, then (RELION project layout) ``ancestor/name`` for
    the STAR folder's three nearest ancestors and ``cwd/name``. Stacks are not opened here; a
    missing one is reported by :meth:`ParticleSet.images` / :meth:`ParticleSet.check_stacks`
    (except for RELION 3.0 files without ``_rlnImageSize``, whose box is read from the first stack).

    ``optics_groups`` keeps only particles of those groups (e.g. to pick one pixel size).
    ``require_poses=False`` accepts files without angles (``rotations`` is then ``None``).
    Unknown columns are ignored.
    """
    path = Path(path)
    if not path.exists():
        raise CryogsError(f"{path}: file not found")
    if path.is_dir():
        raise CryogsError(f"{path}: is a folder, expected a STAR file")
    blocks = _read_blocks(path)
    pname, pdf = _pick_particles(path, blocks)
    parts = _Table(path, pname, pdf)
    optics = _Table(path, "optics", blocks["optics"]) if "optics" in blocks and pname != "optics" else None
    t, groups = _join_optics(path, parts, optics)
    rows = np.arange(len(t.df), dtype=np.int64)

    if optics_groups is not None:
        want = np.atleast_1d(np.asarray(optics_groups, dtype=np.int64))
        if groups is None:
            raise CryogsError(f"{path}: has no optics groups to select from")
        keep = np.isin(groups, want)
        if not keep.any():
            raise CryogsError(f"{path}: no particles in optics group(s) {', '.join(map(str, want.tolist()))}")
        rows, groups = rows[keep], groups[keep]
    n = len(rows)

    def col(name: str) -> np.ndarray:
        return _numeric_joined(t, name)[rows]

    # Pixel size: one per reconstruction, from the STAR file only.
    if t.has("rlnImagePixelSize"):
        apix = col("rlnImagePixelSize")
    elif t.has("rlnDetectorPixelSize") and t.has("rlnMagnification"):
        apix = col("rlnDetectorPixelSize") * 1e4 / col("rlnMagnification")
    else:
        raise CryogsError(
            f"{path}: no pixel size: needs _rlnImagePixelSize (optics block) or, for RELION 3.0, "
            "_rlnDetectorPixelSize and _rlnMagnification"
        )
    if np.any(apix <= 0):
        raise CryogsError(f"{path}: pixel size must be positive")
    pixel_size = _one_value(path, "pixel size", apix, groups, lambda v: f"{v:g} Å")

    # Images.
    stack_index, stack_names = _parse_image_names(t)
    stack_index, stack_names = stack_index[rows], stack_names[rows]
    codes, uniques = pd.factorize(pd.Series(stack_names, dtype=object), sort=False)
    star_dir = path.resolve().parent
    ddir = Path(datadir) if datadir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise CryogsError(f"{ddir}: --datadir folder not found")
    stacks = [_resolve_stack(str(u), star_dir, ddir) for u in uniques]

    # Box size.
    if t.has("rlnImageSize"):
        box = int(_one_value(path, "box size", col("rlnImageSize"), groups, lambda v: f"{int(v)} px", rtol=0))
    else:
        first = stacks[int(codes[0])]
        if not os.path.exists(first):
            raise CryogsError(
                f"{path}: no _rlnImageSize, and the first stack {first} (needed for the box size) was not "
                "found; give the stack folder with --datadir"
            )
        shape = open_stack(first).shape
        if shape[1] != shape[2]:
            raise CryogsError(f"{first}: images are {shape[2]}x{shape[1]}, cryogs needs square images")
        box = int(shape[1])

    # Poses.
    angle_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    missing = [c for c in angle_cols if not t.has(c)]
    if missing:
        if require_poses:
            raise CryogsError(
                f"{path}: no particle poses (missing {', '.join('_' + c for c in missing)}); cryogs needs "
                "poses: use the _data.star of a 3D refinement (e.g. RELION Refine3D run_data.star)"
            )
        rotations = None
    else:
        eul = np.stack([col(c) for c in angle_cols], axis=1)
        rotations = euler_to_matrix(eul).numpy()

    if t.has("rlnOriginXAngst") or t.has("rlnOriginYAngst"):
        if not (t.has("rlnOriginXAngst") and t.has("rlnOriginYAngst")):
            _missing_pair(path, "rlnOriginXAngst", "rlnOriginYAngst", t)
        shifts = np.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], axis=1)
    elif t.has("rlnOriginX") or t.has("rlnOriginY"):
        if not (t.has("rlnOriginX") and t.has("rlnOriginY")):
            _missing_pair(path, "rlnOriginX", "rlnOriginY", t)
        shifts = np.stack([col("rlnOriginX"), col("rlnOriginY")], axis=1) * pixel_size
    else:
        shifts = np.zeros((n, 2))

    # CTF.
    ctf = None
    if t.has("rlnDefocusU"):
        for key in ("voltage", "cs", "amplitude_contrast"):
            if not t.has(_CTF_COLUMNS[key]):
                raise CryogsError(f"{path}: has defocus values but no _{_CTF_COLUMNS[key]} column")
        defaults = {"defocus_v": None, "defocus_angle": 0.0, "phase_shift": 0.0, "bfactor": 0.0}
        ctf = {}
        for key in CTF_KEYS:
            column = _CTF_COLUMNS[key]
            if t.has(column):
                ctf[key] = col(column)
            elif key == "defocus_v":
                ctf[key] = ctf["defocus_u"].copy()
            else:
                ctf[key] = np.full(n, defaults[key])

    premult = False
    if t.has("rlnCtfDataAreCtfPremultiplied"):
        flags = col("rlnCtfDataAreCtfPremultiplied") != 0
        if flags.any() and not flags.all():
            raise CryogsError(f"{path}: some optics groups have CTF-premultiplied images and some do not")
        premult = bool(flags.all())

    flipped = False
    if t.has("rlnCtfDataArePhaseFlipped"):
        flags = col("rlnCtfDataArePhaseFlipped") != 0
        if flags.any() and not flags.all():
            raise CryogsError(f"{path}: some optics groups have phase-flipped images and some do not")
        flipped = bool(flags.all())

    random_subset = t.integer("rlnRandomSubset")[rows] if t.has("rlnRandomSubset") else None

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
        ctf_premultiplied=premult,
        ctf_phase_flipped=flipped,
        optics_group=groups,
        rows=rows,
        star_block=pname,
        stack_names=[str(u) for u in uniques],
    )


def _missing_pair(path: Path, a: str, b: str, t: _Table):
    have, lack = (a, b) if t.has(a) else (b, a)
    raise CryogsError(f"{path}: has _{have} but no _{lack}")


def load_particles(
    path: str | os.PathLike,
    *,
    datadir: str | os.PathLike | None = None,
    poses: str | os.PathLike | None = None,
    ctf: str | os.PathLike | None = None,
    pixel_size: float | None = None,
    ind: str | os.PathLike | None = None,
    invert: bool = False,
    downsample: int | None = None,
    **kwargs,
) -> ParticleSet:
    """Load a particle file by extension.

    * ``.star``: RELION (:func:`load_star`; ``kwargs`` such as ``require_poses``/``optics_groups`` go there);
    * ``.cs``: cryoSPARC (:func:`cryogs.cryosparc.load_cs`; ``kwargs`` may give ``box_size``);
    * ``.mrcs``/``.mrc``/``.txt``: a cryoDRGN image stack or list of stacks, which needs ``poses``
      (a ``pose.pkl``) and takes ``ctf`` (a ``ctf.pkl``) and ``pixel_size``
      (:func:`cryogs.cryodrgn.load_cryodrgn`).

    Then ``ind`` (an index file, :func:`load_indices`) keeps those particles, and ``invert`` /
    ``downsample`` transform the images as they are read (:meth:`ParticleSet.transformed`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    stack_only = {"--poses": poses, "--ctf": ctf, "--pixel-size": pixel_size}
    given = [k for k, v in stack_only.items() if v is not None]
    if suffix in (".star", ".cs") and given:
        raise CryogsError(
            f"{path}: {', '.join(given)} only apply to image stacks (.mrcs/.txt); a {suffix} file carries "
            "its own poses, CTF and pixel size"
        )
    if suffix == ".star":
        particles = load_star(path, datadir=datadir, **kwargs)
    elif suffix == ".cs":
        from .cryosparc import load_cs

        particles = load_cs(path, datadir=datadir, **kwargs)
    elif suffix in (".mrcs", ".mrc", ".txt"):
        from .cryodrgn import load_cryodrgn

        if poses is None:
            raise CryogsError(
                f"{path}: an image stack needs poses: give a cryoDRGN pose.pkl with --poses (and its ctf.pkl with --ctf)"
            )
        if kwargs:
            raise CryogsError(f"{path}: options {', '.join(sorted(kwargs))} do not apply to image stacks")
        particles = load_cryodrgn(path, poses=poses, ctf=ctf, pixel_size=pixel_size, datadir=datadir)
    elif suffix == ".pkl":
        raise CryogsError(
            f"{path}: a .pkl holds poses or CTF parameters, not images; give the image stack (.mrcs or a .txt "
            "list of stacks) and pass the pkl files with --poses and --ctf"
        )
    else:
        raise CryogsError(
            f"{path}: unknown particle file type {suffix or '(no extension)'!r}; expected a RELION .star, a "
            "cryoSPARC .cs, or an image stack (.mrcs, or a .txt list of stacks) with --poses"
        )
    if ind is not None:
        particles = particles.subset(load_indices(ind, len(particles)))
    if invert or downsample is not None:
        particles = particles.transformed(invert=invert, downsample=downsample)
    return particles


# --------------------------------------------------------------------------------------------
# Writing STAR files
# --------------------------------------------------------------------------------------------


def write_star(
    path: str | os.PathLike,
    stack_name: str | None,
    rotations,
    shifts,
    pixel_size: float,
    box_size: int,
    *,
    ctf: dict[str, np.ndarray] | None = None,
    random_subset=None,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    image_names: Sequence[str] | None = None,
    ctf_premultiplied: bool = False,
) -> None:
    """Write a RELION 3.1 particle STAR file (optics + particles blocks), atomically.

    Particle ``i`` is ``f"{i+1:06d}@{stack_name}"`` unless ``image_names`` gives every name.
    ``rotations [n,3,3]`` are RELION ``A`` matrices (written as rlnAngleRot/Tilt/Psi),
    ``shifts [n,2]`` RELION origins in Å. ``ctf`` uses :data:`CTF_KEYS` (RELION units); its
    voltage/cs/amplitude_contrast arrays, when given, define the optics groups, otherwise the
    scalar keyword values make one group.
    """
    path = Path(path)
    rot = np.asarray(rotations.detach().cpu().numpy() if hasattr(rotations, "detach") else rotations, dtype=np.float64)
    n = rot.shape[0]
    if rot.shape != (n, 3, 3):
        raise CryogsError(f"{path}: rotations must be [n, 3, 3], got {rot.shape}")
    sh = np.asarray(shifts.detach().cpu().numpy() if hasattr(shifts, "detach") else shifts, dtype=np.float64)
    if sh.shape != (n, 2):
        raise CryogsError(f"{path}: shifts must be [n, 2] to match {n} rotations, got {sh.shape}")
    if image_names is not None:
        names = [str(s) for s in image_names]
        if len(names) != n:
            raise CryogsError(f"{path}: {len(names)} image names for {n} particles")
    elif stack_name:
        names = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
    else:
        raise CryogsError(f"{path}: give a stack name or image names")

    def per_particle(key, default):
        if ctf is not None and key in ctf and ctf[key] is not None:
            return np.broadcast_to(np.asarray(ctf[key], dtype=np.float64), (n,))
        return np.full(n, float(default))

    optic_vals = np.stack(
        [per_particle("voltage", voltage), per_particle("cs", cs), per_particle("amplitude_contrast", amplitude_contrast)],
        axis=1,
    )
    uniq, group = np.unique(optic_vals, axis=0, return_inverse=True)
    group = group.reshape(-1) + 1
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(uniq) + 1)],
            "rlnImagePixelSize": float(pixel_size),
            "rlnImageSize": int(box_size),
            "rlnImageDimensionality": 2,
            "rlnVoltage": uniq[:, 0],
            "rlnSphericalAberration": uniq[:, 1],
            "rlnAmplitudeContrast": uniq[:, 2],
            "rlnCtfDataAreCtfPremultiplied": int(bool(ctf_premultiplied)),
        }
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gimbal lock")  # tilt 0/180: rot+psi is what matters
        eul = matrix_to_euler(rot).reshape(n, 3)
    cols = {
        "rlnImageName": names,
        "rlnAngleRot": eul[:, 0],
        "rlnAngleTilt": eul[:, 1],
        "rlnAnglePsi": eul[:, 2],
        "rlnOriginXAngst": sh[:, 0],
        "rlnOriginYAngst": sh[:, 1],
        "rlnOpticsGroup": group,
    }
    if ctf is not None:
        for key in ("defocus_u", "defocus_v", "defocus_angle", "phase_shift", "bfactor"):
            if key in ctf and ctf[key] is not None:
                cols[_CTF_COLUMNS[key]] = np.broadcast_to(np.asarray(ctf[key], dtype=np.float64), (n,))
    if random_subset is not None:
        cols["rlnRandomSubset"] = np.asarray(random_subset, dtype=np.int64).reshape(n)
    particles = pd.DataFrame(cols)
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp, float_format="%.6f")
        _add_version_line(tmp)


def _add_version_line(tmp: Path) -> None:
    """Mark the blocks as RELION 3.1 (``# version 30001``), as RELION itself writes them."""
    text = tmp.read_text()
    text = text.replace("data_optics", "# version 30001\n\ndata_optics", 1)
    text = text.replace("data_particles", "# version 30001\n\ndata_particles", 1)
    tmp.write_text(text)

