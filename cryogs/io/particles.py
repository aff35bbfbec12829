"""The particle set: poses, shifts, CTF parameters and lazily read images.

Readers that build a :class:`ParticleSet`: RELION STAR files (:mod:`cryogs.io.star`), cryoSPARC
``.cs`` files (:mod:`cryogs.io.cryosparc`) and cryoDRGN stacks + ``pose.pkl``/``ctf.pkl``
(:mod:`cryogs.io.cryodrgn`); :func:`cryogs.io.load.load_particles` picks one by extension.

Units and conventions (see :mod:`cryogs.physics.conventions`):

* ``rotations[i]`` is RELION's matrix ``A`` for (rlnAngleRot, rlnAngleTilt, rlnAnglePsi).
* ``shifts[i]`` is RELION's origin (x, y) in Å (``rlnOriginXAngst/YAngst``; RELION 3.0's
  ``rlnOriginX/Y`` in pixels are multiplied by the pixel size).
* The pixel size always comes from the particle file (``rlnImagePixelSize``, or RELION 3.0's
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

import numpy as np
import torch

from cryogs.errors import CryogsError
from cryogs.physics.fourier import fourier_crop_tensor

from .mrc import open_stack

__all__ = ["ParticleSet", "fourier_crop", "load_indices", "resolve_stack", "first_data_lines", "CTF_KEYS"]

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
                self.first_data_line = first_data_lines(Path(self.source)).get(self.star_block)
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
    (:func:`cryogs.physics.fourier.fourier_crop_tensor`, in float64), ``chunk`` images at a time to bound memory."""
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
            with warnings.catch_warnings():  # an empty file is reported below, in one line
                warnings.simplefilter("ignore")
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


def first_data_lines(path: Path) -> dict[str, int]:
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


def resolve_stack(name: str, star_dir: Path, datadir: Path | None) -> str:
    cands = _candidates(name, star_dir, datadir)
    for c in cands:
        if c.is_file():
            return str(c)
    return str(cands[0])
