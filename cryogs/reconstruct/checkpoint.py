"""Checkpoint files: a fitting loop's whole state, written atomically, with the RNG states.

A loop gives :func:`save` its own state (model, optimizer, position, ...) as a dict; the RNG states
of torch, CUDA and numpy are added, so :func:`load` followed by :func:`restore_rng` continues a run
exactly where it stopped, even after a SIGKILL (the previous checkpoint stays whole until the new one
is renamed over it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryogs.io.atomic import atomic_path

#: The checkpoint's name in a run folder.
CHECKPOINT = "checkpoint.pt"


def save(path: Path, state: dict) -> None:
    """Write ``state`` plus the current RNG states to ``path`` atomically."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    with atomic_path(path) as tmp:
        torch.save({**state, "rng": rng}, tmp)


def load(path: Path, device) -> dict:
    """The state saved at ``path``, tensors on ``device`` (RNG states stay on the CPU: see :func:`restore_rng`)."""
    return torch.load(path, map_location=device, weights_only=False)


def restore_rng(state: dict) -> None:
    """Set torch's, numpy's and (when saved and present) CUDA's RNGs to a checkpoint's states."""
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
