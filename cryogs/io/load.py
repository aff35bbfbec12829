"""``load_particles``: one entry point for every particle file format, picked by extension."""
from __future__ import annotations

import os
from pathlib import Path

from cryogs.errors import CryogsError

from .cryodrgn import load_cryodrgn
from .cryosparc import load_cs
from .particles import ParticleSet, load_indices
from .star import load_star

__all__ = ["load_particles"]


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
    * ``.cs``: cryoSPARC (:func:`cryogs.io.cryosparc.load_cs`; ``kwargs`` may give ``box_size``);
    * ``.mrcs``/``.mrc``/``.txt``: a cryoDRGN image stack or list of stacks, which needs ``poses``
      (a ``pose.pkl``; unless ``require_poses=False``) and takes ``ctf`` (a ``ctf.pkl``) and ``pixel_size``
      (:func:`cryogs.io.cryodrgn.load_cryodrgn`).

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
        particles = load_cs(path, datadir=datadir, **kwargs)
    elif suffix in (".mrcs", ".mrc", ".txt"):
        require_poses = kwargs.pop("require_poses", True)
        if poses is None and require_poses:
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
