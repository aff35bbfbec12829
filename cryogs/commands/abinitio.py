"""Ab initio reconstruction: find every particle's pose and a first map from the images alone.

Reads anything 'cryogs reconstruct' reads (RELION STAR 3.0/3.1/5, cryoSPARC .cs, a cryoDRGN .mrcs
stack or .txt list with --ctf); poses in the file, if any, are ignored. The search (see
cryogs/reconstruct/abinitio.py and the README) runs on images Fourier-cropped to --search-box pixels:
several random starts, then expectation-maximisation over all rotations (a ~15° grid refined
hierarchically) and in-plane shifts, scored by the Gaussian likelihood under each particle's CTF,
the resolution marching from --start-resolution to the search box's limit, soft assignments first
and hard ones last. Then Gaussians are fitted at the full box with the poses found while every pose
is refined locally (the machinery of 'cryogs reconstruct --refine-poses').

Outputs in DIR: map.mrc (voxel size set), particles.star (RELION 3.1: the input's columns, with the
poses found in _rlnAngleRot/Tilt/Psi and _rlnOriginX/YAngst; 'cryogs reconstruct' reads it as is),
gaussians.npz/.pt/.ply, metrics.json, viewing_directions.png, abinitio.png (resolution and
likelihood per iteration), slices.png, montage.png (data against reprojections), loss.png,
gaussians.png, config.json, abinitio_config.json, run.json, command.txt and the checkpoints
(abinitio_search.pt, checkpoint.pt) for --resume.

Handedness: projections cannot tell a structure from its mirror image, so the map comes out in
either hand. Compare with a known map with 'cryogs align MAP REFERENCE --out ALIGNED' (which tries
both hands), or mirror it with 'cryogs flip MAP --out FLIPPED'.

Then, for a better map: cryogs reconstruct DIR/particles.star --out DIR2 --refine-poses --half-maps

Examples:
  cryogs abinitio particles.star --out ab1
  cryogs abinitio J12_particles.cs --out ab2 --datadir /data/cryosparc/P3 --downsample 128
  cryogs abinitio particles.mrcs --ctf ctf.pkl --out ab3 --seed 2
  cryogs abinitio --out ab1 --resume
"""
import json

from cryogs.commands._options import (
    add_compute_args,
    add_output_args,
    add_particle_args,
    add_progress_arg,
    fraction,
    load_particles_from_args,
    positive_float,
    positive_int,
)
from cryogs.errors import CryogsError


def add_args(parser):
    add_particle_args(parser, resumable=True, poses=False)
    add_output_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed: random starts, subsets, fit (default: 0)")
    parser.add_argument("--search-box", type=positive_int, default=32,
                        help="box in pixels the pose search runs at (the images Fourier-cropped to it; its "
                             "Nyquist limit bounds the search's resolution) (default: 32)")
    parser.add_argument("--iterations", type=positive_int, default=12,
                        help="search iterations after the random starts (default: 12)")
    parser.add_argument("--starts", type=positive_int, default=3,
                        help="random starts, each tried on a subset of the images; the best continues (default: 3)")
    parser.add_argument("--start-resolution", type=positive_float, default=20.0,
                        help="resolution in Å the search starts at (default: 20)")
    parser.add_argument("--grid-step", type=positive_float, default=15.0,
                        help="spacing in degrees of the global rotation grid (refined hierarchically below it) "
                             "(default: 15, about 4,400 rotations)")
    parser.add_argument("--candidates", type=positive_int, default=10,
                        help="poses kept and refined per image in each iteration (the soft assignments' support) "
                             "(default: 10)")
    parser.add_argument("--max-shift", type=positive_float, default=None,
                        help="largest origin searched on each axis, Å (default: 6%% of the box)")
    parser.add_argument("--epochs", type=positive_int, default=3,
                        help="epochs of the final Gaussian fit with pose refinement (default: 3)")
    parser.add_argument("--refine-start", type=fraction, default=0.34,
                        help="fraction of those epochs before pose refinement starts (default: 0.34: the last 2 "
                             "of 3)")
    parser.add_argument("--pose-steps", type=positive_int, default=3,
                        help="pose-refinement steps per batch and epoch in the final fit (default: 3)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --out from its last checkpoint, with the options recorded "
                             "in its run.json (only --device, --backend and --no-progress may change)")
    add_compute_args(parser)
    add_progress_arg(parser)


def main(args):
    import time

    from cryogs.commands._run_folder import RunFolder
    from cryogs.io.atomic import write_json
    from cryogs.io.progress import Report
    from cryogs.reconstruct.abinitio import AbinitioConfig, FitPlan, run_abinitio
    from cryogs.reconstruct.config import estimate_extent

    start_time = time.perf_counter()
    if args.resume and args.overwrite:
        raise CryogsError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    folder = RunFolder.prepare(args)
    if folder.finished_already():
        return
    report = Report(bars=not args.no_progress)
    if args.resume:
        report.line(folder.resume_line())
    report.line(f"set-up: reading {args.particles}")
    particles = load_particles_from_args(args, poses=False)
    if len(particles) < 10:
        raise CryogsError(f"{args.particles}: {len(particles)} particles are too few for ab initio (at least 10)")
    if particles.box_size < 16:
        raise CryogsError(f"{args.particles}: images of {particles.box_size} px are too small for ab initio "
                          "(at least 16 px)")
    cfg_file = args.out / "abinitio_config.json"
    if args.resume and cfg_file.is_file():
        cfg = AbinitioConfig.from_dict(json.loads(cfg_file.read_text()))
        cfg.device = str(args.device)
    else:
        radius, mass = estimate_extent(particles, seed=args.seed)
        cfg = AbinitioConfig(work_box=args.search_box, iterations=args.iterations,
                             global_iterations=max(1, (2 * args.iterations) // 3),
                             soft_iterations=max(1, args.iterations // 2), starts=args.starts,
                             start_resolution=args.start_resolution, max_shift=args.max_shift or 0.0,
                             grid_step=args.grid_step, top_k=args.candidates,
                             radius=radius, mass=mass, seed=args.seed, device=str(args.device))
    plan = FitPlan(epochs=args.epochs, refine_start=args.refine_start, pose_steps=args.pose_steps)
    report.line(f"{len(particles)} particles, {particles.box_size} px, {particles.pixel_size:.4g} Å/px; particle "
                f"radius about {cfg.radius:.0f} Å; searching at {min(cfg.work_box, particles.box_size)} px with "
                f"{cfg.starts} random starts and {cfg.iterations} iterations, no symmetry")
    report.line("note: projections cannot tell a structure from its mirror image: the map may come out in either "
                "hand (cryogs align compares both hands with a reference; cryogs flip mirrors a map)")
    with folder.claimed():
        from dataclasses import asdict

        write_json(cfg_file, asdict(cfg))
        metrics = run_abinitio(particles, cfg, plan, args.out, resume=args.resume, report=report,
                               backend=args.backend)
        metrics["wall_seconds"] = time.perf_counter() - start_time
        write_json(args.out / "metrics.json", metrics)
        folder.finish()
    report.close()
    print(f"done in {metrics['wall_seconds']:.0f} s ({metrics['search_seconds']:.0f} s searching); map "
          f"{args.out / 'map.mrc'}, poses {args.out / 'particles.star'}. The hand is undetermined. Next: cryogs "
          f"reconstruct {args.out / 'particles.star'} --out DIR2 --refine-poses --half-maps")
