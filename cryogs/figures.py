"""Figures written by the trainer: the loss curve and a data-versus-model montage."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_path  # noqa: E402


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss(path, steps_per_epoch: int, losses) -> None:
    """Per-step training loss on a log axis, with a per-epoch running mean."""
    losses = np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = np.arange(len(losses)) / max(1, steps_per_epoch)
    ax.plot(epochs, losses, lw=0.6, alpha=0.5, label="batch")
    if len(losses) >= steps_per_epoch > 1:
        kernel = np.ones(steps_per_epoch) / steps_per_epoch
        ax.plot(epochs[steps_per_epoch - 1:], np.convolve(losses, kernel, mode="valid"), lw=1.5, label="epoch mean")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss: Σ pixels (data − model)², per image")
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
