"""Does streaming particles from disk keep up with training? Images/s of each, per box size.

* Loading: a stack of ``--stack-mib`` MiB is written per box size, then read for one epoch of
  batches through :func:`cryogs.io.loader.make_loader`, for each ``--workers`` count:
  cold-ish (a fresh loader after the stack is flushed and dropped from the page cache with
  ``posix_fadvise(DONTNEED)``; a virtual machine's host may still cache it, hence "-ish"), then
  warm (the same loader's second epoch, file in the page cache). On CUDA the batches are pinned
  and copied to the device (``non_blocking``), so the rate is images delivered to the GPU.
  For reference, the preloaded path (:func:`cryogs.io.loader.preload_images`, then indexing).
* Step: one training step (Γ by ``cryogs.project`` + CTF, squared-error loss, backward, Adam) on a
  model of the trainer's default size for a particle of radius 0.3·D pixels; backend torch
  (CPU), or cuda and torch (GPU). Timed alone, then fed by the loader (warm cache): the rate
  training actually gets when reading and stepping share the machine.

Writes JSON (with the device name and CPU count) and a Markdown table next to it.

Examples:
  python benchmarks/bench_loading.py --threads 1 --out benchmarks/results/loading_cpu.json
  python benchmarks/bench_loading.py --device cuda --workers 0,2,4,8 --stack-mib 2048 --out benchmarks/results/loading_h100.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryogs import project
from cryogs.io.load import load_particles
from cryogs.io.loader import EpochSampler, make_loader, preload_images
from cryogs.io.star import write_star
from cryogs.model.gaussians import GaussianModel
from cryogs.physics.conventions import random_rotations
from cryogs.physics.ctf import apply_ctf, particle_ctf
from cryogs.render.project import resolve_backend
from cryogs.simulate import random_ctf_params

PIXEL_SIZE = 1.5  # Å; only the CTF depends on it


def default_gaussians(D: int, radius_px: float) -> int:
    """The trainer's default Gaussian count (cryogs.reconstruct.fit.default_config) for a particle of this radius:
    half the sphere's volume in (2 px)³ cells, clipped to 50..20000."""
    return int(np.clip(round(0.5 * 4 / 3 * math.pi * radius_px ** 3 / 8), 50, 20000))


def write_stack(folder: Path, D: int, n: int, seed: int = 0):
    """``n`` noise images (a chunk at a time through a map) with random poses and CTFs, as a RELION set."""
    chunk = 1024
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((chunk, D, D), dtype=np.float32)
    stack = folder / f"box{D}.mrcs"
    with mrcfile.new_mmap(stack, shape=(n, D, D), mrc_mode=2, overwrite=True) as mrc:
        for i in range(0, n, chunk):
            k = min(chunk, n - i)
            mrc.data[i:i + k] = base[:k] + rng.standard_normal((k, 1, 1), dtype=np.float32)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    star = folder / f"box{D}.star"
    write_star(star, stack.name, rot, np.zeros((n, 2)), PIXEL_SIZE, D,
               ctf=random_ctf_params(n, (8000, 25000), seed=seed))
    return load_particles(star), stack


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_rate(loader, sampler, epoch, device) -> float:
    """Images/s of one epoch through ``loader`` (delivered to ``device``)."""
    sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    count = 0
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        count += len(images)
    synchronize(device)
    return count / (time.perf_counter() - t0)


def bench_loading(particles, stack, workers_list, batch_size, device):
    rows = []
    for workers in workers_list:
        particles.close()  # no process may keep the file's pages mapped, or they cannot be dropped
        drop_from_page_cache(stack)
        sampler = EpochSampler(len(particles), batch_size, seed=0)
        loader = make_loader(particles, sampler, workers=workers, device=device)
        cold = epoch_rate(loader, sampler, 0, device)
        warm = epoch_rate(loader, sampler, 1, device)
        del loader
        rows.append({"workers": workers, "cold_images_per_s": cold, "warm_images_per_s": warm})
        print(f"  loader, {workers} workers: cold-ish {cold:8.0f} images/s, warm {warm:8.0f} images/s", flush=True)
    return rows


def bench_preloaded(particles, batch_size, device) -> float | None:
    cache = preload_images(particles, device)
    if cache is None:
        return None
    sampler = EpochSampler(len(particles), batch_size, seed=0)
    synchronize(device)
    t0 = time.perf_counter()
    for idx in sampler:  # index_select: CPU advanced indexing runs a parallel region that stalls on a busy machine
        cache.index_select(0, torch.as_tensor(idx, device=device))
    synchronize(device)
    return len(particles) / (time.perf_counter() - t0)


class Step:
    """One training step on a batch, as the trainer takes it."""

    def __init__(self, particles, backend, device):
        D = particles.box_size
        radius = 0.3 * D * PIXEL_SIZE
        self.n_gaussians = default_gaussians(D, 0.3 * D)
        self.model = GaussianModel.random(self.n_gaussians, 0.8 * radius, 1.5 * PIXEL_SIZE, 1e3).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.particles, self.backend, self.device = particles, backend, device
        self.rotations = torch.as_tensor(particles.rotations, dtype=torch.float32, device=device)
        self.shifts = torch.as_tensor(particles.shifts, dtype=torch.float32, device=device)

    def __call__(self, images, idx) -> None:
        t = torch.as_tensor(idx, device=self.device)
        pred = project(*self.model(), self.rotations[t], self.shifts[t], box_size=self.particles.box_size,
                       pixel_size=self.particles.pixel_size, backend=self.backend)
        pred = apply_ctf(pred, particle_ctf(self.particles, np.asarray(idx), device=self.device))
        loss = ((pred - images) ** 2).sum((1, 2)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def bench_step(particles, backend, batch_size, steps, device, fed_workers):
    """Images/s of the step on batches already in memory, and fed by the loader (warm cache)."""
    step = Step(particles, backend, device)
    sampler = EpochSampler(len(particles), batch_size, seed=1)
    batches = [sampler.global_batch(i) for i in range(steps + 1)]
    images = [torch.from_numpy(particles.images(b)).to(device) for b in batches]
    step(images[0], batches[0])  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for im, b in zip(images[1:], batches[1:]):
        step(im, b)
    synchronize(device)
    alone = steps * batch_size / (time.perf_counter() - t0)

    sampler.set_epoch(0, start_batch=0)
    loader = make_loader(particles, sampler, workers=fed_workers, device=device)
    count, t0 = 0, None
    for i, (im, idx) in enumerate(loader):
        if i == 1:  # time from the second batch: the workers have started, as in a long run
            synchronize(device)
            t0 = time.perf_counter()
        step(im.to(device, non_blocking=True), idx)
        count += len(idx) if i >= 1 else 0
        if i == steps:
            break
    synchronize(device)
    fed = count / (time.perf_counter() - t0)
    del loader
    row = {"backend": backend, "n_gaussians": step.n_gaussians, "steps": steps,
           "step_images_per_s": alone, "fed_workers": fed_workers, "fed_images_per_s": fed}
    print(f"  step {backend}, N={step.n_gaussians}: {alone:8.1f} images/s alone, "
          f"{fed:8.1f} fed by {fed_workers} loader workers", flush=True)
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result) -> str:
    load = result["load_average_1min"]
    lines = [f"Device: {result['device']}; {result['cpus']} CPUs available (load average {load[0]:.1f} at the "
             f"start, {load[1]:.1f} at the end); batch {result['batch_size']}; stacks of {result['stack_mib']} MiB.", "",
             "| D | loader workers | cold-ish images/s | warm images/s |", "|---|---|---|---|"]
    for box in result["boxes"]:
        for r in box["loading"]:
            lines.append(f"| {box['D']} | {r['workers']} | {r['cold_images_per_s']:.0f} | {r['warm_images_per_s']:.0f} |")
        if box["preloaded_images_per_s"] is not None:
            lines.append(f"| {box['D']} | preloaded | | {box['preloaded_images_per_s']:.0f} |")
    lines += ["", "| D | backend | N | step images/s (alone) | fed by loader: workers | images/s | "
              "cold-ish loading (best) ÷ step | loading outpaces the step |", "|---|---|---|---|---|---|---|---|"]
    for box in result["boxes"]:
        for s in box["step"]:
            lines.append(f"| {box['D']} | {s['backend']} | {s['n_gaussians']} | {s['step_images_per_s']:.1f} | "
                         f"{s['fed_workers']} | {s['fed_images_per_s']:.1f} | {s['loading_over_step']:.3g}× | "
                         f"{'yes' if s['loading_outpaces_step'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--boxes", default="64,128", help="comma-separated box sizes (default: 64,128)")
    ap.add_argument("--workers", default="0,2", help="comma-separated loader worker counts (default: 0,2)")
    ap.add_argument("--stack-mib", type=int, default=256, help="stack size per box in MiB (default: 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32, the trainer's)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default: 4 on CPU, 50 on a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of the step (default: torch's); 1 avoids stalls on an oversubscribed machine")
    ap.add_argument("--tmpdir", type=Path, default=None, help="where to write the stacks (default: the system's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/loading.json"), help="JSON output path")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workers_list = [int(w) for w in args.workers.split(",")]
    backends = ["cuda", "torch"] if resolve_backend("auto", device) == "cuda" else ["torch"]
    steps = args.steps or (50 if device.type == "cuda" else 4)
    fed_workers = max(workers_list)
    load_before = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="cryogs_bench_loading_", dir=args.tmpdir))
    boxes = []
    try:
        for D in map(int, args.boxes.split(",")):
            n = (args.stack_mib << 20) // (4 * D * D)
            print(f"box {D}: {n} images ({args.stack_mib} MiB)", flush=True)
            particles, stack = write_stack(folder, D, n)
            loading = bench_loading(particles, stack, workers_list, args.batch_size, device)
            preloaded = bench_preloaded(particles, args.batch_size, device)
            # cold-ish: a stack larger than the RAM is read from disk every epoch
            best_cold = max(r["cold_images_per_s"] for r in loading)
            step_rows = []
            for backend in backends:
                row = bench_step(particles, backend, args.batch_size, steps, device, fed_workers)
                row["loading_over_step"] = best_cold / row["step_images_per_s"]
                row["loading_outpaces_step"] = best_cold > row["step_images_per_s"]
                step_rows.append(row)
            boxes.append({"D": D, "n_images": n, "loading": loading, "preloaded_images_per_s": preloaded,
                          "step": step_rows})
            particles.close()
            stack.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"device": device_name(device), "cpus": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "load_average_1min": [load_before, os.getloadavg()[0]], "batch_size": args.batch_size, "stack_mib": args.stack_mib,
              "boxes": boxes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
