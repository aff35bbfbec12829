"""Resolution over time: which method to run, and for how long.

In one process and on the same particles, each method's map is scored against the ground truth
(FSC at 0.5 and 0.143 inside the commands' automatic mask, and the correlation) after every epoch,
with the wall time it took so far (the scoring itself excluded). Methods:

* ``default``: ``cryogs reconstruct``'s fit of one model on all particles (``--init auto``: on the
  backprojection, or random when that map is too poor; early stopping; its set-up, the start
  included, counts);
* ``fixed``: the same with ``--no-early-stop``: the whole epoch budget, to show what the stop gave up;
* ``coarse``: the default with ``--coarse 0.3``;
* ``before``: the fit as it was before the stopping rule, the ``cpu`` backend and the automatic
  start (every planned epoch, the ``torch`` splat, the backprojection start): today's time, for
  the targets that compare with it;
* ``plain-adam``: the comparator, a plain fit written here in a few lines: 1,500 Gaussians at random
  in the particle's sphere, Adam, 8 epochs, the squared error through the CTF, nothing else;
* ``backproject``: ``cryogs backproject``'s Wiener-filtered map of all particles (one point).

Writes ``results/time_to_result_<name>.json`` (the points), ``.md`` (a table) and ``.png`` (FSC at
0.5 against seconds).

Examples:
  python benchmarks/time_to_result.py --simulate 2000 1.0 --name adk_2k_snr1
  python benchmarks/time_to_result.py --simulate 1000 0.01 --name adk_1k_snr0.01 --seeds 4
  python benchmarks/time_to_result.py --data sim/ --name mine        # sim/particles.star, sim/gt_map.mrc
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cryogs.analysis.evaluate import compare_maps  # noqa: E402
from cryogs.cli import main as cryogs  # noqa: E402
from cryogs.io.load import load_particles  # noqa: E402
from cryogs.io.mrc import read_mrc  # noqa: E402
from cryogs.physics.ctf import apply_ctf, particle_ctf  # noqa: E402
from cryogs.reconstruct import backproject  # noqa: E402
from cryogs.reconstruct.config import default_config, default_mask_radius, estimate_extent  # noqa: E402
from cryogs.reconstruct.fit import run_training  # noqa: E402
from cryogs.render.project import project, voxelize  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODEL = ROOT.parent / "cryogs" / "data" / "adk_open.pdb"
METHODS = ("default", "fixed", "coarse", "before", "plain-adam", "backproject")


class Clock:
    """Wall time with the scoring taken out."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused


def score(volume, truth, pixel_size, mask) -> dict:
    m, _, _ = compare_maps(volume, truth, pixel_size, mask_radius=mask)
    return {"fsc_0.5_angstrom": m["fsc_0.5_angstrom"], "fsc_0.143_angstrom": m["fsc_0.143_angstrom"],
            "correlation": m["correlation"]}


def run_cryogs(particles, truth, mask, work: Path, init: str = "auto", **overrides) -> dict:
    """A default fit (plus ``overrides``; ``init`` 'auto' or 'backproject'), scored after every epoch."""
    clock, points = Clock(), []
    config = default_config(particles, **overrides)
    if init == "auto":
        start, why = backproject.automatic_start(particles, config.n_gaussians, seed=config.seed)
    else:
        start = backproject.gaussians_on_backprojection(particles, config.n_gaussians, seed=config.seed)
        why = "backproject"

    def follow(trainer):
        t, paused = clock.now(), time.perf_counter()
        points.append({"seconds": t, "epoch": trainer.epoch, **score(trainer.volume(), truth,
                                                                     particles.pixel_size, mask)})
        clock.paused += time.perf_counter() - paused

    trainer = run_training(particles, config, work, initial=start, progress=False, on_epoch=follow)
    return {"points": points, "start": why, "epochs": trainer.epoch, "epochs_planned": config.epochs,
            "stop_reason": trainer.stop_reason, "n_gaussians": len(trainer.model)}


def run_plain_adam(particles, truth, mask, *, n_gaussians=1500, epochs=8, batch_size=32, seed=0) -> dict:
    """The comparator: random Gaussians, Adam on the squared error through the CTF, nothing else."""
    clock, points = Clock(), []
    p, D = particles.pixel_size, particles.box_size
    radius, mass = estimate_extent(particles)
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n_gaussians, 3, generator=g), dim=-1)
    means = (direction * radius * torch.rand(n_gaussians, 1, generator=g) ** (1 / 3)).requires_grad_()
    quats = torch.randn(n_gaussians, 4, generator=g).requires_grad_()
    log_scales = torch.full((n_gaussians, 3), math.log(1.5 * p), requires_grad=True)
    log_amps = torch.full((n_gaussians,), math.log(mass / n_gaussians), requires_grad=True)
    opt = torch.optim.Adam([{"params": [means], "lr": 0.5 * p}, {"params": [quats, log_scales], "lr": 0.02},
                            {"params": [log_amps], "lr": 0.03}])
    steps = epochs * math.ceil(len(particles) / batch_size)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.02 ** (1 / steps))
    images = torch.from_numpy(particles.images(np.arange(len(particles))))
    rot = torch.as_tensor(particles.rotations, dtype=torch.float32)
    shifts = torch.as_tensor(particles.shifts, dtype=torch.float32)
    model = lambda: (means, quats, log_scales.exp(), log_amps.exp())  # noqa: E731
    for epoch in range(epochs):
        for idx in np.array_split(np.random.default_rng([seed, epoch]).permutation(len(particles)),
                                  math.ceil(len(particles) / batch_size)):
            pred = project(*model(), rot[idx], shifts[idx], box_size=D, pixel_size=p)
            ctf = particle_ctf(particles, idx)
            pred = pred if ctf is None else apply_ctf(pred, ctf)
            loss = ((pred - images[idx]) ** 2).sum((-2, -1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        t, paused = clock.now(), time.perf_counter()
        with torch.no_grad():
            volume = voxelize(*[x.detach() for x in model()], box_size=D, pixel_size=p).numpy()
        points.append({"seconds": t, "epoch": epoch + 1, **score(volume, truth, p, mask)})
        clock.paused += time.perf_counter() - paused
    return {"points": points, "epochs": epochs, "n_gaussians": n_gaussians}


def run_backproject(particles, truth, mask) -> dict:
    clock = Clock()
    volume = backproject.regularised_backprojection(particles)
    return {"points": [{"seconds": clock.now(), "epoch": None, **score(volume, truth, particles.pixel_size, mask)}]}


def simulate(work: Path, n: int, snr: float, box: int, apix: float) -> Path:
    folder = work / f"sim_n{n}_snr{snr:g}_box{box}"
    if not (folder / "particles.star").exists():
        if cryogs(["simulate", str(MODEL), "--out", str(folder), "-n", str(n), "--box", str(box),
                   "--pixel-size", str(apix), *(["--snr", str(snr)] if math.isfinite(snr) else []),
                   "--defocus", "10000", "25000", "--max-shift", "3", "--seed", str(n), "--device", "cpu",
                   "--overwrite"]) != 0:
            raise SystemExit("simulation failed")
    return folder


def markdown(result: dict) -> str:
    lines = [f"{result['name']}: {result['n_particles']} particles, box {result['box']}, {result['pixel_size']} Å/px "
             f"(Nyquist {2 * result['pixel_size']:.2f} Å); {result['device']}.", "",
             "| method | epochs | Gaussians | seconds | FSC @0.5 Å | FSC @0.143 Å | correlation "
             "| best FSC @0.5 on the way |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    means = []
    for name, r in result["methods"].items():
        last = r["points"][-1]
        best = min(pt["fsc_0.5_angstrom"] for pt in r["points"])
        epochs = r.get("epochs")
        if r.get("epochs_planned"):
            epochs = f"{epochs} of {r['epochs_planned']}"
        lines.append(f"| {name} | {epochs or '–'} | {r.get('n_gaussians') or '–'} | {last['seconds']:.0f} | "
                     f"{last['fsc_0.5_angstrom']:.2f} | {last['fsc_0.143_angstrom']:.2f} | {last['correlation']:.4f} | "
                     f"{best:.2f} |")
        if "seeds" in r:
            f, c, t = ([x[k] for x in r["seeds"]] for k in ("fsc_0.5_angstrom", "correlation", "seconds"))
            means.append(f"| {name} | {len(f)} | {np.mean(t):.1f} | {np.mean(f):.2f} ({min(f):.2f}–{max(f):.2f}) | "
                         f"{np.mean(c):.4f} ({min(c):.4f}–{max(c):.4f}) |")
    if means:
        lines += ["", "Over seeds (the fit's initialisation and order; same data):", "",
                  "| method | seeds | mean seconds | FSC @0.5 Å: mean (range) | correlation: mean (range) |",
                  "|---|---:|---:|---:|---:|", *means]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in result["methods"].items():
        t = [pt["seconds"] for pt in r["points"]]
        f = [pt["fsc_0.5_angstrom"] for pt in r["points"]]
        ax.plot(t, f, "o-" if len(t) > 1 else "s", ms=3, label=name)
    ax.axhline(2 * result["pixel_size"], color="grey", ls=":", lw=1, label="Nyquist")
    ax.set_xlabel("wall time (s), scoring excluded")
    ax.set_ylabel("FSC 0.5 against the truth (Å)")
    ax.set_title(result["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder with particles.star and gt_map.mrc")
    src.add_argument("--simulate", nargs=2, type=float, metavar=("N", "SNR"),
                     help="simulate N ADK particles at this SNR (CTF, defocus 1–2.5 µm, shifts ±3 Å)")
    ap.add_argument("--box", type=int, default=64, help="box for --simulate, pixels (default: 64)")
    ap.add_argument("--pixel-size", type=float, default=1.5, help="pixel size for --simulate, Å (default: 1.5)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default: all)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run each method (but before and backproject) with seeds 0..SEEDS-1: the table shows "
                         "seed 0 and the mean over seeds (default: 1)")
    ap.add_argument("--name", required=True, help="name of the result files in benchmarks/results/")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cryogs_time_to_result",
                    help="scratch folder")
    args = ap.parse_args(argv)
    data = args.data or simulate(args.work, int(args.simulate[0]), args.simulate[1], args.box, args.pixel_size)
    particles = load_particles(data / "particles.star")
    truth, _ = read_mrc(data / "gt_map.mrc")
    mask = default_mask_radius(particles)
    result = {"name": args.name, "data": str(data), "n_particles": len(particles), "box": particles.box_size,
              "pixel_size": particles.pixel_size, "mask_radius_angstrom": mask,
              "torch_threads": torch.get_num_threads(),
              "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
              "methods": {}}
    out = ROOT / "results" / f"time_to_result_{args.name}.json"
    for method in args.methods:
        runs = []
        for seed in range(1 if method in ("before", "backproject") else args.seeds):
            work = args.work / f"{args.name}_{method}_s{seed}"
            if method == "plain-adam":
                runs.append(run_plain_adam(particles, truth, mask, seed=seed))
            elif method == "backproject":
                runs.append(run_backproject(particles, truth, mask))
            else:
                extra = {"fixed": {"early_stop": False}, "coarse": {"coarse": 0.3},
                         "before": {"early_stop": False, "backend": "torch", "init": "backproject"}}.get(method, {})
                runs.append(run_cryogs(particles, truth, mask, work, seed=seed, **extra))
        r = result["methods"][method] = runs[0]
        if len(runs) > 1:
            r["seeds"] = [{"seed": k, "epochs": x.get("epochs"), **x["points"][-1]} for k, x in enumerate(runs)]
        last = r["points"][-1]
        print(f"{method}: {last['seconds']:.0f} s, FSC 0.5 {last['fsc_0.5_angstrom']:.2f} Å, "
              f"correlation {last['correlation']:.4f}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out} (.md, .png)")


if __name__ == "__main__":
    main()
