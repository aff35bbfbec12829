"""Compare a reconstruction with a known map: FSC (0.5 and 0.143), real-space correlation, figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cryogs.errors import CryogsError
from cryogs.io.mrc import read_mrc

from .fsc import fsc, plot_fsc, resolution_at


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
               "fsc_curve": {"frequency_per_angstrom": freqs.tolist(), "fsc": curve.tolist()}}
    return metrics, freqs, curve


def compare_maps_files(volume: np.ndarray, pixel_size: float, reference, figure: Path | None = None) -> dict:
    """:func:`compare_maps` against a reference MRC file (its voxel size must match), with ``fsc.png``."""
    ref, voxel = read_mrc(reference)
    if not np.allclose(voxel, pixel_size, rtol=1e-3):
        raise CryogsError(f"{reference}: voxel size {voxel} Å differs from the particles' {pixel_size} Å")
    metrics, freqs, curve = compare_maps(volume, ref, pixel_size)
    if figure is not None:
        plot_fsc(figure, {"reconstruction vs reference": (freqs, curve)},
                 title=f"FSC vs {Path(reference).name}: {metrics['fsc_0.5_angstrom']:.2f} Å at 0.5")
    return metrics
