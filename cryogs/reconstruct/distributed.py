"""Multi-process training on PyTorch's own engine: torchrun starts the processes, torch.distributed
all-reduces. cryogs adds no scheduler and no communication of its own.

Every rank holds the whole model and sees its share of each global batch; after backward the
gradients are summed over the ranks (each rank's loss is its images' sum divided by the global
batch), so every rank takes the same optimizer step as one process would on the whole batch.
"""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cryogs.errors import CryogsError


@dataclass
class Group:
    """The ranks training one model: ``rank`` and ``size`` within the group, ``handle`` for collectives
    (None: the default group, or a single process)."""

    rank: int = 0
    size: int = 1
    handle: object = None

    @property
    def is_main(self) -> bool:
        """This rank writes checkpoints and outputs for the group."""
        return self.rank == 0

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` in place over the group, as one flat buffer (one collective per step)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.handle)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Give every rank the group's first rank's ``tensors``, in place (collective)."""
        if self.size == 1:
            return
        for t in tensors:
            dist.broadcast(t, src=self._first(), group=self.handle)

    def in_sync(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every rank holds bitwise the same ``tensors`` as the group's first rank (collective)."""
        if self.size == 1:
            return True
        mismatch = torch.zeros(1, device=tensors[0].device)
        for t in tensors:
            theirs = t.detach().clone()
            dist.broadcast(theirs, src=self._first(), group=self.handle)
            mismatch += float(not torch.equal(theirs, t.detach()))
        dist.all_reduce(mismatch, group=self.handle)
        return float(mismatch) == 0

    def _first(self) -> int:
        """The global rank of this group's first rank."""
        return dist.get_global_rank(self.handle, 0) if self.handle is not None else 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.handle)


def world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str) -> tuple[Group, torch.device]:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); returns the whole world
    as a :class:`Group` and this rank's device (``cuda:LOCAL_RANK`` when training on GPUs)."""
    rank, size, local = world()
    dev = torch.device(device)
    if size == 1:
        return Group(), dev
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise CryogsError(f"rank {rank} wants GPU {local}, but only {torch.cuda.device_count()} are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        # torch asks for it, and a process leaving with gloo's threads alive can abort at exit
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Group(rank, size, None), dev


def split_halves(group: Group) -> tuple[int, Group]:
    """For gold-standard half maps on ≥ 2 ranks: ranks ``[0, K/2)`` train half 1, the rest half 2.

    Returns ``(half index 1 or 2, this rank's half group)``. Every rank must call it (new_group is
    collective). With one rank both halves run on it in turn (returns half 0 and the group itself).
    """
    if group.size < 2:
        return 0, group
    cut = group.size // 2
    handles = [dist.new_group(list(range(cut))), dist.new_group(list(range(cut, group.size)))]
    half = 1 if group.rank < cut else 2
    first = 0 if half == 1 else cut
    size = cut if half == 1 else group.size - cut
    return half, Group(group.rank - first, size, handles[half - 1])


def launch(n_processes: int, argv: list[str]) -> None:
    """Re-run this command under torchrun with ``n_processes`` processes on this node (replaces the process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}",
           "-m", "cryogs", *argv]
    print("launching: " + " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
