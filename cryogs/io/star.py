"""RELION STAR files: read a particle set (RELION 3.0, 3.1 and 5) and write one (RELION 3.1).

Optics groups are joined onto the particles by ``_rlnOpticsGroup``; the pixel size comes from the
STAR file only; origins are in Å (3.1+) or pixels (3.0); unknown columns are ignored. Problems are
reported as :class:`CryogsError` naming the file, the line and the particle.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import starfile

from cryogs.errors import CryogsError
from cryogs.physics.conventions import euler_to_matrix, matrix_to_euler

from .atomic import atomic_path
from .mrc import open_stack
from .particles import CTF_KEYS, ParticleSet, first_data_lines, resolve_stack

__all__ = ["load_star", "write_star"]

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


class _Table:
    """A STAR loop block with the helpers that turn its columns into checked numpy arrays."""

    def __init__(self, path: Path, name: str, df: pd.DataFrame):
        self.path, self.name, self.df = path, name, df.reset_index(drop=True)
        self._line0: int | None | bool = False

    def line0(self) -> int | None:
        if self._line0 is False:
            self._line0 = first_data_lines(self.path).get(self.name)
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
    stacks = [resolve_stack(str(u), star_dir, ddir) for u in uniques]

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


def write_star_with_poses(path: str | os.PathLike, particles, rotations, shifts, image_names: Sequence[str]) -> None:
    """The particles' own STAR file (``particles.source``) with new poses, as RELION 3.1, atomically.

    Every column of the source is kept, for the particles of the set (``particles.rows``, in its
    order); ``_rlnAngleRot/Tilt/Psi`` and ``_rlnOriginX/YAngst`` are written (RELION 3.0's pixel origins
    ``_rlnOriginX/Y`` are dropped, replaced by the Å ones) and ``_rlnImageName`` gets ``image_names``
    (the stacks' resolved paths, so the file reads from anywhere). A 3.0 file (no optics block) gets
    one: the optics columns a 3.1 file needs, per distinct voltage, Cs and amplitude contrast.
    """
    path = Path(path)
    source = Path(particles.source)
    blocks = _read_blocks(source)
    pname, pdf = _pick_particles(source, blocks)
    df = pdf.iloc[np.asarray(particles.rows)].reset_index(drop=True).copy()
    rot = np.asarray(rotations.detach().cpu().numpy() if hasattr(rotations, "detach") else rotations, dtype=np.float64)
    sh = np.asarray(shifts.detach().cpu().numpy() if hasattr(shifts, "detach") else shifts, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gimbal lock")
        eul = matrix_to_euler(rot).reshape(-1, 3)
    df = df.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in df.columns])
    df["rlnImageName"] = list(image_names)
    for k, col in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        df[col] = eul[:, k]
    df["rlnOriginXAngst"], df["rlnOriginYAngst"] = sh[:, 0], sh[:, 1]
    optics = blocks.get("optics") if pname != "optics" else None
    if optics is None:  # RELION 3.0: make the optics block, keep the particle columns
        pixel = particles.pixel_size * particles.box_size / particles.stack_box
        with tempfile.TemporaryDirectory() as tmpdir:
            base = Path(tmpdir) / "base.star"
            write_star(base, None, rot, sh, pixel, particles.stack_box, ctf=particles.ctf, image_names=image_names,
                       ctf_premultiplied=particles.ctf_premultiplied)
            made = starfile.read(base, always_dict=True)
        optics = made["optics"]
        for col in ("rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage", "rlnSphericalAberration",
                    "rlnAmplitudeContrast", "rlnImageSize"):
            if col in df.columns and col in optics.columns:
                df = df.drop(columns=[col])
        df["rlnOpticsGroup"] = made["particles"]["rlnOpticsGroup"].to_numpy()
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": df}, tmp, float_format="%.6f")
        _add_version_line(tmp)
