"""Reconstruction quality: cryogs against the voxel baseline (`cryogs backproject`) on identical data.

Data are simulated from an atomic model (every atom a Gaussian, so no inverse crime) with a CTF
(defocus 1–2.5 µm) at each SNR and particle count of the grid. Both methods get the same
particles; each reports the FSC against the ground-truth map at 0.5 and the gold-standard
half-map FSC at 0.143 (soft spherical mask), in Å, with its wall time and device.

Variants (``--variants``) rerun cryogs with one setting changed, to measure what each prior, the
noise model, density control and the initialisation do. The default starts each half model on
the backprojection of its own particles (its time is included); ``init-random`` starts from
random Gaussians. Each row records its start (``init``).

Examples:
  python benchmarks/quality.py --grid cpu                  # 2k images, box 64, SNR ∞ / 1 / 0.1
  python benchmarks/quality.py --grid full --device cuda   # 2k / 10k / 50k images
  python benchmarks/quality.py --grid cpu --variants densify repulsion tv coloured --snr 0.1 --no-default
  python benchmarks/quality.py --images 50000 --methods backproject

Rows are merged into the results file: a rerun replaces the rows it repeats and keeps the others.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch

from cryogs.cli import main as cryogs

ROOT = Path(__file__).resolve().parent
MODEL = ROOT.parent / "cryogs" / "data" / "adk_open.pdb"  # embedded copy of ../shared/data/pdb/adk_open.pdb
GRIDS = {"cpu": [2000], "full": [2000, 10000, 50000]}
VARIANTS = {
    "default": [],
    "densify": ["--densify"],
    "coarse": ["--coarse", "0.3"],
    "more-gaussians": ["--gaussians", "3500"],  # ≈ one per atom of the ADK model (3,317 with hydrogens)
    "epochs-10": ["--epochs", "10"],  # the earlier default at 2k images: 10k image visits per half model
    "more-gaussians-epochs-10": ["--gaussians", "3500", "--epochs", "10"],
    "repulsion": ["--reg-repulsion", "1.0"],
    "scale-prior": ["--reg-scale", "1.0"],
    "tv": ["--reg-tv", "1.0"],
    "smooth": ["--reg-smooth", "1.0"],
    "coloured": ["--noise", "coloured", "--contrast"],
    "fixed-budget": ["--no-early-stop"],  # every planned epoch: what the stopping rule gave up, if anything
    "init-random": ["--init", "random"],  # the default start until the backprojection start beat it
}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'cpu'} (CPU)"


def _run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    if cryogs(argv) != 0:
        raise SystemExit(f"failed: cryogs {' '.join(argv)}")
    return time.perf_counter() - t0


def simulate(work: Path, n: int, snr: float, box: int, apix: float, seed: int) -> Path:
    folder = work / f"sim_n{n}_snr{snr:g}"
    if not (folder / "particles.star").exists():
        _run(["simulate", str(MODEL), "--out", str(folder), "-n", str(n), "--box", str(box), "--apix", str(apix),
              "--snr", str(snr), "--defocus", "10000", "25000", "--max-shift", "3", "--seed", str(seed),
              "--device", "cpu"])
    return folder


def run_dir(work: Path, n: int, snr: float, method: str, variant: str) -> Path:
    return work / f"run_n{n}_snr{snr:g}_{method}_{variant}"


def run_one(method: str, variant: str, data: Path, out: Path, device: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    common = [str(data / "particles.star"), "--out", str(out), "--reference", str(data / "gt_map.mrc"),
              "--device", device, "--no-progress"]
    if method == "backproject":
        wall = _run(["backproject", *common])
    else:
        wall = _run(["reconstruct", *common, "--half-maps", *VARIANTS.get(variant, [])])
    m = json.loads((out / "metrics.json").read_text())
    return {"method": method, "variant": variant, "fsc_ref_0.5_angstrom": m["fsc_0.5_angstrom"],
            "fsc_half_0.143_angstrom": m["fsc_half_0.143_angstrom"],
            "half_nyquist_limited": m.get("fsc_half_nyquist_limited"), "wall_seconds": wall,
            "n_gaussians": m.get("n_gaussians"), **_training(out, method)}


def _training(out: Path, method: str) -> dict:
    """Epochs each half model ran (of those planned), why it stopped, and the start of a cryogs run."""
    if method != "cryogs":
        return {"epochs": None, "init": None}
    config = json.loads((out / "config.json").read_text())
    halves = [json.loads((out / f"half{k}" / "metrics.json").read_text()) for k in (1, 2)]
    return {"epochs": [h["epochs"] for h in halves], "epochs_planned": config["epochs"], "init": config["init"],
            "stop_reasons": [h["stop_reason"] for h in halves]}


def _epochs(row: dict) -> str:
    """``7/8 of 20`` (each half's epochs, of those planned), or the planned count of older rows."""
    epochs = row.get("epochs")
    if not isinstance(epochs, list):
        return str(epochs or "–")
    return f"{'/'.join(map(str, epochs))} of {row['epochs_planned']}"


def _row_order(r: dict) -> tuple:
    """Table order: particle count, SNR from high to low, backprojection, cryogs default, variants."""
    return r["n_images"], -r["snr"], r["method"] != "backproject", r["variant"] != "default", r["variant"]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}. FSC in Å (lower is better); Nyquist is {rows[0]['nyquist_angstrom']:.2f} Å.", "",
             "| images | SNR | method | variant | start | epochs | FSC vs truth @0.5 | half-map FSC @0.143 | wall s |",
             "|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n_images']} | {r['snr']:g} | {r['method']} | {r['variant']} | {r.get('init') or '–'} | "
                     f"{_epochs(r)} | "
                     f"{r['fsc_ref_0.5_angstrom']:.2f} | {r['fsc_half_0.143_angstrom']:.2f} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="cpu", help="particle counts to run (default: cpu)")
    ap.add_argument("--images", type=int, nargs="+", default=None,
                    help="particle counts to run instead of the --grid's")
    ap.add_argument("--snr", type=float, nargs="+", default=[math.inf, 1.0, 0.1], help="SNRs (default: inf 1 0.1)")
    ap.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                    help="extra cryogs variants to run at every grid point besides the default")
    ap.add_argument("--no-default", action="store_true",
                    help="run only the --variants, not backprojection and the default cryogs")
    ap.add_argument("--methods", nargs="+", choices=["backproject", "cryogs"], default=["backproject", "cryogs"],
                    help="which of the two baseline rows to run (default: both); e.g. backproject alone where "
                         "cryogs would take hours")
    ap.add_argument("--box", type=int, default=64, help="box size in pixels (default: 64)")
    ap.add_argument("--apix", type=float, default=1.5, help="pixel size in Å (default: 1.5)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cryogs_quality"), help="scratch folder for data and runs")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quality_cpu.json", help="JSON results file")
    args = ap.parse_args()
    name = device_name(args.device)
    for n in args.images or GRIDS[args.grid]:
        for snr in args.snr:
            data = simulate(args.work, n, snr, args.box, args.apix, seed=n)
            runs = [] if args.no_default else [(m, "-" if m == "backproject" else "default") for m in args.methods]
            for method, variant in runs + [("cryogs", v) for v in args.variants]:
                row = run_one(method, variant, data, run_dir(args.work, n, snr, method, variant), args.device)
                row.update(n_images=n, snr=snr, box=args.box, pixel_size=args.apix, device=name,
                           nyquist_angstrom=2 * args.apix)
                key = (n, snr, method, variant)
                rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []  # others may have run
                rows = [r for r in rows if (r["n_images"], r["snr"], r["method"], r["variant"]) != key] + [row]
                rows.sort(key=_row_order)
                print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"device": name, "model": MODEL.name, "rows": rows}, indent=1))
                args.out.with_suffix(".md").write_text(markdown(rows, name))


if __name__ == "__main__":
    main()
