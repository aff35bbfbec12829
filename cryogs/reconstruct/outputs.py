"""The files a fitted model leaves in its run folder: map, model, figures and refined poses.

Shared by every fitting loop (the known-pose fit, each half of a gold-standard run), so each writes
the same files in the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cryogs.analysis.figures import plot_gaussians, plot_montage, plot_slices
from cryogs.io.mrc import write_mrc
from cryogs.io.particles import ParticleSet
from cryogs.io.star import write_star
from cryogs.model.gaussians import GaussianModel


def write_map_and_model(out: Path, volume: np.ndarray, model: GaussianModel, pixel_size: float) -> None:
    """``map.mrc`` (voxel size set), ``slices.png``, ``gaussians.png`` and ``gaussians.{npz,pt,ply}``."""
    write_mrc(out / "map.mrc", volume, pixel_size)
    plot_slices(out / "slices.png", volume, pixel_size)
    arrays = model.arrays()
    plot_gaussians(out / "gaussians.png", arrays["means"], arrays["amplitudes"], volume.shape[-1] * pixel_size)
    for ext in ("npz", "pt", "ply"):
        model.save(out / f"gaussians.{ext}")


def montage_indices(n: int, k: int = 4) -> np.ndarray:
    """``k`` particles spread over the set, for :func:`write_montage`."""
    return np.linspace(0, n - 1, min(k, n)).astype(int)


def write_montage(out: Path, particles: ParticleSet, idx: np.ndarray, rendered: np.ndarray) -> None:
    """``montage.png``: data, model (``rendered``, CTF applied) and residual for particles ``idx``."""
    plot_montage(out / "montage.png", particles.images(idx), rendered, titles=[f"particle {i}" for i in idx])


def write_refined_star(path, particles: ParticleSet, rotations, shifts) -> None:
    """The particles with refined poses as a RELION 3.1 STAR file (same image names and CTF)."""
    write_star(path, None, rotations.cpu(), shifts.cpu(), particles.pixel_size, particles.box_size,
               ctf=particles.ctf, image_names=[f"{i + 1:06d}@{s}" for s, i in particles.image_paths],
               ctf_premultiplied=particles.ctf_premultiplied)
