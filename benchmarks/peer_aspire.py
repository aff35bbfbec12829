"""Peer ab initio method for ``benchmarks/abinitio.py``: ASPIRE's common-lines pipeline.

ASPIRE (https://github.com/ComputationalCryoEM/ASPIRE-Python, ``pip install aspire``, tested with 0.14.3)
is an optional benchmark dependency. It pins its own numpy/scipy, so it is meant to live in a separate
virtual environment; this file therefore has two halves:

* ``run`` (the command line) runs under ASPIRE's interpreter and imports only numpy, mrcfile and aspire.
  It follows the steps of ASPIRE's gallery pipelines for experimental RELION data (``experimental_abinitio_
  pipeline_10028``): ``RelionSource`` -> (optional ``downsample``) -> ``phase_flip`` (CTF) -> whiten
  with an ``AnisotropicNoiseEstimator`` -> ``invert_contrast`` -> ``DefaultClassAvgSource`` (RIR
  classification, brute-force rotation and translation averaging, global-variance class selection) ->
  first ``n_classes`` averages -> ``CLSyncVoting`` common lines (``--orientation sync3n``: ``CLSync3N``)
  -> ``OrientedSource`` -> ``MeanEstimator``. It writes to ``--out`` (also ASPIRE's logs/ and
  checkpoints):

  - ``map.mrc``: the map, upsampled back to the particles' box and pixel size (Fourier padding), so that
    it can be compared with the simulation's ``gt_map.mrc`` directly;
  - ``rotations.npy``: [k, 3, 3] ASPIRE's estimated rotation of each class average (ASPIRE's convention);
  - ``indices.npy``: [k] index (0-based, star-file order) of each average's reference particle;
  - ``result.json``: wall time (s) of the whole pipeline (reading the images included), parameters, versions.

* ``score_aspire(run_dir, sim_dir)`` runs under cryogs' interpreter and scores a run like ``score()`` of
  ``benchmarks/abinitio.py``: pose errors of the averages (against their reference particles' true
  poses) and FSC of the map against the truth after alignment.

Example (ASPIRE installed in /tmp/peer)::

  OMP_NUM_THREADS=1 /tmp/peer/bin/python benchmarks/peer_aspire.py --star SIM/particles.star --out RUN
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from peer_aspire import score_aspire; \\
             print(score_aspire('RUN', 'SIM'))"
  python benchmarks/peer_aspire.py --score RUN SIM        # the same, from the command line
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# Defaults. ASPIRE's gallery pipelines for experimental data downsample to 32 px and use n_theta=72;
# for ADK (a ~50 Å particle) at 3 Å/px that loses the common lines' precision: noise-free, raw images,
# CLSyncVoting, median error 14.2° at 32 px against 3.3° at 64 px; on 2,000 particles at SNR 1 the
# 32 px / n_theta 72 pipeline gave 11.1° and FSC(0.5) 22.7 Å in 132 s, the 64 px / n_theta 360 one
# (CLSyncVoting's own default n_theta) 5.9° and 7.2 Å in 558 s (SNR 0.1: 18.0° / 22.5 Å in 194 s
# against 12.4° / 11.2 Å in 548 s). So: no downsampling, n_theta 360.
# n_classes 300 averages of n_nbor 20 neighbours (the simulated gallery uses n_nbor 10 on 10,000
# images; 2,000 images at SNR down to 0.1 want more averaging). CLSyncVoting rather than CLSync3N
# (the 10028 gallery's choice): CLSync3N's J-synchronisation took about 6 minutes per power
# iteration on 300 averages on one core, far past the benchmark's budget.
DEFAULTS = {"img_size": 0, "n_classes": 300, "n_nbor": 20, "n_theta": 360, "orientation": "voting", "cov2d": False}


def to_relion(rotations: np.ndarray) -> np.ndarray:
    """ASPIRE's rotation matrices -> RELION's A (map coordinates -> image coordinates), [n, 3, 3].

    ASPIRE's rotation is the transpose (inverse) of RELION's A. Measured on noise-free data (cryogs
    simulate, 500 ADK particles, box 64, 1.5 Å/px, CTF, origins ±3 Å, seed 1000): ``CLSyncVoting``
    (n_theta 360) on the first 200 raw phase-flipped particles at 64 px gives a median error of 3.3°
    (97.5 % within 10°) for the transposes against 81.7° for the raw matrices; among all 48 signed axis
    permutations applied on the image side, of the raw matrices and of their transposes, only the plain
    transpose (and its mirror, absorbed by pose_errors) comes out below 70° (on the 32 px images: 14.2°).
    The whole pipeline on the same 500 noise-free particles (100 averages of 10, no whitening): 7.0°,
    74 % within 10°, FSC(0.5) 7.3 Å, 100 s.
    """
    return np.transpose(np.asarray(rotations), (0, 2, 1))


def run(star: Path, out: Path, seed: int = 0, img_size: int = 0, n_classes: int = 300, n_nbor: int = 20,
        n_theta: int = 360, orientation: str = "voting", cov2d: bool = False, whiten: bool = True,
        max_rows: int | None = None) -> dict:
    import aspire
    from aspire.abinitio import CLSync3N, CLSyncVoting
    from aspire.denoising import DefaultClassAvgSource, DenoisedSource, DenoiserCov2D
    from aspire.noise import AnisotropicNoiseEstimator
    from aspire.reconstruction import MeanEstimator
    from aspire.source import OrientedSource, RelionSource

    np.random.seed(seed)  # ASPIRE's randomised parts draw from numpy's global state unless given a seed
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = RelionSource(str(star), data_folder=str(star.parent), max_rows=max_rows, dtype=np.float64)
    box, pixel = src.L, float(src.pixel_size)
    if img_size and img_size < box:
        src = src.downsample(img_size)
    src = src.phase_flip()
    if whiten:
        src = src.whiten(AnisotropicNoiseEstimator(src))
    # ASPIRE's data-driven contrast check (flips the stack only if the particle is darker than the
    # background after phase flipping); without it the map of cryogs' simulations comes out inverted.
    src = src.invert_contrast()
    src = src.cache()
    classification_src = src
    if cov2d:
        classification_src = DenoisedSource(src, DenoiserCov2D(src)).cache()
    avgs = DefaultClassAvgSource(classification_src, n_nbor=n_nbor, averager_src=src if cov2d else None)
    k = min(n_classes, avgs.n)
    # Each average is centred on (aligned to) a reference particle: column 0 of its row of class_indices.
    selected = np.asarray(avgs.selection_indices[:k], dtype=int)
    reference = avgs.class_indices[selected, 0].astype(int)
    avgs = avgs[:k].cache()
    t_avg = time.perf_counter()
    if orientation == "sync3n":
        orient = CLSync3N(avgs, n_theta=n_theta, seed=seed)
    else:
        orient = CLSyncVoting(avgs, n_theta=n_theta)
    oriented = OrientedSource(avgs, orient)
    rotations = np.asarray(oriented.rotations)
    t_orient = time.perf_counter()
    volume = MeanEstimator(oriented, checkpoint_prefix=str(out / "volume_checkpoint")).estimate()
    vol = np.asarray(volume.asnumpy()[0], dtype=np.float64)
    t_vol = time.perf_counter()
    if vol.shape[0] != box:  # back to the particles' sampling (zero padding in Fourier space)
        vol = np.asarray(volume.downsample(box).asnumpy()[0], dtype=np.float64)
    wall = time.perf_counter() - t0

    import mrcfile
    with mrcfile.new(out / "map.mrc", overwrite=True) as m:
        m.set_data(vol.astype(np.float32))
        m.voxel_size = pixel
    np.save(out / "rotations.npy", rotations)
    np.save(out / "indices.npy", reference)
    result = {
        "method": "aspire", "wall_seconds": wall,
        "stage_seconds": {"setup_and_classify": t_avg - t0, "orientation": t_orient - t_avg,
                          "volume": t_vol - t_orient},
        "parameters": {"img_size": img_size, "n_classes": k, "n_nbor": n_nbor, "n_theta": n_theta, "cov2d": cov2d,
                       "whiten": whiten, "seed": seed,
                       "orientation": {"voting": "CLSyncVoting", "sync3n": "CLSync3N"}[orientation],
                       "class_averages": "DefaultClassAvgSource", "max_rows": max_rows},
        "star": str(star), "box": box, "pixel_size": pixel, "n_particles": int(src.n),
        "versions": {"aspire": aspire.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def score_aspire(run_dir, sim_dir) -> dict:
    """Score an ASPIRE run against the simulation (cryogs' interpreter), like ``score()`` in abinitio.py."""
    from cryogs.analysis.align import align_maps
    from cryogs.analysis.evaluate import compare_maps
    from cryogs.analysis.pose_error import pose_errors
    from cryogs.io.mrc import read_mrc
    from cryogs.io.star import load_star

    run_dir, sim_dir = Path(run_dir), Path(sim_dir)
    info = json.loads((run_dir / "result.json").read_text())
    est = to_relion(np.load(run_dir / "rotations.npy"))
    idx = np.load(run_dir / "indices.npy")
    tru = np.asarray(load_star(sim_dir / "particles.star").rotations)[idx]
    e = pose_errors(est, tru)
    out = {"median_pose_error_degrees": e["median_degrees"], "within_10_degrees": e["within_10_degrees"],
           "poses_mirrored": e["mirrored"], "n_poses": len(idx)}
    volume, voxel = read_mrc(run_dir / "map.mrc")
    truth, _ = read_mrc(sim_dir / "gt_map.mrc")
    a = align_maps(volume, truth)
    m, _, _ = compare_maps(a["aligned"], truth, voxel[0])
    out.update(fsc_0_5_angstrom=m["fsc_0.5_angstrom"], fsc_0_143_angstrom=m["fsc_0.143_angstrom"],
               map_mirrored=a["mirrored"], wall_seconds=info["wall_seconds"], parameters=info["parameters"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--star", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, default=DEFAULTS["img_size"],
                    help="downsample to this box (0: keep the particles' box)")
    ap.add_argument("--n-classes", type=int, default=DEFAULTS["n_classes"])
    ap.add_argument("--n-nbor", type=int, default=DEFAULTS["n_nbor"])
    ap.add_argument("--n-theta", type=int, default=DEFAULTS["n_theta"])
    ap.add_argument("--orientation", choices=["voting", "sync3n"], default=DEFAULTS["orientation"],
                    help="common-lines synchronisation: CLSyncVoting (default) or CLSync3N (far slower on CPU)")
    ap.add_argument("--cov2d", action="store_true", help="classify CWF-denoised images (ASPIRE's do_cov2d)")
    ap.add_argument("--no-whiten", action="store_true", help="skip whitening (noise-free data)")
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--score", nargs=2, metavar=("RUN", "SIM"), help="score a run (cryogs' interpreter)")
    args = ap.parse_args(argv)
    if args.score:
        print(json.dumps(score_aspire(*args.score), indent=1))
        return
    if args.star is None or args.out is None:
        ap.error("--star and --out are needed to run ASPIRE")
    # ASPIRE writes its log folder (logs/) into the working directory when imported: keep it in --out.
    star, out = args.star.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    r = run(star, out, seed=args.seed, img_size=args.img_size, n_classes=args.n_classes,
            n_nbor=args.n_nbor, n_theta=args.n_theta, orientation=args.orientation, cov2d=args.cov2d,
            whiten=not args.no_whiten, max_rows=args.max_rows)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    sys.exit(main())
