"""Fourier shell correlation between two maps, the resolution where it crosses a threshold, and plots.

Shell ``i`` holds the Fourier voxels whose radius ``|k|·D`` rounds to ``i`` (``i = 0 … D//2``),
at spatial frequency ``i / (D · pixel_size)`` Å⁻¹. The FSC of a shell is
``Re Σ F₁ F₂* / sqrt(Σ|F₁|² Σ|F₂|²)`` over the whole shell; it is computed from ``rfftn`` with the
half-space weights that make it equal to the full-space sum.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from cryogs.errors import CryogsError
from cryogs.io.atomic import atomic_path

__all__ = ["fsc", "soft_spherical_mask", "resolution_at", "Resolution", "plot_fsc", "shell_index",
           "check_mask_radius", "mask_label", "SOFT_EDGE_VOXELS"]

#: Width of the mask's cosine edge, in voxels, unless given.
SOFT_EDGE_VOXELS = 6.0


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def soft_spherical_mask(box: int, radius_px: float, edge_px: float = 0.0, *, ndim: int = 3) -> np.ndarray:
    """Float32 ``[box]*ndim`` sphere centred at index ``box // 2``: 1 within ``radius_px``, falling
    to 0 over a raised-cosine edge of width ``edge_px`` (a hard edge when ``edge_px`` is 0)."""
    c = box // 2
    ax = np.arange(box, dtype=np.float64) - c
    grids = np.meshgrid(*([ax] * ndim), indexing="ij")
    r = np.sqrt(sum(g * g for g in grids))
    if edge_px <= 0:
        return (r <= radius_px).astype(np.float32)
    t = np.clip((r - radius_px) / edge_px, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def shell_index(shape: Sequence[int]) -> np.ndarray:
    """Integer shell of every ``rfftn`` coefficient of a cubic map of ``shape`` (rounded ``|k|·D``)."""
    D = shape[0]
    k = np.fft.fftfreq(D) * D
    kx = np.fft.rfftfreq(D) * D
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return np.rint(r).astype(np.int64)


def _half_weights(D: int) -> np.ndarray:
    """Weights of the ``rfftn`` last axis so half-space sums equal full-space sums."""
    w = np.full(D // 2 + 1, 2.0)
    w[0] = 1.0
    if D % 2 == 0:
        w[-1] = 1.0
    return w


def check_mask_radius(radius: float, pixel_size: float) -> None:
    """A mask of radius below one voxel keeps (almost) nothing, and the FSC of nothing reads Nyquist:
    refuse it, as a negative one."""
    if not (math.isfinite(radius) and radius >= pixel_size):
        raise CryogsError(f"the FSC mask radius must be at least one voxel ({pixel_size:.4g} Å), got {radius:g} Å; "
                          "it is a radius in Å")


def mask_label(radius: float | None, pixel_size: float, soft_edge: float | None = None) -> str:
    """How :func:`fsc` masks, in words, for figures: radius and width of the soft edge in Å."""
    if radius is None:
        return "no mask"
    edge = SOFT_EDGE_VOXELS * pixel_size if soft_edge is None else soft_edge
    return f"mask: soft sphere of radius {radius:.1f} Å, cosine edge {edge:.1f} Å"


def fsc(
    map1,
    map2,
    *,
    pixel_size: float,
    mask_radius: float | None = None,
    soft_edge: float | None = None,
    return_counts: bool = False,
):
    """FSC of two cubic maps ``[D, D, D]`` (numpy or torch).

    ``pixel_size`` in Å. With ``mask_radius`` (Å, at least one voxel) both maps are multiplied by a
    soft spherical mask of that radius with a cosine edge of ``soft_edge`` Å (default 6 voxels) first.

    Returns ``(freqs, curve)``: ``D//2 + 1`` shell frequencies in Å⁻¹ (0 … Nyquist) and the FSC per
    shell (float64; a shell where either map has no power gets 0). With ``return_counts=True`` a
    third array gives the number of Fourier voxels per shell (full space), e.g. for the
    ``3/sqrt(n)`` noise level.
    """
    a = _as_numpy(map1).astype(np.float64, copy=False)
    b = _as_numpy(map2).astype(np.float64, copy=False)
    if a.shape != b.shape:
        raise CryogsError(f"FSC needs two maps of the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise CryogsError(f"FSC needs cubic 3D maps, got shape {a.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise CryogsError("FSC: a map contains NaN or Inf")
    if not pixel_size or pixel_size <= 0:
        raise CryogsError(f"FSC: pixel size must be positive, got {pixel_size}")
    D = a.shape[0]
    if mask_radius is not None:
        check_mask_radius(mask_radius, pixel_size)
        edge = SOFT_EDGE_VOXELS * pixel_size if soft_edge is None else float(soft_edge)
        mask = soft_spherical_mask(D, mask_radius / pixel_size, edge / pixel_size).astype(np.float64)
        a, b = a * mask, b * mask

    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    shells = shell_index(a.shape)
    w = np.broadcast_to(_half_weights(D), shells.shape)
    n_shells = D // 2 + 1
    keep = shells < n_shells
    idx, wk = shells[keep], w[keep]
    cross = np.bincount(idx, weights=wk * (fa[keep] * np.conj(fb[keep])).real, minlength=n_shells)
    pa = np.bincount(idx, weights=wk * np.abs(fa[keep]) ** 2, minlength=n_shells)
    pb = np.bincount(idx, weights=wk * np.abs(fb[keep]) ** 2, minlength=n_shells)
    counts = np.bincount(idx, weights=wk, minlength=n_shells)
    denom = np.sqrt(pa * pb)
    curve = np.divide(cross, denom, out=np.zeros(n_shells), where=denom > 0)
    freqs = np.arange(n_shells) / (D * pixel_size)
    if return_counts:
        return freqs, curve, counts.astype(np.int64)
    return freqs, curve


class Resolution(float):
    """A resolution in Å (a plain ``float``) that also says whether it is only Nyquist-limited.

    ``nyquist_limited`` is ``True`` when the curve never fell below the threshold, so the value is
    the resolution of the last shell (``2·pixel_size`` for an even box): the true resolution may
    be better than the box and pixel size allow one to measure.
    """

    nyquist_limited: bool

    def __new__(cls, value: float, nyquist_limited: bool = False):
        obj = super().__new__(cls, value)
        obj.nyquist_limited = bool(nyquist_limited)
        return obj

    def __repr__(self) -> str:
        return f"Resolution({float(self)!r}, nyquist_limited={self.nyquist_limited})"


def resolution_at(freqs, curve, threshold: float = 0.143) -> Resolution:
    """Resolution (Å) where ``curve`` first falls below ``threshold``.

    The crossing is linearly interpolated between the last shell at or above the threshold and the
    first shell below it (shell 0, the mean, counts as a starting point). If the curve never falls
    below, the result is the last shell's resolution ``1/freqs[-1]`` (Nyquist, ``2·pixel_size``)
    with ``.nyquist_limited = True``. If it is below from shell 1 on while the mean (shell 0) is
    above, the crossing is interpolated from frequency 0, and a crossing at frequency 0 gives ``inf``.
    """
    f = np.asarray(freqs, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    if f.shape != c.shape or f.ndim != 1 or len(f) < 2:
        raise CryogsError("resolution_at needs matching 1D frequency and FSC arrays with at least 2 shells")
    below = np.flatnonzero(c[1:] < threshold)
    if below.size == 0:
        return Resolution(1.0 / f[-1], nyquist_limited=True)
    i = int(below[0]) + 1
    if c[i - 1] < threshold:  # only possible for i == 1: shell 0 already below
        fx = f[i - 1]
    else:
        fx = f[i - 1] + (c[i - 1] - threshold) * (f[i] - f[i - 1]) / (c[i - 1] - c[i])
    return Resolution(math.inf if fx <= 0 else 1.0 / fx)


def plot_fsc(
    path: str | os.PathLike,
    curves: Mapping[str, tuple],
    thresholds: Sequence[float] = (0.5, 0.143),
    *,
    mask: str,
    title: str | None = None,
    note: str | None = None,
) -> None:
    """Plot FSC curves ``{label: (freqs [1/Å], curve)}`` to an image file (format from the suffix),
    with dashed threshold lines, the x axis in Å⁻¹ and a top axis in Å. ``mask`` (:func:`mask_label`)
    is printed under the axes, so no curve is shown without its mask, and ``note`` (what the curve
    means) under it. Written atomically; needs no display (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fmax = 0.0
    for label, (fr, cu) in curves.items():
        fr, cu = _as_numpy(fr), _as_numpy(cu)
        ax.plot(fr, cu, label=str(label), lw=1.5)
        if len(fr):
            fmax = max(fmax, float(np.max(fr)))
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.text(0.995, t, f" {t:g}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=8, color="grey")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlim(0.0, fmax if fmax > 0 else 1.0)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(loc="lower left", fontsize=8)

    # Top axis: the same frequency axis, ticked and labelled with the resolution 1/f in Å.
    top = ax.secondary_xaxis("top")
    top.set_xlabel("resolution (Å)")
    if fmax > 0:
        ticks = np.linspace(0, fmax, 6)[1:]
        top.set_xticks(ticks)
        top.set_xticklabels([f"{1.0 / f:.3g}" for f in ticks])
    ax.grid(alpha=0.3)
    footer = "\n".join(t for t in (mask, note) if t)
    ax.annotate(footer, xy=(0, 0), xycoords="axes fraction", xytext=(0, -34), textcoords="offset points",
                ha="left", va="top", fontsize=7.5, wrap=True)  # below the x label
    fig.tight_layout()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".").lower() or "png", bbox_inches="tight")
