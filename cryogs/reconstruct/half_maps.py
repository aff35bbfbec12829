"""Half maps: two independent half-set models, their FSC, and the averaged map.

For a Gaussian model the half-map FSC measures how reproducible the fit is, not how accurate: both
halves extrapolate beyond the data's resolution in the same way, so it reads higher resolution than
the FSC against the truth (Nyquist where the truth says 3.3–4.3 Å on the quality benchmark). The
figure and the reports say so (:data:`HALF_MAP_CAVEAT`).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cryogs.analysis.figures import plot_slices
from cryogs.analysis.fsc import SOFT_EDGE_VOXELS, fsc, mask_label, plot_fsc, resolution_at
from cryogs.io.mrc import read_mrc, write_mrc
from cryogs.io.particles import ParticleSet
from cryogs.io.progress import Report
from cryogs.model.gaussians import GaussianModel

from .config import TrainConfig, default_mask_radius
from .distributed import Group, split_halves
from .fit import planned_steps, run_training
from .outputs import HALF_SPLIT_STAR, particle_metrics, write_half_split_star

#: What the half-map FSC of two Gaussian models means, for figures and reports.
HALF_MAP_CAVEAT = ("the reproducibility of two Gaussian fits, not a gold-standard resolution: "
                   "it overstates the resolution (compare the FSC against a known map)")


def half_split(particles: ParticleSet, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices of the two halves: from ``_rlnRandomSubset`` when present, else a seeded random split."""
    subset = particles.random_subset
    if subset is not None and set(np.unique(subset)) == {1, 2}:
        return np.flatnonzero(subset == 1), np.flatnonzero(subset == 2), "rlnRandomSubset"
    order = np.random.default_rng([seed, 12345]).permutation(len(particles))
    half = len(order) // 2
    return np.sort(order[:half]), np.sort(order[half:]), f"random split (seed {seed})"


def run_half_maps(particles: ParticleSet, config: TrainConfig, out_dir, *, resume=False, progress=True,
                  command=None, mask_radius: float | None = None,
                  initial: GaussianModel | Callable[[ParticleSet], GaussianModel] | None = None,
                  group: Group | None = None, report: Report | None = None):
    """Train one model per half into ``out_dir/half1`` and ``out_dir/half2``; write ``half1.mrc``,
    ``half2.mrc``, ``map.mrc`` (their average), the half-map FSC (soft spherical mask of ``mask_radius``
    Å, default :func:`default_mask_radius`) and ``half_split.star`` (each particle's half) to ``out_dir``.

    With two or more processes the halves train at the same time, each on half of the processes;
    with one they train in turn. A callable ``initial`` is called on each half's particles (e.g. its
    own backprojection), so the halves stay independent. Returns ``(average map, metrics)`` on the
    main rank (the metrics carry ``fsc_half_0.143_angstrom``), ``(None, {})`` elsewhere. Each half's
    own outputs (Gaussians, figures, metrics, checkpoint) are in its subfolder. ``report`` says how far
    the run is (default: its own, with bars unless ``progress`` is False).
    """
    group = group or Group()
    out = Path(out_dir)
    idx1, idx2, how = half_split(particles, config.seed)
    p = particles.pixel_size
    mine, half_group = split_halves(group)
    report = report or Report(bars=progress, enabled=group.is_main)
    for k, idx in enumerate((idx1, idx2), start=1):
        if mine in (0, k):  # the steps this process will see: both halves in turn, or its own
            report.plan(planned_steps(len(idx), config))
    results = {}
    for k, idx in enumerate((idx1, idx2), start=1):
        if mine not in (0, k):
            continue
        cfg = copy.copy(config)
        cfg.seed = config.seed + k  # independent orders (and initialisations, when random)
        report.enabled = half_group.is_main
        report.line(f"half {k}: {len(idx)} particles ({how}), {cfg.epochs} epochs", eta=True)
        trainer = run_training(particles.subset(idx), cfg, out / f"half{k}", resume=resume, progress=progress,
                               command=command, initial=initial, group=half_group, report=report,
                               label=f"half {k}: ")
        if half_group.is_main:
            vol = trainer.volume()
            trainer.write_outputs(volume=vol, map_figures=False)  # the averaged map gets them
            write_mrc(out / f"half{k}.mrc", vol, p)
            results[k] = (vol, trainer.seconds, len(trainer.model))
    group.barrier()  # both halves written before the main rank reads them
    report.enabled = group.is_main
    if not group.is_main:
        return None, {}
    report.line("averaging the half maps; half-map FSC and figures")
    maps = [results[k][0] if k in results else read_mrc(out / f"half{k}.mrc")[0] for k in (1, 2)]
    halves = [results.get(k) or _half_summary(out / f"half{k}") for k in (1, 2)]
    average = 0.5 * (maps[0] + maps[1])
    write_mrc(out / "map.mrc", average, p)
    plot_slices(out / "slices.png", average, p)
    write_half_split_star(out / HALF_SPLIT_STAR, particles, (idx1, idx2))
    radius = default_mask_radius(particles) if mask_radius is None else mask_radius
    freqs, curve = fsc(maps[0], maps[1], pixel_size=p, mask_radius=radius)
    r143, r5 = resolution_at(freqs, curve, 0.143), resolution_at(freqs, curve, 0.5)
    plot_fsc(out / "fsc.png", {"half 1 vs half 2": (freqs, curve)},
             title=f"half-map FSC of the Gaussian models: {r143:.2f} Å at 0.143", mask=mask_label(radius, p),
             note=f"This curve measures {HALF_MAP_CAVEAT}.")
    metrics = {**particle_metrics(particles), "half_split": how, "half_sizes": [len(idx1), len(idx2)],
               "fsc_half_0.143_angstrom": float(r143), "fsc_half_0.5_angstrom": float(r5),
               "fsc_half_nyquist_limited": r143.nyquist_limited, "fsc_half_meaning": HALF_MAP_CAVEAT,
               "fsc_mask_radius_angstrom": radius, "fsc_mask_edge_angstrom": SOFT_EDGE_VOXELS * p,
               "fsc_half_curve": {"frequency_per_angstrom": freqs.tolist(), "fsc": curve.tolist()},
               "train_seconds": sum(h[1] for h in halves), "n_gaussians": [h[2] for h in halves],
               "processes": group.size}
    return average, metrics


def _half_summary(folder: Path):
    """``(None, seconds, N)`` of a half trained by other processes, from its metrics.json."""
    m = json.loads((folder / "metrics.json").read_text())
    return None, m["train_seconds"], m["n_gaussians"]
