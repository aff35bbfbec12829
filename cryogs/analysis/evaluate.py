"""Compare a reconstruction with a known map: FSC (0.5 and 0.143), real-space correlation, figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cryogs.errors import CryogsError
from cryogs.io.mrc import read_map_geometry, read_mrc

from .fsc import SOFT_EDGE_VOXELS, fsc, mask_label, plot_fsc, resolution_at


def compare_maps(volume: np.ndarray, reference: np.ndarray, pixel_size: float, *, mask_radius: float | None = None):
    """FSC of ``volume`` against ``reference`` inside a soft sphere (default radius 0.45·D·p).

    Returns ``(metrics, freqs, curve)`` with ``fsc_0.5_angstrom``, ``fsc_0.143_angstrom`` and the
    Pearson ``correlation`` of the two maps.
    """
    if volume.shape != reference.shape:
        raise CryogsError(f"the reference map has shape {reference.shape}, the reconstruction {volume.shape}")
    radius = 0.45 * volume.shape[0] * pixel_size if mask_radius is None else mask_radius
    freqs, curve = fsc(volume, reference, pixel_size=pixel_size, mask_radius=radius)
    corr = float(np.corrcoef(volume.ravel(), reference.ravel())[0, 1])
    metrics = {"fsc_0.5_angstrom": float(resolution_at(freqs, curve, 0.5)),
               "fsc_0.143_angstrom": float(resolution_at(freqs, curve, 0.143)),
               "correlation": corr, "fsc_mask_radius_angstrom": radius,
               "fsc_mask_edge_angstrom": SOFT_EDGE_VOXELS * pixel_size,
               "fsc_curve": {"frequency_per_angstrom": freqs.tolist(), "fsc": curve.tolist()}}
    return metrics, freqs, curve


def check_reference(reference, box_size: int, pixel_size: float) -> None:
    """Refuse a reference map that is missing, unreadable, or not on the particles' grid (box and
    voxel size), from its header: before a run, not after it."""
    shape, voxel = read_map_geometry(reference)
    if shape != (box_size,) * 3:
        raise CryogsError(f"--reference {reference}: its box is {shape[2]}x{shape[1]}x{shape[0]} voxels, the "
                          f"particles' {box_size} px (after --downsample, if given); resample it to match")
    if not np.allclose(voxel, pixel_size, rtol=1e-3):
        raise CryogsError(f"--reference {reference}: its voxel size is {voxel[0]:.4g} Å, the particles' pixel size "
                          f"{pixel_size:.4g} Å (after --downsample, if given); resample it to match")


def compare_maps_files(volume: np.ndarray, pixel_size: float, reference, figure: Path | None = None, *,
                       mask_radius: float | None = None) -> dict:
    """:func:`compare_maps` against a reference MRC file (its voxel size must match), with its figure."""
    ref, voxel = read_mrc(reference)
    if not np.allclose(voxel, pixel_size, rtol=1e-3):
        raise CryogsError(f"{reference}: voxel size {voxel} Å differs from the particles' {pixel_size} Å")
    metrics, freqs, curve = compare_maps(volume, ref, pixel_size, mask_radius=mask_radius)
    if figure is not None:
        plot_fsc(figure, {"reconstruction vs reference": (freqs, curve)},
                 title=f"FSC vs {Path(reference).name}: {metrics['fsc_0.5_angstrom']:.2f} Å at 0.5",
                 mask=mask_label(metrics["fsc_mask_radius_angstrom"], pixel_size))
    return metrics
