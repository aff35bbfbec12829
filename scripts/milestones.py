"""The seed's two experiments on synthetic data with known poses.

Milestone 3: recover θ* from a random initialisation (same N as the truth, and the data-derived
default N).
Milestone 4: start from θ0 = θ* + ε (centres moved by ε Å in a random direction, log-scales and
log-amplitudes jittered by ε/10) for a range of ε and SNR.

For each run: FSC of the voxelized model against the ground-truth map (0.5 and 0.143, Å), the
map correlation, and parameter errors after one-to-one Hungarian matching of the centres
(centre RMSE in Å, relative covariance error ‖Σ−Σ*‖/‖Σ*‖, relative amplitude error; medians).

Writes a Markdown table and plots to --out (default benchmarks/milestones).

Example:
  python scripts/milestones.py --out benchmarks/milestones
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cryogs.analysis.evaluate import compare_maps
from cryogs.io.load import load_particles
from cryogs.model.gaussians import GaussianModel
from cryogs.reconstruct.config import default_config
from cryogs.reconstruct.fit import run_training
from cryogs.render.gaussian_math import covariance_3d
from cryogs.render.project import voxelize
from cryogs.simulate import simulate_stack, write_dataset


def ground_truth(n: int, seed: int) -> GaussianModel:
    """``n`` anisotropic Gaussians (σ 2–4 Å) spread through a 15 Å-radius sphere, at least 4 Å apart."""
    rng = np.random.default_rng(seed)
    means = []
    while len(means) < n:
        x = rng.uniform(-15, 15, 3)
        if np.linalg.norm(x) <= 15 and all(np.linalg.norm(x - m) >= 4 for m in means):
            means.append(x)
    return GaussianModel(np.array(means), rng.normal(size=(n, 4)), rng.uniform(2, 4, (n, 3)),
                         rng.uniform(0.5, 1.5, n))


def perturb(model: GaussianModel, eps: float, seed: int) -> GaussianModel:
    a = model.arrays()
    rng = np.random.default_rng(seed)
    d = rng.normal(size=a["means"].shape)
    d *= eps / np.linalg.norm(d, axis=1, keepdims=True)
    return GaussianModel(a["means"] + d, a["quats"], a["scales"] * np.exp(rng.normal(0, eps / 10, a["scales"].shape)),
                         a["amplitudes"] * np.exp(rng.normal(0, eps / 10, a["amplitudes"].shape)))


def parameter_errors(fit: GaussianModel, truth: GaussianModel) -> dict:
    f, t = fit.arrays(), truth.arrays()
    cost = np.linalg.norm(f["means"][:, None] - t["means"][None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    cov = lambda a: covariance_3d(torch.from_numpy(a["quats"]), torch.from_numpy(a["scales"])).numpy()  # noqa: E731
    cf, ct = cov(f)[rows], cov(t)[cols]
    return {"centre_rmse_A": float(np.sqrt((cost[rows, cols] ** 2).mean())),
            "cov_rel_err": float(np.median(np.linalg.norm(cf - ct, axis=(1, 2)) / np.linalg.norm(ct, axis=(1, 2)))),
            "amp_rel_err": float(np.median(np.abs(f["amplitudes"][rows] / t["amplitudes"][cols] - 1)))}


def run(label, truth, particles, gt_map, *, initial=None, n_gaussians=None, epochs=None):
    cfg = default_config(particles, n_gaussians=n_gaussians, epochs=epochs)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = run_training(particles, cfg, tmp, progress=False, initial=initial)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        vol = voxelize(*[t.detach() for t in trainer.model()], box_size=particles.box_size,
                       pixel_size=particles.pixel_size).numpy()
    metrics, freqs, curve = compare_maps(vol, gt_map, particles.pixel_size)
    row = {"run": label, "n_gaussians": len(trainer.model), "epochs": cfg.epochs, "seconds": seconds,
           "fsc_0.5_A": metrics["fsc_0.5_angstrom"], "fsc_0.143_A": metrics["fsc_0.143_angstrom"],
           "correlation": metrics["correlation"]}
    if len(trainer.model) == len(truth):
        row.update(parameter_errors(trainer.model.cpu(), truth))
    print(json.dumps(row), flush=True)
    return row, (freqs, curve)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/milestones"), help="output folder")
    ap.add_argument("--n-gaussians", type=int, default=40, help="Gaussians in the ground truth (default: 40)")
    ap.add_argument("--particles", type=int, default=1000, help="images per dataset (default: 1000)")
    ap.add_argument("--box", type=int, default=40, help="box size in pixels (default: 40)")
    ap.add_argument("--apix", type=float, default=1.5, help="pixel size in Å (default: 1.5)")
    ap.add_argument("--eps", default="0.5,1,2,4", help="centre perturbations ε in Å (default: 0.5,1,2,4)")
    ap.add_argument("--snr", default="inf,1,0.1", help="SNR values (default: inf,1,0.1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    truth = ground_truth(args.n_gaussians, args.seed)

    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {}
        for snr in [float(s) for s in args.snr.split(",")]:
            stack = simulate_stack(truth, args.particles, box_size=args.box, pixel_size=args.apix, snr=snr,
                                   max_shift=2 * args.apix, seed=args.seed + 1)
            files = write_dataset(Path(tmp) / f"snr{snr}", truth, stack, box_size=args.box, pixel_size=args.apix)
            from cryogs.io.mrc import read_mrc

            datasets[snr] = (load_particles(files["star"]), read_mrc(files["map"])[0])

        particles, gt_map = datasets[max(datasets)]
        for label, kw in [("M3 random init, N = N*", {"n_gaussians": len(truth)}), ("M3 random init, default N", {})]:
            row, curves[label] = run(label, truth, particles, gt_map, **kw)
            rows.append({"milestone": 3, "snr": max(datasets), "eps_A": None, **row})
        for snr, (particles, gt_map) in datasets.items():
            for eps in [float(e) for e in args.eps.split(",")]:
                label = f"M4 ε={eps:g} Å, SNR={snr:g}"
                row, curve = run(label, truth, particles, gt_map, initial=perturb(truth, eps, args.seed + 2))
                if snr == max(datasets):
                    curves[label] = curve
                rows.append({"milestone": 4, "snr": snr, "eps_A": eps, **row})

    (args.out / "results.json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                      indent=2) + "\n")
    write_markdown(args, rows)
    plot(args, rows, curves)
    print(f"wrote {args.out}/results.json, MILESTONES.md, milestones.png")


def write_markdown(args, rows):
    fmt = lambda v, f: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
    lines = ["# Milestones 3 and 4 (synthetic, known poses)\n",
             f"Ground truth: {args.n_gaussians} anisotropic Gaussians; {args.particles} images, box {args.box}, "
             f"{args.apix} Å/px (Nyquist {2 * args.apix:.1f} Å), random poses and shifts, white noise at the SNR "
             f"shown. Produced by `python scripts/milestones.py` on CPU.\n",
             "| milestone | run | SNR | ε (Å) | N | epochs | FSC 0.5 (Å) | FSC 0.143 (Å) | map corr. | centre RMSE (Å) "
             "| cov. rel. err. | amp. rel. err. | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['milestone']} | {r['run']} | {fmt(r['snr'], 'g')} | {fmt(r['eps_A'], 'g')} | "
                     f"{r['n_gaussians']} | {r['epochs']} | {r['fsc_0.5_A']:.2f} | {r['fsc_0.143_A']:.2f} | "
                     f"{r['correlation']:.4f} | {fmt(r.get('centre_rmse_A'), '.2f')} | {fmt(r.get('cov_rel_err'), '.3f')} "
                     f"| {fmt(r.get('amp_rel_err'), '.3f')} | {r['seconds']:.0f} |")
    (args.out / "MILESTONES.md").write_text("\n".join(lines) + "\n")


def plot(args, rows, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (f, c) in curves.items():
        a1.plot(f, c, label=label, lw=1.2)
    for t in (0.5, 0.143):
        a1.axhline(t, color="grey", ls="--", lw=0.7)
    a1.set_xlabel("spatial frequency (1/Å)")
    a1.set_ylabel("FSC vs ground truth")
    a1.legend(fontsize=7)
    m4 = [r for r in rows if r["milestone"] == 4]
    for snr in sorted({r["snr"] for r in m4}, reverse=True):
        sel = [r for r in m4 if r["snr"] == snr]
        a2.plot([r["eps_A"] for r in sel], [r["centre_rmse_A"] for r in sel], "o-", label=f"SNR {snr:g}")
    a2.plot([r["eps_A"] for r in m4 if r["snr"] == m4[0]["snr"]], [r["eps_A"] for r in m4 if r["snr"] == m4[0]["snr"]],
            "k:", label="initial error ε")
    a2.set_xlabel("initial centre perturbation ε (Å)")
    a2.set_ylabel("centre RMSE after fitting (Å)")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "milestones.png", dpi=110)


if __name__ == "__main__":
    main()
