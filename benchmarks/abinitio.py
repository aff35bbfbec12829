"""Ab initio benchmark: poses and map from images alone, against the simulation's truth.

Data: ADK simulated from its atoms (no inverse crime), box 64, 1.5 Å/px, CTF (defocus 1–2.5 µm),
origins within ±3 Å (±2 px), at each particle count × SNR of the grid. For each, ``cryogs abinitio``
runs with its defaults and is scored by:

* the median angular error of its poses, and the fraction within 10°, after the best global rotation
  for the better hand (orthogonal Procrustes, :mod:`cryogs.analysis.pose_error`);
* the FSC at 0.5 (and 0.143) of its map against the ground truth after rigid alignment over both hands
  (:func:`cryogs.analysis.align.align_maps`), soft spherical mask of radius 0.45 of the box;
* its wall time; with ``--two-step`` also the FSC of ``cryogs reconstruct DIR/particles.star
  --refine-poses --half-maps`` (the README's recipe) after alignment, and its time, beside
  ``cryogs reconstruct --half-maps`` on the simulation's true poses (the recipe's target).

Peer method: ASPIRE's common-lines pipeline (``benchmarks/peer_aspire.py``: class averages, common
lines, mean estimator), an optional dependency that lives in its own virtual environment
(``python -m venv /tmp/peer && /tmp/peer/bin/pip install aspire``): ``--aspire-python
/tmp/peer/bin/python`` runs it on the same data in the same invocation, scored the same way, but its
poses are those of its class averages (against the true pose of each average's reference
particle), not of every particle. cryoDRGN's ``abinit_homo`` is not wired in.

Writes ``benchmarks/results/abinitio_<tag>.json`` (rows merged: a rerun replaces the rows it repeats)
and the table ``benchmarks/results/abinitio_<tag>.md``.

Examples:
  python benchmarks/abinitio.py --images 2000 --snr 1 0.1               # the CPU rows
  python benchmarks/abinitio.py --images 2000 5000 --snr inf 1 0.1 0.05 --two-step
  python benchmarks/abinitio.py --images 2000 --snr 1 0.1 --reuse --aspire-python /tmp/peer/bin/python
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryogs.cli import main as cryogs

ROOT = Path(__file__).resolve().parent
MODEL = ROOT.parent / "cryogs" / "data" / "adk_open.pdb"


def simulate(folder: Path, n: int, snr: float, seed: int) -> Path:
    """The simulated data set in ``folder`` (made once, reused by later runs)."""
    if not (folder / "gt_map.mrc").exists():
        args = ["simulate", str(MODEL), "--out", str(folder), "-n", str(n), "--box", "64", "--pixel-size", "1.5",
                "--max-shift", "3", "--defocus", "10000", "25000", "--seed", str(seed), "--overwrite"]
        if math.isfinite(snr):
            args += ["--snr", str(snr)]
        if cryogs(args) != 0:
            raise SystemExit(f"simulation failed: {folder}")
    return folder


def score(run: Path, sim: Path, star_name: str = "particles.star") -> dict:
    from cryogs.analysis.align import align_maps
    from cryogs.analysis.evaluate import compare_maps
    from cryogs.analysis.pose_error import pose_errors
    from cryogs.io.mrc import read_mrc
    from cryogs.io.star import load_star

    out = {}
    if (run / star_name).exists():
        est, tru = load_star(run / star_name), load_star(sim / "particles.star")
        e = pose_errors(est.rotations, tru.rotations)
        out.update(median_pose_error_degrees=e["median_degrees"], within_10_degrees=e["within_10_degrees"],
                   poses_mirrored=e["mirrored"])
    volume, voxel = read_mrc(run / "map.mrc")
    truth, _ = read_mrc(sim / "gt_map.mrc")
    a = align_maps(volume, truth)
    m, _, _ = compare_maps(a["aligned"], truth, voxel[0])
    out.update(fsc_0_5_angstrom=m["fsc_0.5_angstrom"], fsc_0_143_angstrom=m["fsc_0.143_angstrom"],
               map_mirrored=a["mirrored"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[2000])
    ap.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-step", action="store_true", help="also run the README's two-step recipe")
    ap.add_argument("--two-step-epochs", type=int, default=None,
                    help="--epochs for the recipe's reconstruct (default: its own, about 20 per half on 2k images)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep an ab initio run that finished in an earlier invocation (e.g. to add --two-step)")
    ap.add_argument("--aspire-python", type=Path, default=None,
                    help="interpreter of a virtual environment with ASPIRE installed: also run the peer")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cryogs_abinitio_bench"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results_file = ROOT / "results" / f"abinitio_{args.tag}.json"
    rows = [{**r, "snr": float(r["snr"])} for r in json.loads(results_file.read_text())["rows"]] \
        if results_file.exists() else []
    peers = {"ASPIRE": args.aspire_python is not None or any(r["method"].startswith("ASPIRE") for r in rows),
             "cryoDRGN abinit_homo": False}
    for n in args.images:
        for snr in args.snr:
            sim = simulate(args.work / f"sim_{n}_{snr:g}", n, snr, seed=1000 + args.seed)
            run = args.work / f"ab_{n}_{snr:g}_s{args.seed}"
            previous = [r for r in rows if r["images"] == n and r["snr"] == snr and r["seed"] == args.seed
                        and r["method"] == "cryogs abinitio" and r["exit"] == 0]
            if args.reuse and previous and (run / "particles.star").exists():
                rc, wall = 0, previous[0]["wall_seconds"]
            else:
                shutil.rmtree(run, ignore_errors=True)
                t0 = time.perf_counter()
                rc = cryogs(["abinitio", str(sim / "particles.star"), "--out", str(run), "--seed", str(args.seed),
                             "--device", args.device, "--no-progress"])
                wall = time.perf_counter() - t0
                row = {"images": n, "snr": snr, "seed": args.seed, "method": "cryogs abinitio", "exit": rc,
                       "wall_seconds": wall, "threads": torch.get_num_threads(), "host": platform.node()}
                if rc == 0:
                    row.update(score(run, sim))
                    row["search_seconds"] = json.loads((run / "metrics.json").read_text())["search_seconds"]
                print(row, flush=True)
                rows = [r for r in rows if not (r["images"] == n and r["snr"] == snr and r["seed"] == args.seed
                                                and r["method"] == row["method"])] + [row]
            if args.two_step and rc == 0:
                two = args.work / f"two_{n}_{snr:g}_s{args.seed}"
                shutil.rmtree(two, ignore_errors=True)
                t0 = time.perf_counter()
                extra = [] if args.two_step_epochs is None else ["--epochs", str(args.two_step_epochs)]
                rc2 = cryogs(["reconstruct", str(run / "particles.star"), "--out", str(two), "--refine-poses",
                              "--half-maps", "--device", args.device, "--no-progress", *extra])
                method = "two-step recipe" + ("" if args.two_step_epochs is None else
                                              f" (reconstruct --epochs {args.two_step_epochs})")
                row2 = {"images": n, "snr": snr, "seed": args.seed, "method": method, "exit": rc2,
                        "wall_seconds": wall + time.perf_counter() - t0, "threads": torch.get_num_threads()}
                if rc2 == 0:
                    row2.update(score(two, sim, star_name="none"))
                print(row2, flush=True)
                rows = [r for r in rows if not (r["images"] == n and r["snr"] == snr and r["seed"] == args.seed
                                                and r["method"] == row2["method"])] + [row2]
                # the target of the recipe: the same command with the true poses, on the same data
                known = args.work / f"known_{n}_{snr:g}_s{args.seed}"
                shutil.rmtree(known, ignore_errors=True)
                t0 = time.perf_counter()
                rc3 = cryogs(["reconstruct", str(sim / "particles.star"), "--out", str(known), "--half-maps",
                              "--device", args.device, "--no-progress"])
                row3 = {"images": n, "snr": snr, "seed": args.seed, "method": "known poses (reconstruct --half-maps)",
                        "exit": rc3,
                        "wall_seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
                if rc3 == 0:
                    row3.update(score(known, sim, star_name="none"))
                print(row3, flush=True)
                rows = [r for r in rows if not (r["images"] == n and r["snr"] == snr and r["seed"] == args.seed
                                                and r["method"] == row3["method"])] + [row3]
                save(results_file, rows, peers)
            if args.aspire_python is not None:
                row4 = run_aspire(args.aspire_python, sim, args.work / f"aspire_{n}_{snr:g}_s{args.seed}", args.seed)
                row4.update(images=n, snr=snr, seed=args.seed)
                print(row4, flush=True)
                rows = [r for r in rows if not (r["images"] == n and r["snr"] == snr and r["seed"] == args.seed
                                                and r["method"] == row4["method"])] + [row4]
            save(results_file, rows, peers)
    write_table(rows, peers, results_file.with_suffix(".md"))


def run_aspire(python: Path, sim: Path, out: Path, seed: int) -> dict:
    """ASPIRE's pipeline (``peer_aspire.py`` under its own interpreter) on ``sim``, scored like cryogs."""
    sys.path.insert(0, str(ROOT))
    from peer_aspire import score_aspire

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(ROOT / "peer_aspire.py"), "--star", str(sim / "particles.star"),
                           "--out", str(out), "--seed", str(seed)], env=os.environ, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"method": "ASPIRE common lines (class averages)", "exit": proc.returncode, "wall_seconds": wall,
           "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None}
    if proc.returncode == 0:
        scored = score_aspire(out, sim)
        row.update({k: v for k, v in scored.items() if k != "wall_seconds"}, pipeline_seconds=scored["wall_seconds"])
    else:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
    return row


def save(path: Path, rows, peers) -> None:
    """The rows as valid JSON: an infinite SNR (no noise) is written as the string "inf"."""
    out = [{**r, "snr": r["snr"] if math.isfinite(r["snr"]) else "inf"} for r in rows]
    path.write_text(json.dumps({"rows": out, "peers_installed": peers}, indent=2) + "\n")


def write_table(rows, peers, path: Path) -> None:
    lines = [("| images | SNR | method | median pose error (°) | within 10° | FSC 0.5 after alignment (Å) | "
              "wall time | seed |"), "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["images"], -r["snr"], r["method"])):
        med = r.get("median_pose_error_degrees")
        within = r.get("within_10_degrees")
        fsc = r.get("fsc_0_5_angstrom")
        lines.append(f"| {r['images']} | {r['snr']:g} | {r['method']} | "
                     f"{'' if med is None else f'{med:.2f}'} | {'' if within is None else f'{100 * within:.1f} %'} | "
                     f"{'' if fsc is None else f'{fsc:.2f}'} | {r['wall_seconds'] / 60:.1f} min | {r['seed']} |")
    lines.append("")
    lines.append("Peer methods: " + ", ".join(f"{k} {'installed' if v else 'not installed'}" for k, v in peers.items()))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
