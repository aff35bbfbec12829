"""Data-parallel scaling: training images/s of `cryogs reconstruct` with 1 and K processes (torchrun).

On CPUs the processes use gloo and share the machine's cores; on GPUs each process takes one GPU
and NCCL. The global batch is the same for every K, so each run does the same optimisation.
Writes JSON and a Markdown table.

Examples:
  python benchmarks/bench_scaling.py --processes 1 2                       # CPU, gloo
  python benchmarks/bench_scaling.py --processes 1 2 4 8 --device cuda --out benchmarks/results/scaling_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
MODEL = ROOT.parent / "cryogs" / "data" / "adk_open.pdb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    ap.add_argument("--particles", type=int, default=1024, help="simulated particles (default: 1024)")
    ap.add_argument("--box", type=int, default=64, help="box size (default: 64)")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (default: 32)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (default: 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cryogs_scaling"), help="scratch folder")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "scaling_cpu.json", help="JSON results file")
    args = ap.parse_args()
    data = args.work / "data"
    if not (data / "particles.star").exists():
        subprocess.run([sys.executable, "-m", "cryogs", "simulate", str(MODEL), "--out", str(data), "-n",
                        str(args.particles), "--box", str(args.box), "--apix", "1.5", "--snr", "1",
                        "--defocus", "10000", "25000", "--device", "cpu"], check=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'} (CPU)"
    cores = len(os.sched_getaffinity(0))
    rows = []
    for k in args.processes:
        out = args.work / f"run{k}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = ["-m", "cryogs", "reconstruct", str(data / "particles.star"), "--out", str(out), "--epochs",
               str(args.epochs), "--batch-size", str(args.batch_size), "--no-progress", "--device", args.device]
        if k > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}", *cmd]
        # one thread per process on CPUs: K processes then use K cores, and torch's intra-op threads do not
        # fight the processes (or other jobs) for them
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else None
        subprocess.run([sys.executable, *cmd], check=True, env=env)
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"processes": k, "images_per_second": m["images_per_second"], "n_gaussians": m["n_gaussians"],
                     "box": args.box, "batch_size": args.batch_size, "device": device, "cpu_cores": cores})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["images_per_second"]
    lines = [f"Device: {device}, {cores} CPU cores, 1 thread per process; box {args.box}, global batch {args.batch_size}, "
             f"N = {rows[0]['n_gaussians']}.", "", "| processes | images/s | speed-up |", "|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['images_per_second']:.1f} | {r['images_per_second'] / base:.2f}× |"
              for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
