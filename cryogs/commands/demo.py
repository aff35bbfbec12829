"""Simulate, reconstruct and evaluate the embedded example: adenylate kinase (PDB 4AKE, 3,341 atoms).

Particles are simulated from every atom of the model (no inverse crime), with random poses
and shifts and white noise at the given SNR; cryogs then fits Gaussians, started as `cryogs
reconstruct` starts them (on the particles' backprojection, or at random with --init random),
and reports the FSC of the reconstruction against the ground-truth map.

Writes DIR/data (the simulated dataset), DIR/reconstruction (map.mrc, figures, metrics),
DIR/fsc.png, command.txt and run.json; DIR must be new or empty, unless --overwrite. Takes a few
minutes on a 2-core CPU, less on a GPU.

Examples:
  cryogs demo --out demo
  cryogs demo --out demo --particles 4000 --snr 0.5 --device cuda
  cryogs demo --out demo --init random
"""
from pathlib import Path

from cryogs.commands._options import (
    add_compute_args,
    add_pixel_size_arg,
    add_progress_arg,
    positive_float,
    positive_int,
)

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "data" / "adk_open.pdb"


def add_args(parser):
    parser.add_argument("--out", "-o", type=Path, default=Path("cryogs-demo"),
                        help="output folder; it must be new or empty (see --overwrite) (default: cryogs-demo)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the files of the same names")
    parser.add_argument("--particles", "-n", type=positive_int, default=1000,
                        help="number of particles (default: 1000)")
    parser.add_argument("--box", type=positive_int, default=48, help="box size in pixels (default: 48)")
    add_pixel_size_arg(parser, default=2.0, help="pixel size in Å (default: 2.0)")
    parser.add_argument("--snr", type=positive_float, default=1.0, help="signal-to-noise ratio of the images (default: 1)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs (default: from the particle count)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--init", choices=["auto", "backproject", "random"], default="auto",
                        help="start on the Wiener-filtered backprojection of the particles, from random Gaussians "
                             "in the particle sphere, or choose as 'cryogs reconstruct' does (default: auto)")
    add_progress_arg(parser)
    add_compute_args(parser)


def main(args):
    import time

    from cryogs.analysis.evaluate import compare_maps_files
    from cryogs.commands._run_folder import RunFolder
    from cryogs.commands.reconstruct import initial_model
    from cryogs.io.load import load_particles
    from cryogs.io.progress import Report
    from cryogs.reconstruct.config import default_config, default_mask_radius
    from cryogs.reconstruct.fit import planned_steps, run_training
    from cryogs.simulate import load_source, simulate_stack, write_dataset

    t0 = time.perf_counter()
    folder = RunFolder.prepare(args)
    report = Report(bars=not args.no_progress)
    with folder.claimed():
        p = args.pixel_size
        report.line(f"simulating {args.particles} particles of adenylate kinase ({args.box} px, {p} Å/px, "
                    f"SNR {args.snr})")
        truth = load_source(EMBEDDED_MODEL, pixel_size=p)
        stack = simulate_stack(truth, args.particles, box_size=args.box, pixel_size=p, snr=args.snr,
                               max_shift=2 * p, seed=args.seed, device=args.device, backend=args.backend,
                               progress=report.bars)
        files = write_dataset(args.out / "data", truth, stack, box_size=args.box, pixel_size=p)
        particles = load_particles(files["star"])
        config = default_config(particles, epochs=args.epochs, seed=args.seed, device=args.device,
                                backend=args.backend, init=args.init)
        report.line(f"reconstructing with {config.n_gaussians} Gaussians (start: {args.init}) for {config.epochs} "
                    f"epochs on {config.device}")
        start = initial_model([args.init], config.n_gaussians, args.seed, args.device, report)
        run_dir = args.out / "reconstruction"
        report.plan(planned_steps(len(particles), config))
        trainer = run_training(particles, config, run_dir, command=args.command_line, initial=start,
                               report=report)
        volume = trainer.volume()
        result = compare_maps_files(volume, particles.pixel_size, files["map"], args.out / "fsc.png",
                                    mask_radius=default_mask_radius(particles))
        trainer.write_outputs(result, volume)
        folder.finish()
    print(f"FSC against the ground truth: {result['fsc_0.5_angstrom']:.2f} Å at 0.5, "
          f"{result['fsc_0.143_angstrom']:.2f} Å at 0.143 (Nyquist {2 * p:.2f} Å); "
          f"map correlation {result['correlation']:.4f}")
    print(f"map: {run_dir / 'map.mrc'}; figures: {run_dir}/loss.png, montage.png, {args.out / 'fsc.png'}; "
          f"total {time.perf_counter() - t0:.0f} s")
