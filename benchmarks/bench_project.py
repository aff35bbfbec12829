"""Time Γ (cryogs.project) forward and forward+backward for each backend over a grid of (B, D, N).

Each configuration runs in its own process so that CPU peak memory (max RSS above the baseline
after start-up) is its own; on a GPU, peak memory is ``torch.cuda.max_memory_allocated``.
Timing: warm-up runs, then the median of repeats (CUDA events on a GPU, perf_counter on CPU); the
fastest repeat is kept too (``fwd_min_ms``, ``fwd_bwd_min_ms``), and on CPU the median process CPU
time of a forward+backward (``fwd_bwd_cpu_ms``, all threads together): with one thread it does not
count the time other processes hold the core, the steadiest figure on a shared machine.

Writes JSON (one row per configuration and backend) and a Markdown table.

Examples:
  python benchmarks/bench_project.py --out benchmarks/results/cpu.json
  python benchmarks/bench_project.py --device cuda --grid gpu --out benchmarks/results/h100.json
  python benchmarks/bench_project.py --configs 32x64x2000 --backends cpu,torch
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GRIDS = {
    "cpu": ["32x64x2000", "8x64x500", "32x128x2000"],
    "gpu": ["32x64x2000", "256x64x2000", "256x128x2000", "256x128x20000", "64x256x20000"],
}
SIGMA_PX = 1.5


def _inputs(B, D, N, device, seed=0):
    import torch

    from cryogs.physics.conventions import random_rotations

    g = torch.Generator().manual_seed(seed)
    p = 1.0
    direction = torch.randn(N, 3, generator=g)
    direction /= direction.norm(dim=-1, keepdim=True)
    means = direction * (0.3 * D * p) * torch.rand(N, 1, generator=g) ** (1 / 3)
    quats = torch.randn(N, 4, generator=g)
    scales = SIGMA_PX * p * (0.8 + 0.4 * torch.rand(N, 3, generator=g))
    amps = 0.5 + torch.rand(N, generator=g)
    rot = random_rotations(B, generator=g)
    shifts = torch.randn(B, 2, generator=g)
    return [t.to(device) for t in (means, quats, scales, amps, rot, shifts)], p


def _useful_evaluations(means2d, conics, radii, D, cutoff, chunk=1 << 20) -> int:
    """Pixel centres inside the image and inside each pair's cutoff ellipse (``q ≤ cutoff²``): the
    evaluations that contribute, whatever the backend evaluates besides."""
    import torch

    m2, cn, rr = means2d.reshape(-1, 2), conics.reshape(-1, 3), radii.reshape(-1, 2)
    live = (rr > 0).all(-1)
    m2, cn, rr = m2[live], cn[live], rr[live]
    half = int(torch.ceil(rr.max()).item()) if len(rr) else 0
    offs = torch.arange(-half, half + 1, device=m2.device, dtype=m2.dtype)
    total = 0
    for i in range(0, len(m2), chunk):
        u, c = m2[i:i + chunk], cn[i:i + chunk]
        px = torch.round(u[:, 0, None]) + offs  # [P, W] pixel columns around each centre
        py = torch.round(u[:, 1, None]) + offs
        dx, dy = px - u[:, 0, None], py - u[:, 1, None]
        q = (c[:, 0, None, None] * dx[:, None, :] ** 2 + 2 * c[:, 1, None, None] * dx[:, None, :] * dy[:, :, None]
             + c[:, 2, None, None] * dy[:, :, None] ** 2)
        inside = ((px >= 0) & (px < D))[:, None, :] & ((py >= 0) & (py < D))[:, :, None]
        total += int((inside & (q <= cutoff * cutoff)).sum())
    return total


def _evaluations(backend, params, B, D, N, p):
    """``(performed, useful, instances)``: Gaussian-pixel evaluations the backend performs, those inside
    the image and the cutoff ellipse (the rest is waste), and the instance count (CUDA tiles). The
    ``cpu`` backend evaluates each row of a pair's pixel box in whole vectors of 8 pixels."""
    import torch

    from cryogs.render.gaussian_math import CUTOFF_SIGMA, preprocess

    with torch.no_grad():
        means2d, conics, w, radii = preprocess(*params, box_size=D, pixel_size=p, cutoff=CUTOFF_SIGMA)
    useful = _useful_evaluations(means2d, conics, radii, D, CUTOFF_SIGMA)
    if backend == "dense":
        return B * N * D * D, useful, None
    if backend == "torch":
        half = torch.ceil(radii.amax(-1)).clamp(max=D - 1)
        return int(((2 * half + 1) ** 2)[(radii > 0).all(-1)].sum()), useful, None
    if backend == "cpu":  # each row of the pixel box inside the image, in whole vectors of 8 pixels
        from cryogs.render.binning import pixel_spans, valid_pairs

        lo, hi, nonempty = pixel_spans(means2d, radii, D)
        keep = nonempty & valid_pairs(conics)
        rows = (hi[..., 1] - lo[..., 1] + 1)[keep]
        cols = ((hi[..., 0] - lo[..., 0]) // 8 + 1)[keep] * 8
        return int((rows * cols).sum()), useful, None
    from cryogs.render.binning import TILE_SIZE, tile_counts, valid_pairs

    instances = int(tile_counts(means2d, radii, D, valid=valid_pairs(conics)).sum())
    return instances * TILE_SIZE * TILE_SIZE, useful, instances


def exp_ceiling_per_s():
    """The GPU's ex2 ceiling: SMs (read off the device) × 16 ex2 per clock × the maximum SM clock
    (from nvidia-smi); None when the clock cannot be read."""
    import subprocess

    import torch

    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    try:
        mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                                    "-i", str(torch.cuda.current_device())], capture_output=True, text=True,
                                   timeout=30).stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return sms, None
    return sms, sms * 16 * mhz * 1e6


def run_one(backend, B, D, N, device, repeats, warmup):
    import torch

    import cryogs

    params, p = _inputs(B, D, N, device)
    params = [t.requires_grad_(i < 4) for i, t in enumerate(params)]
    cuda = device.startswith("cuda")

    def fwd():
        with torch.no_grad():
            return cryogs.project(*params, box_size=D, pixel_size=p, backend=backend)

    def fwd_bwd():
        img = cryogs.project(*params, box_size=D, pixel_size=p, backend=backend)
        img.square().sum().backward()

    def timed(fn):
        for _ in range(warmup):
            fn()
        times, cpu_times = [], []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
                cpu_times.append(1e3 * (time.process_time() - c0))
        return statistics.median(times), min(times), (statistics.median(cpu_times) if cpu_times else None)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fwd_ms, fwd_min_ms, _ = timed(fwd)
    fwd_bwd_ms, fwd_bwd_min_ms, fwd_bwd_cpu_ms = timed(fwd_bwd)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        device_name = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    evals, useful, instances = _evaluations(backend, [t.detach() for t in params], B, D, N, p)
    extra = {}
    if cuda:  # the forward's useful evaluations per second against the ex2 ceiling: the waste is not work done
        sms, ceiling = exp_ceiling_per_s()
        extra = {"sm_count": sms, "exp_ceiling_per_s": ceiling,
                 "exp_ceiling_fraction_fwd": None if ceiling is None else useful / (fwd_ms / 1e3) / ceiling}
    return {**extra, "device": device_name, "B": B, "D": D, "N": N, "sigma_px": SIGMA_PX, "backend": backend,
            "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "fwd_bwd_images_per_s": B / (fwd_bwd_ms / 1e3),
            "fwd_min_ms": fwd_min_ms, "fwd_bwd_min_ms": fwd_bwd_min_ms, "fwd_bwd_cpu_ms": fwd_bwd_cpu_ms,
            "peak_mem_bytes": int(peak), "instances": instances, "evaluations": evals, "useful_evaluations": useful,
            "wasted_fraction": 1 - useful / evals if evals else 0.0,
            "evaluations_per_s_fwd": evals / (fwd_ms / 1e3), "useful_evaluations_per_s_fwd": useful / (fwd_ms / 1e3),
            "repeats": repeats}


def markdown(rows) -> str:
    head = ("| device | B | D | N | backend | fwd ms | fwd+bwd ms | fastest fwd+bwd ms | CPU time fwd+bwd ms | "
            "images/s | peak MiB | instances | useful Geval/s (fwd) | wasted evals | % of ex2 ceiling (useful, fwd) | "
            "speedup vs torch (median; fastest) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        inst = "" if r["instances"] is None else f"{r['instances']:,}"
        sp = "" if r.get("speedup_vs_torch") is None else f"{r['speedup_vs_torch']:.3g}×"
        if r.get("speedup_vs_torch_fastest") is not None:
            sp += f"; {r['speedup_vs_torch_fastest']:.3g}×"
        fastest = "" if r.get("fwd_bwd_min_ms") is None else f"{r['fwd_bwd_min_ms']:.1f}"
        cpu_ms = "" if r.get("fwd_bwd_cpu_ms") is None else f"{r['fwd_bwd_cpu_ms']:.1f}"
        frac = r.get("exp_ceiling_fraction_fwd")
        frac = "" if frac is None else f"{100 * frac:.1f}"
        lines.append(f"| {r['device']} | {r['B']} | {r['D']} | {r['N']} | {r['backend']} | {r['fwd_ms']:.1f} | "
                     f"{r['fwd_bwd_ms']:.1f} | {fastest} | {cpu_ms} | {r['fwd_bwd_images_per_s']:.0f} | "
                     f"{r['peak_mem_bytes'] / 2**20:.0f} | "
                     f"{inst} | {r['useful_evaluations_per_s_fwd'] / 1e9:.3f} | {100 * r['wasted_fraction']:.0f} % | "
                     f"{frac} | {sp} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None, help="named grid (default: cpu, or gpu on cuda)")
    ap.add_argument("--configs", default=None, help="comma-separated BxDxN configurations, overriding --grid")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends (default: cpu,torch,dense on CPU; cuda,torch on a GPU)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default: 2)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.json"), help="JSON output path")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one config in this process
    args = ap.parse_args(argv)

    if args.single:
        backend, cfg = args.single.split(":")
        B, D, N = map(int, cfg.split("x"))
        print(json.dumps(run_one(backend, B, D, N, args.device, args.repeats, args.warmup)))
        return
    cuda = args.device.startswith("cuda")
    configs = args.configs.split(",") if args.configs else GRIDS[args.grid or ("gpu" if cuda else "cpu")]
    backends = (args.backends or ("cuda,torch" if cuda else "cpu,torch,dense")).split(",")
    rows = []
    for cfg in configs:
        for backend in backends:
            cmd = [sys.executable, __file__, "--single", f"{backend}:{cfg}", "--device", args.device,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{backend} {cfg}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{backend:6s} {cfg:>14s}: fwd {row['fwd_ms']:9.1f} ms, fwd+bwd {row['fwd_bwd_ms']:9.1f} ms, "
                  f"{row['fwd_bwd_images_per_s']:9.0f} img/s, peak {row['peak_mem_bytes'] / 2**20:7.0f} MiB", flush=True)
    for r in rows:
        ref = [t for t in rows if t["backend"] == "torch" and (t["B"], t["D"], t["N"]) == (r["B"], r["D"], r["N"])]
        r["speedup_vs_torch"] = ref[0]["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref else None
        r["speedup_vs_torch_fastest"] = (ref[0]["fwd_bwd_min_ms"] / r["fwd_bwd_min_ms"]
                                         if ref and "fwd_bwd_min_ms" in ref[0] else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "python": platform.python_version()}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if len(rows) < len(configs) * len(backends):
        sys.exit(1)


if __name__ == "__main__":
    main()
