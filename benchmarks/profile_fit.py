"""Where the time of a reconstruction goes: ``cryogs reconstruct --half-maps`` under cProfile, broken down.

Runs the command in this process under :mod:`cProfile` (which slows Python-heavy code somewhat; the
torch kernels themselves are not slowed) and splits the whole run into stages, each the cumulative
time of the functions that make it (a stage nested in another is subtracted from it):

* set-up: imports, reading the particles, checks (the command's time outside the half-map fits);
* backprojection start, training steps (split into rendering forward, backward, CTF, loss, optimiser,
  data and the rest of the step's Python), held-out scoring (the stopping rule), checkpoints,
  outputs and figures (maps, models, figures of each half, the averaged map, FSC).

Writes ``results/profile_<name>.json`` (the stages and the top functions) and ``.md`` (a table).

Examples:
  python benchmarks/profile_fit.py --simulate 2000 1 --name 2k_snr1
  python benchmarks/profile_fit.py --data sim/ --name mine --backend torch
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import tempfile
import time
from pathlib import Path

import torch
from time_to_result import simulate  # the same simulated data (benchmarks/ is the script's folder)

from cryogs.cli import main as cryogs

ROOT = Path(__file__).resolve().parent


class Profile:
    """Cumulative times of functions (optionally only as called from one caller) in a pstats profile."""

    def __init__(self, stats: pstats.Stats):
        self.stats = stats.stats

    def _functions(self, name: str):
        return [(key, value) for key, value in self.stats.items() if f"{Path(key[0]).name}:{key[2]}" == name]

    def seconds(self, name: str, caller: str | None = None) -> float:
        """Cumulative seconds of ``file.py:function`` (all of them, or those called from ``caller``)."""
        total = 0.0
        for _, (_, _, _, cumulative, callers) in self._functions(name):
            if caller is None:
                total += cumulative
            else:
                total += sum(edge[3] for key, edge in callers.items() if f"{Path(key[0]).name}:{key[2]}" == caller)
        return total


def stages(prof: Profile, wall: float) -> dict[str, float]:
    """Exclusive seconds per stage (they sum to ``wall``)."""
    s = prof.seconds
    step = s("fit.py:step")
    forward = s("fit.py:render", "fit.py:step") + s("fit.py:render", "fit.py:_refine_poses_only")
    ctf_in_render = s("ctf.py:apply_ctf", "fit.py:render") * (forward / max(s("fit.py:render"), 1e-12))
    backward = s("_tensor.py:backward", "fit.py:step") + s("__init__.py:grad", "fit.py:_refine_poses_only")
    ctf = s("ctf.py:particle_ctf", "fit.py:step") + ctf_in_render
    loss = s("fit.py:_data_loss", "fit.py:step") + s("fit.py:_priors", "fit.py:step")
    # the scheduler wraps optimizer.step in its own wrapper
    optimiser = s("lr_scheduler.py:wrapper", "fit.py:step") + s("lr_scheduler.py:step", "fit.py:step")
    parts = {
        "rendering, forward (training)": forward - ctf_in_render,
        "rendering, backward (training)": backward,
        "CTF (per-image CTF and its application)": ctf,
        "loss and priors": loss,
        "optimiser and schedule": optimiser,
        "data (batches from memory or the loader)": s("fit.py:_batches"),
    }
    data = parts["data (batches from memory or the loader)"]  # fetched between steps, not inside them
    parts["rest of the training step (Python)"] = step - (sum(parts.values()) - data)
    heldout = s("fit.py:heldout_losses")
    checkpoints = s("fit.py:save_checkpoint")
    start = s("backproject.py:gaussians_on_backprojection")
    fitting = s("fit.py:fit")
    parts["epoch bookkeeping (progress, checks)"] = fitting - step - heldout - checkpoints - s("fit.py:_batches")
    parts["held-out scoring (stopping rule)"] = heldout
    parts["checkpoints"] = checkpoints
    parts["backprojection start"] = start
    half_maps = s("half_maps.py:run_half_maps")
    parts["outputs and figures"] = half_maps - start - fitting
    parts["set-up (imports, reading, checks)"] = wall - half_maps
    return parts


def top_functions(stats: pstats.Stats, n: int = 25) -> str:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(n)
    return out.getvalue()


def markdown(result: dict) -> str:
    total = result["wall_seconds"]
    lines = [f"{result['name']}: `{result['command']}` on {result['device']}; {total:.1f} s under cProfile.", "",
             "| stage | seconds | share |", "|---|---:|---:|"]
    for stage, sec in sorted(result["stages"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {stage} | {sec:.1f} | {100 * sec / total:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder with particles.star")
    src.add_argument("--simulate", nargs=2, type=float, metavar=("N", "SNR"),
                     help="simulate N ADK particles at this SNR (box 64, 1.5 Å/px, CTF), as the quality benchmark")
    ap.add_argument("--backend", default="auto", help="rendering backend (default: auto)")
    ap.add_argument("--name", required=True, help="name of the result files in benchmarks/results/")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cryogs_profile", help="scratch folder")
    args = ap.parse_args(argv)
    data = args.data or simulate(args.work, int(args.simulate[0]), args.simulate[1], 64, 1.5)
    command = ["reconstruct", str(data / "particles.star"), "--out", str(args.work / f"run_{args.name}"),
               "--half-maps", "--device", "cpu", "--backend", args.backend, "--no-progress", "--overwrite"]
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    rc = cryogs(command)
    profiler.disable()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"cryogs {' '.join(command)} failed")
    stats = pstats.Stats(profiler)
    result = {"name": args.name, "command": "cryogs " + " ".join(command[:1] + ["particles.star"] + command[4:]),
              "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
              "wall_seconds": wall, "stages": stages(Profile(stats), wall),
              "metrics": json.loads((args.work / f"run_{args.name}" / "metrics.json").read_text()),
              "top_functions": top_functions(stats)}
    out = ROOT / "results" / f"profile_{args.name}.json"
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out} (.md)")


if __name__ == "__main__":
    main()
