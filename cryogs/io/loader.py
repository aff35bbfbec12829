"""Particle images for training: a seeded, rank-aware, resumable batch order and a streaming loader.

* :class:`EpochSampler` gives each process its share of every global mini-batch. The epoch's order
  is ``np.random.default_rng([seed, epoch]).permutation(n)`` (the trainer's order), cut into global
  batches of ``batch_size`` (the last one may be short). Rank ``r`` of ``world_size`` takes part
  ``r`` of ``np.array_split(global_batch, world_size)``: contiguous, sizes differing by at most one,
  the larger parts on the lower ranks, possibly empty when a batch has fewer particles than
  processes. So K processes together see, step by step, exactly the batches one process sees.
  :meth:`EpochSampler.set_epoch` resumes mid-epoch at a global batch.
* :class:`ParticleImages` is a map-style dataset whose key is a whole batch of particle indices.
* :func:`make_loader` wraps both in a :class:`torch.utils.data.DataLoader` whose worker processes
  read the memory-mapped stacks while the training step runs.
* :func:`preload_images` reads a small set into one tensor (on the training device) instead.

Memory: streaming holds only the batches in flight (``workers × prefetch`` plus the one in use);
the stacks are memory-mapped, so the pages read are page cache the kernel can drop, not process
memory.
"""
from __future__ import annotations

import math
import os
import sys
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .particles import ParticleSet

__all__ = ["EpochSampler", "ImageBatch", "ParticleImages", "make_loader", "default_workers", "preload_images",
           "PRELOAD_BYTES", "PRELOAD_CHUNK"]

#: Particle stacks at most this large (float32 images at the training box) may be kept in memory.
PRELOAD_BYTES = 2 << 30
#: Images read per chunk while preloading: bounds the un-downsampled temporary to one chunk.
PRELOAD_CHUNK = 4096
#: Reader processes beyond this rarely add throughput, and each costs a process and its prefetched batches.
MAX_WORKERS = 8


class EpochSampler(Sampler):
    """This rank's particle indices of each global mini-batch of the current epoch.

    Iterating yields ``int64`` index arrays, one per global batch from ``start_batch`` to the end
    of the epoch (``len(self)`` of them); every rank yields the same number of arrays, some maybe
    empty, so collective operations stay in step. Iteration does not advance the epoch: call
    :meth:`set_epoch` before each epoch (and with ``start_batch`` when resuming from a checkpoint
    that recorded how many batches of the epoch were consumed; with a prefetching loader only the
    consumer knows that count).

    The epochs cover particles ``0..n-1``, or only those of ``population`` when given (a fit that
    holds some particles out); :meth:`set_population` changes it from the next epoch on.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 population: np.ndarray | None = None):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n ≥ 1 and batch_size ≥ 1, got n={n}, batch_size={batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 for world_size {world_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), seed
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start_batch = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), computed once per epoch
        self.population: np.ndarray | None = None
        self.set_population(population)

    def set_population(self, population: np.ndarray | None) -> None:
        """The particles the epochs cover: all ``n`` (None) or these indices."""
        self.population = None if population is None else np.asarray(population, dtype=np.int64)
        if self.population is not None and len(self.population) < 1:
            raise ValueError("the population needs at least one particle")
        self._order = None

    @property
    def size(self) -> int:
        """Particles in an epoch."""
        return self.n if self.population is None else len(self.population)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in a whole epoch."""
        return math.ceil(self.size / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its global batch ``start_batch`` (0-based) on."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's particles in random order, for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._order = (epoch, perm if self.population is None else self.population[perm])
        return self._order[1]

    def global_batch(self, step: int, epoch: int | None = None) -> np.ndarray:
        """Indices of global batch ``step`` (0-based from the start of the epoch), all ranks' shares
        in rank order: what every rank needs to combine per-particle results."""
        if not 0 <= step < self.batches_per_epoch:
            raise IndexError(f"batch {step} is not in 0..{self.batches_per_epoch - 1}")
        return self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

    def local_batch(self, step: int, epoch: int | None = None) -> np.ndarray:
        """This rank's contiguous share of global batch ``step``."""
        return np.array_split(self.global_batch(step, epoch), self.world_size)[self.rank]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch  # a set_epoch while the loader prefetches applies next time
        for step in range(start, self.batches_per_epoch):
            yield self.local_batch(step, epoch)


class ImageBatch(NamedTuple):
    """One batch: ``images`` float32 ``[k, D, D]`` and their particle ``indices`` int64 ``[k]``.

    A named tuple so that the DataLoader's conversion and pinning keep it one (a plain tuple comes
    back as a list).
    """

    images: torch.Tensor
    indices: torch.Tensor


class ParticleImages(Dataset):
    """The images of a :class:`ParticleSet`, fetched a whole batch per key.

    ``dataset[idx]`` with an index array gives an :class:`ImageBatch` in the order of ``idx``.
    :meth:`ParticleSet.images` reads each stack's rows in one sorted pass over its memory map and
    scatters them into place, and applies the set's transforms (inversion, downsampling).

    Worker processes: pickled (spawn/forkserver), the set leaves its memory maps behind
    (:meth:`ParticleSet.__getstate__`) and each worker opens the stacks on first use; forked, a
    worker shares the parent's read-only maps, which stay valid in the child.
    """

    def __init__(self, particles: ParticleSet):
        self.particles = particles

    def __len__(self) -> int:
        return len(self.particles)

    def __getitem__(self, idx) -> ImageBatch:
        if hasattr(idx, "detach"):
            idx = idx.detach().cpu().numpy()
        idx = np.array(idx, dtype=np.int64).reshape(-1)  # a copy: never aliases the sampler's order
        return ImageBatch(torch.from_numpy(self.particles.images(idx)), torch.from_numpy(idx))


def default_workers() -> int:
    """Reader processes for this process: half the CPUs it may run on (the rest for the training
    step and the pinning thread), shared among the node's ranks (``LOCAL_WORLD_SIZE``, set by
    torchrun), at most :data:`MAX_WORKERS`; 0 (read in-process) on a single CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(MAX_WORKERS, cpus // (2 * local_ranks))


def _default_start_method() -> str | None:
    # Fork, explicitly: Python 3.14 makes forkserver the Linux default, which re-imports torch in
    # every worker and needs a __main__ guard in user scripts. Forking is safe even once CUDA is
    # initialised, because the workers never touch CUDA: they read numpy memory maps and return CPU
    # tensors; pinning runs in a thread of the parent and the copy to the GPU in the training loop.
    # (torch marks forked children, so a stray CUDA call in a worker raises instead of hanging.)
    # Elsewhere (macOS, Windows) the platform default, spawn, is the safe choice.
    return "fork" if sys.platform.startswith("linux") else None


def make_loader(particles: ParticleSet, sampler: EpochSampler, *, workers: int | None = None,
                device: str | torch.device = "cpu", pin_memory: bool | None = None, prefetch: int = 2,
                start_method: str | None = None) -> DataLoader:
    """A DataLoader of :class:`ImageBatch` es, one per index array of ``sampler``, in its order.

    ``workers`` reader processes (default :func:`default_workers`; 0 reads in the calling process)
    each keep ``prefetch`` batches ready and persist across epochs (iterate the loader once per
    epoch, after ``sampler.set_epoch``). ``pin_memory`` (default: when ``device`` is CUDA) puts the
    batches in page-locked memory, so ``images.to(device, non_blocking=True)`` overlaps the copy.
    ``start_method`` is the workers' multiprocessing start method (default: fork on Linux, see
    :func:`_default_start_method`; "spawn"/"forkserver" also work).
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be ≥ 0, got {workers}")
    if pin_memory is None:
        pin_memory = torch.device(device).type == "cuda"
    parallel = workers > 0
    return DataLoader(ParticleImages(particles), batch_size=None, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=prefetch if parallel else None,
                      persistent_workers=parallel,
                      multiprocessing_context=(start_method or _default_start_method()) if parallel else None)


def preload_images(particles: ParticleSet, device: str | torch.device = "cpu",
                   budget_bytes: int = PRELOAD_BYTES, *, chunk: int = PRELOAD_CHUNK) -> torch.Tensor | None:
    """All images as one float32 ``[n, D, D]`` tensor on ``device``, or ``None`` when they would
    take more than ``budget_bytes`` (then stream them with :func:`make_loader`).

    Read ``chunk`` images at a time: reading (and Fourier-cropping) all at once would first
    allocate the whole stack at its size on disk.
    """
    n, D = len(particles), particles.box_size
    if n * D * D * 4 > budget_bytes:
        return None
    out = torch.empty(n, D, D, device=device)
    for i in range(0, n, chunk):
        idx = np.arange(i, min(n, i + chunk))
        out[i:i + len(idx)] = torch.from_numpy(particles.images(idx)).to(device)
    return out
