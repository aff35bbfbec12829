"""Figures written by the trainer: the loss curve and a data-versus-model montage."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryogs.io.atomic import atomic_path  # noqa: E402


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss(path, steps_per_epoch: int, losses, noise_floor: float | None = None,
              heldout: list[tuple[int, float]] | None = None) -> None:
    """Per-step training loss on a log axis, with a per-epoch running mean, the held-out particles'
    loss after each epoch (``(epoch, loss)``, which the stopping rule watches) and, when known, the
    noise floor: the loss of a perfect model, below which only overfitting goes.

    The loss is the data term per image in units of the images' variance: Σ pixels (data − model)²
    over D²·var(images) (whitened first with the coloured noise model), so an empty model scores
    about 1 and a perfect one the noise variance over the image variance.
    """
    losses = np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = np.arange(len(losses)) / max(1, steps_per_epoch)
    ax.plot(epochs, losses, lw=0.6, alpha=0.5, label="batch")
    if len(losses) >= steps_per_epoch > 1:
        kernel = np.ones(steps_per_epoch) / steps_per_epoch
        ax.plot(epochs[steps_per_epoch - 1:], np.convolve(losses, kernel, mode="valid"), lw=1.5, label="epoch mean")
    if heldout:
        ax.plot(*zip(*heldout), "o-", ms=3, lw=1, color="tab:red", label="held-out particles")
    if noise_floor is not None and noise_floor > 0:
        ax.axhline(noise_floor, color="black", ls="--", lw=1, label=f"noise floor ({noise_floor:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean (data − model)² per pixel\n/ variance of the images")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_montage(path, data: np.ndarray, model: np.ndarray, titles=None) -> None:
    """Rows of (data, model, residual) for a few particles, each row on the data's grey scale."""
    n = len(data)
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), squeeze=False)
    for i in range(n):
        lo, hi = np.percentile(data[i], [1, 99])
        for j, (img, label) in enumerate([(data[i], "data"), (model[i], "model"), (data[i] - model[i], "residual")]):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label)
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    _save(fig, path)


def _extent(n: int, pixel_size: float):
    lo = (-(n // 2) - 0.5) * pixel_size
    return lo, lo + n * pixel_size


def plot_slices(path, volume: np.ndarray, pixel_size: float) -> None:
    """The three central slices of a ``V[z, y, x]`` map through index D//2, axes in Å."""
    c = [n // 2 for n in volume.shape]
    views = [(volume[c[0]], "z = 0 (x–y)", "x (Å)", "y (Å)"), (volume[:, c[1]], "y = 0 (x–z)", "x (Å)", "z (Å)"),
             (volume[:, :, c[2]], "x = 0 (y–z)", "y (Å)", "z (Å)")]
    lo, hi = float(volume.min()), float(volume.max())
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.8), gridspec_kw={"wspace": 0.4})
    for ax, (img, title, xl, yl) in zip(axes, views):
        (x0, x1), (y0, y1) = _extent(img.shape[1], pixel_size), _extent(img.shape[0], pixel_size)
        im = ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, extent=(x0, x1, y0, y1))
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mass per voxel")
    _save(fig, path)


def plot_gaussians(path, means: np.ndarray, amplitudes: np.ndarray, box_angstrom: float) -> None:
    """The Gaussians' centres seen along z, y and x, coloured by amplitude."""
    order = np.argsort(amplitudes)
    m, a = means[order], amplitudes[order]
    half = box_angstrom / 2
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.8), gridspec_kw={"wspace": 0.4})
    for ax, (i, j) in zip(axes, [(0, 1), (0, 2), (1, 2)]):
        sc = ax.scatter(m[:, i], m[:, j], c=a, s=6, cmap="viridis")
        ax.set_xlim(-half, half)
        ax.set_ylim(-half, half)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{'xyz'[i]} (Å)")
        ax.set_ylabel(f"{'xyz'[j]} (Å)")
    axes[0].set_title(f"{len(a)} Gaussian centres")
    fig.colorbar(sc, ax=axes, shrink=0.8, label="amplitude (integrated mass)")
    _save(fig, path)


def plot_viewing_directions(path, rotations: np.ndarray) -> None:
    """The particles' viewing directions on the sphere (Hammer projection of (rot, tilt − 90°)), with a
    2D histogram, so gaps and preferred views show. ``rotations [n, 3, 3]`` are RELION ``A`` matrices;
    the viewing direction (the projection axis in map coordinates) is their third row."""
    d = np.asarray(rotations)[:, 2, :]
    lon = np.arctan2(d[:, 1], d[:, 0])
    lat = np.arcsin(np.clip(d[:, 2], -1, 1))
    fig = plt.figure(figsize=(7, 4))
    ax = fig.add_subplot(111, projection="hammer")
    h, xe, ye = np.histogram2d(lon, lat, bins=(36, 18), range=[[-np.pi, np.pi], [-np.pi / 2, np.pi / 2]])
    area = np.cos(0.5 * (ye[1:] + ye[:-1]))[None, :]  # particles per solid angle, not per bin
    mesh = ax.pcolormesh(xe, ye, (h / area).T, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, shrink=0.6, label="particles per bin (per unit solid angle)")
    ax.set_title(f"viewing directions of {len(d)} particles (rot, elevation)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_abinitio_progress(path, history: list[dict]) -> None:
    """Resolution and mean log-likelihood (per image) of each ab initio iteration."""
    it = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(it, [h["resolution_angstrom"] for h in history], "o-", color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution searched (Å)", color="tab:blue")
    ax.invert_yaxis()
    ax2 = ax.twinx()
    ax2.plot(it, [h["mean_log_likelihood"] for h in history], "s-", color="tab:red")
    ax2.set_ylabel("mean log-likelihood of the best pose", color="tab:red")
    ax.grid(alpha=0.3)
    ax.set_title("ab initio: frequency marching")
    _save(fig, path)
