"""The files a fitted model leaves in its run folder: map, model, figures and refined poses, and what
every run's ``metrics.json`` and half split say about the particles.

Shared by every fitting loop (the known-pose fit, each half of a gold-standard run) and by
``backproject``, so each writes the same files and keys in the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cryogs.analysis.figures import plot_gaussians, plot_montage, plot_slices
from cryogs.io.mrc import write_mrc
from cryogs.io.particles import ParticleSet
from cryogs.io.star import write_star
from cryogs.model.gaussians import GaussianModel


def write_map_and_model(out: Path, volume: np.ndarray, model: GaussianModel, pixel_size: float, *,
                        figures: bool = True) -> None:
    """``map.mrc`` (voxel size set), ``gaussians.{npz,pt,ply}`` and, with ``figures``, ``slices.png`` and
    ``gaussians.png``."""
    write_mrc(out / "map.mrc", volume, pixel_size)
    if figures:
        plot_slices(out / "slices.png", volume, pixel_size)
        arrays = model.arrays()
        plot_gaussians(out / "gaussians.png", arrays["means"], arrays["amplitudes"], volume.shape[-1] * pixel_size)
    for ext in ("npz", "pt", "ply"):
        model.save(out / f"gaussians.{ext}")


#: Which half each particle went into, as RELION's _rlnRandomSubset.
HALF_SPLIT_STAR = "half_split.star"


def particle_metrics(particles: ParticleSet) -> dict:
    """The keys every ``metrics.json`` starts with: what the run was computed from."""
    return {"n_particles": len(particles), "box_size": particles.box_size,
            "pixel_size_angstrom": particles.pixel_size}


def _image_names(particles: ParticleSet) -> list[str]:
    """``index@stack`` of every particle, RELION's 1-based image numbers."""
    return [f"{i + 1:06d}@{s}" for s, i in particles.image_paths]


def write_half_split_star(path, particles: ParticleSet, halves) -> None:
    """The particles as a RELION 3.1 STAR file with ``_rlnRandomSubset`` 1 or 2: which half each went
    into (``halves`` = the two index arrays). Image names, poses and CTFs are those of the stacks on
    disk, at their own box and pixel size (before --downsample; --invert is not a STAR property)."""
    subset = np.zeros(len(particles), dtype=np.int64)
    for k, idx in enumerate(halves, start=1):
        subset[idx] = k
    write_star(path, None, particles.rotations, particles.shifts, *_on_disk(particles), ctf=particles.ctf,
               image_names=_image_names(particles), random_subset=subset,
               ctf_premultiplied=particles.ctf_premultiplied)


def _on_disk(particles: ParticleSet) -> tuple[float, int]:
    """``(pixel size, box)`` of the images in the stacks, which STAR files describe (before --downsample)."""
    return particles.pixel_size * particles.box_size / particles.stack_box, particles.stack_box


def montage_indices(n: int, k: int = 4) -> np.ndarray:
    """``k`` particles spread over the set, for :func:`write_montage`."""
    return np.linspace(0, n - 1, min(k, n)).astype(int)


def write_montage(out: Path, particles: ParticleSet, idx: np.ndarray, rendered: np.ndarray) -> None:
    """``montage.png``: data, model (``rendered``, CTF applied) and residual for particles ``idx``."""
    plot_montage(out / "montage.png", particles.images(idx), rendered, titles=montage_titles(particles, idx))


def montage_titles(particles: ParticleSet, idx) -> list[str]:
    """``particle k (index@stack)``: k the particle's row in its file and index its image in the stack,
    both counted from 1, as RELION counts them."""
    return [f"particle {particles.rows[i] + 1} ({particles.stack_index[i] + 1}@"
            f"{Path(particles.stacks[particles.stack_id[i]]).name})" for i in idx]


def write_refined_star(path, particles: ParticleSet, rotations, shifts) -> None:
    """The particles with refined poses as a RELION 3.1 STAR file (same image names and CTF)."""
    write_star(path, None, rotations.cpu(), shifts.cpu(), *_on_disk(particles),
               ctf=particles.ctf, image_names=_image_names(particles),
               ctf_premultiplied=particles.ctf_premultiplied)
