"""Streaming particle input: the rank-aware resumable sampler, the batch dataset, the worker loader,
the preloaded variant, and memory that stays bounded while streaming a stack larger than a cap."""
from __future__ import annotations

import os
import pickle

import mrcfile
import numpy as np
import pytest
import torch

from cryogs.io.load import load_particles
from cryogs.io.loader import EpochSampler, ImageBatch, ParticleImages, default_workers, make_loader, preload_images
from cryogs.io.mrc import write_mrc
from cryogs.io.star import write_star


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=rng))


def _global_batches(n, batch_size, seed, epoch):
    """The trainer's batches, written out independently: its permutation cut every batch_size."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@pytest.fixture
def particles(tmp_path, rng):
    """37 random 12×12 particles spread over two stacks, listed in an order unrelated to the stacks."""
    n, D = 37, 12
    np_rng = np.random.default_rng(_seed(rng))
    sizes = (20, 17)
    for name, size in zip("ab", sizes):
        write_mrc(tmp_path / f"{name}.mrcs", np_rng.standard_normal((size, D, D)).astype(np.float32), 2.0)
    names = [f"{i + 1:06d}@a.mrcs" for i in range(sizes[0])] + [f"{i + 1:06d}@b.mrcs" for i in range(sizes[1])]
    names = [names[i] for i in np_rng.permutation(n)]
    write_star(tmp_path / "p.star", None, np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 2)), 2.0, D,
               image_names=names)
    return load_particles(tmp_path / "p.star")


# --- sampler ----------------------------------------------------------------------------------


def test_sampler_is_the_trainer_permutation(rng):
    gen = np.random.default_rng(_seed(rng))
    for _ in range(20):
        n, bs, seed = int(gen.integers(1, 300)), int(gen.integers(1, 40)), int(gen.integers(0, 2**31))
        s = EpochSampler(n, bs, seed=seed)
        for epoch in (0, 1, int(gen.integers(2, 1000))):
            s.set_epoch(epoch)
            expected = _global_batches(n, bs, seed, epoch)
            got = list(s)
            assert len(s) == len(got) == len(expected) == s.batches_per_epoch
            for step, (g, e) in enumerate(zip(got, expected)):
                np.testing.assert_array_equal(g, e)
                np.testing.assert_array_equal(s.global_batch(step), e)
                assert g.dtype == np.int64
            seen = np.concatenate(got)
            np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # every particle exactly once


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_together_see_the_one_rank_batches(rng, world_size):
    gen = np.random.default_rng(_seed(rng))
    # odd sizes, batches smaller than the world (empty shares), and one particle
    for n, bs in [(1, 1), (2, 3), (37, 5), (101, 7), (64, 16), (int(gen.integers(1, 500)), int(gen.integers(1, 50)))]:
        seed, epoch = int(gen.integers(0, 2**31)), int(gen.integers(0, 100))
        one = EpochSampler(n, bs, seed=seed)
        ranks = [EpochSampler(n, bs, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert all(len(p) == len(s) == one.batches_per_epoch for p, s in zip(per_rank, ranks))
        for step, batch in enumerate(one):
            shares = [p[step] for p in per_rank]
            np.testing.assert_array_equal(np.concatenate(shares), batch)  # contiguous, in rank order
            sizes = [len(x) for x in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            for s in ranks:
                np.testing.assert_array_equal(s.global_batch(step), batch)


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_yields_exactly_the_remaining_batches(rng, world_size):
    gen = np.random.default_rng(_seed(rng))
    n, bs, seed, epoch = int(gen.integers(30, 300)), int(gen.integers(2, 20)), int(gen.integers(0, 2**31)), 4
    full = _global_batches(n, bs, seed, epoch)
    for start in sorted({0, 1, len(full) // 2, len(full) - 1, len(full)}):
        ranks = [EpochSampler(n, bs, seed=seed, rank=r, world_size=world_size) for r in range(world_size)]
        for s in ranks:
            s.set_epoch(epoch, start_batch=start)
        resumed = [np.concatenate(shares) for shares in zip(*[list(s) for s in ranks])]
        assert all(len(s) == len(full) - start for s in ranks)
        assert len(resumed) == len(full) - start
        for got, expected in zip(resumed, full[start:]):
            np.testing.assert_array_equal(got, expected)
        done = np.concatenate(full[:start] + resumed) if start or resumed else np.array([], np.int64)
        np.testing.assert_array_equal(np.sort(done), np.arange(n))  # none visited twice, none missed


def test_set_epoch_while_iterating_applies_to_the_next_pass(rng):
    seed = _seed(rng)
    s = EpochSampler(50, 8, seed=seed)
    it = iter(s)
    first = next(it)
    s.set_epoch(1)  # e.g. a prefetching loader already drew this epoch's first batches
    rest = list(it)
    np.testing.assert_array_equal(np.concatenate([first, *rest]), np.random.default_rng([seed, 0]).permutation(50))
    np.testing.assert_array_equal(np.concatenate(list(s)), np.random.default_rng([seed, 1]).permutation(50))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(10, 0, seed=0)
    s = EpochSampler(10, 3, seed=0)
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=5)  # 4 batches: 0..4 are valid starts (4 = the epoch is done)
    with pytest.raises(IndexError):
        s.global_batch(4)


# --- dataset and loader -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_the_images_of_each_batch_in_order(particles, rng, workers):
    seed = _seed(rng)
    sets = {"plain": particles, "inverted, downsampled": particles.transformed(invert=True, downsample=7)}
    for what, ps in sets.items():
        for rank, world_size in [(0, 1), (1, 3)]:  # rank 1 of 3 gets empty shares of the 2-image batch
            sampler = EpochSampler(len(ps), 5, seed=seed, rank=rank, world_size=world_size)
            loader = make_loader(ps, sampler, workers=workers)
            for epoch in (0, 1):  # the same (persistent) workers serve the second epoch
                sampler.set_epoch(epoch)
                batches = list(loader)
                assert len(batches) == len(loader) == sampler.batches_per_epoch
                for step, batch in enumerate(batches):
                    assert isinstance(batch, ImageBatch), what
                    idx = sampler.local_batch(step)
                    assert batch.indices.dtype == torch.int64 and batch.images.dtype == torch.float32
                    np.testing.assert_array_equal(batch.indices.numpy(), idx)
                    assert batch.images.shape == (len(idx), ps.box_size, ps.box_size)
                    np.testing.assert_array_equal(batch.images.numpy(), ps.images(idx), err_msg=what)


def test_loader_resumes_mid_epoch(particles, rng):
    seed = _seed(rng)
    sampler = EpochSampler(len(particles), 4, seed=seed)
    loader = make_loader(particles, sampler, workers=2)
    sampler.set_epoch(3)
    full = [b.indices.numpy() for b in loader]
    for i, _ in enumerate(loader):  # stop early, with batches still prefetched: they must not leak into the next pass
        if i == 2:
            break
    sampler.set_epoch(3, start_batch=4)
    resumed = [b.indices.numpy() for b in loader]
    assert len(resumed) == len(full) - 4
    for got, expected in zip(resumed, full[4:]):
        np.testing.assert_array_equal(got, expected)


def test_dataset_pickles_without_its_memory_maps(particles, rng):
    """Spawned workers receive the dataset pickled: the maps stay behind and reopen on first use."""
    ds = ParticleImages(particles)
    idx = torch.randperm(len(particles), generator=rng)[:9].numpy()
    expected = ds[idx].images.numpy()
    assert particles._cache  # the parent has its stacks mapped now
    blob = pickle.dumps(ds)
    stack_bytes = sum(os.path.getsize(p) for p in particles.stacks)
    assert len(blob) < stack_bytes / 4  # metadata only; a pickled map would copy a whole stack
    copy = pickle.loads(blob)
    assert not copy.particles._cache
    np.testing.assert_array_equal(copy[idx].images.numpy(), expected)
    np.testing.assert_array_equal(ds[torch.as_tensor(idx)].indices.numpy(), idx)  # tensor keys too


def test_loader_options(particles):
    sampler = EpochSampler(len(particles), 3, seed=0)
    assert make_loader(particles, sampler, workers=0, device="cuda").pin_memory  # pinned for a CUDA device
    assert not make_loader(particles, sampler, workers=0, device="cpu").pin_memory
    loader = make_loader(particles, sampler)
    assert loader.num_workers == default_workers()
    assert (loader.multiprocessing_context is None) == (loader.num_workers == 0)
    assert len(loader) == 13  # ceil(37 / 3) global batches


@pytest.mark.cuda
def test_fork_workers_after_cuda_is_initialised(particles, rng):
    """Workers forked from a parent that uses CUDA never touch it; pinned batches reach the GPU."""
    torch.zeros(1, device="cuda")  # initialise CUDA in this (the parent) process
    sampler = EpochSampler(len(particles), 6, seed=_seed(rng))
    loader = make_loader(particles, sampler, workers=2, device="cuda")
    for step, batch in enumerate(loader):
        assert batch.images.is_pinned()
        images = batch.images.to("cuda", non_blocking=True)
        np.testing.assert_array_equal(images.cpu().numpy(), particles.images(sampler.local_batch(step)))


# --- preloading ---------------------------------------------------------------------------------


def test_preload_reads_everything_in_chunks_within_the_budget(particles):
    n, D = len(particles), particles.box_size
    size = n * D * D * 4
    cache = preload_images(particles, "cpu", size, chunk=5)  # 8 chunks, the last one short
    np.testing.assert_array_equal(cache.numpy(), particles.images(np.arange(n)))
    assert preload_images(particles, "cpu", size - 1) is None  # over budget: stream instead


# --- memory while streaming -----------------------------------------------------------------------


def _resident_kib(pid: int) -> int:
    """Anonymous + shared-memory resident pages of a process (KiB), from /proc/<pid>/status.

    File-backed pages of the memory-mapped stacks count in VmRSS (as RssFile) but are page cache
    the kernel drops at will, so they are left out. Anonymous memory (RssAnon) and the shared memory
    in which workers hand batches to the parent (RssShmem) are what holding images in memory would
    occupy. (smaps_rollup's proportional Pss would also count the parent's pages a forked worker
    copies on touching them, but walking it per batch costs more than the epoch itself.)
    """
    kib = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            kib[key] = value
    return int(kib["RssAnon"].split()[0]) + int(kib["RssShmem"].split()[0])


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:  # exited meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the (command)
                kids.append(int(entry))
    return kids


def _tree_growth_kib(pid: int, before: int, earlier: set[int]) -> int:
    """Summed growth over ``pid`` and the child processes it started since ``earlier`` (its children
    then) of :func:`_resident_kib` since ``before``, the parent's value when it forked them: a forked
    worker starts with the parent's anonymous pages mapped (shared copy-on-write), so its own growth is
    counted from there. Children left by earlier tests in the same process are not this loader's."""
    total = 0
    for p in [pid, *(set(_children(pid)) - earlier)]:
        try:
            total += _resident_kib(p) - before
        except (OSError, KeyError):  # exited meanwhile
            pass
    return total


def test_streaming_memory_stays_far_under_a_cap_smaller_than_the_stack(tmp_path, rng):
    try:
        _resident_kib(os.getpid())
    except (OSError, KeyError):
        pytest.skip("needs Linux /proc/<pid>/status (RssAnon, RssShmem) to measure process memory")
    n, D, batch, chunk = 6144, 128, 64, 512
    cap = 256 << 20
    stack_bytes = n * D * D * 4  # 384 MiB of images, 1.5× the cap
    assert stack_bytes > cap
    np_rng = np.random.default_rng(_seed(rng))
    base = np_rng.standard_normal((chunk, D, D), dtype=np.float32)
    sums = np.empty(n)  # float64 sum of each image, to check the loader's content cheaply
    with mrcfile.new_mmap(tmp_path / "big.mrcs", shape=(n, D, D), mrc_mode=2) as mrc:
        for i in range(0, n, chunk):  # through the map a chunk at a time: never the whole stack in memory
            block = base + np_rng.standard_normal((chunk, 1, 1), dtype=np.float32)  # every image distinct
            mrc.data[i:i + chunk] = block
            sums[i:i + chunk] = block.sum((1, 2), dtype=np.float64)
    del base, block
    write_star(tmp_path / "big.star", "big.mrcs", np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 2)), 1.0, D)
    particles = load_particles(tmp_path / "big.star")
    sampler = EpochSampler(n, batch, seed=_seed(rng))
    loader = make_loader(particles, sampler, workers=2, prefetch=2)
    me = os.getpid()
    earlier = set(_children(me))  # e.g. the emulated tests' kernel workers, alive for the session
    before = _resident_kib(me)  # the workers fork when iteration starts
    peak, seen = 0, np.zeros(n, dtype=np.int64)
    for images, indices in loader:
        idx = indices.numpy()
        seen[idx] += 1
        # the same numpy float64 sum over the same contiguous float32 pixels as at writing: bit-identical
        np.testing.assert_array_equal(images.numpy().sum((1, 2), dtype=np.float64), sums[idx])
        del images
        peak = max(peak, _tree_growth_kib(me, before, earlier))
    np.testing.assert_array_equal(seen, 1)
    assert len(set(_children(me)) - earlier) == 2  # the workers were there to be measured
    growth = peak << 10
    # In flight: (2 workers × prefetch 2 + the batch in hand) × 4 MiB of shared memory (a batch the
    # parent has received counts in both processes), and a batch or two of temporaries per worker:
    # some 50 MiB at most, a fifth of the cap. Holding a fifth of the stack in any process exceeds it.
    assert growth < cap / 4, f"memory grew by {growth / 2**20:.0f} MiB streaming {stack_bytes / 2**20:.0f} MiB"
