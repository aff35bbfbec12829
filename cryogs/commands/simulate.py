"""Simulate particle images with known poses from a Gaussian model or an atomic model.

Writes DIR/particles.mrcs, DIR/particles.star (RELION 3.1, poses and origins in Å), the
ground-truth map DIR/gt_map.mrc, the ground-truth Gaussians DIR/gt_gaussians.npz, command.txt and
run.json. DIR must be new or empty, unless --overwrite.

From an atomic model (PDB or mmCIF), every atom is a small Gaussian (σ² = B/8π² + pixel²,
amplitude = atomic number), so images come from the atoms, not from a model cryogs later fits.

Noise: white Gaussian noise at the given SNR, defined as the variance of the noise-free
projections (over all pixels of the box, averaged over particles) divided by the noise variance.

Examples:
  cryogs simulate model.pdb --out sim --particles 2000 --box 64 --pixel-size 1.5 --snr 0.5
  cryogs simulate gaussians.npz --out sim -n 500 --box 48 --pixel-size 2 --max-shift 4
  cryogs simulate model.pdb --out sim --box 64 --pixel-size 1.5 --snr 0.1 --defocus 10000 25000
"""
import math
import sys
from pathlib import Path

from cryogs.commands._options import (
    add_compute_args,
    add_output_args,
    add_pixel_size_arg,
    add_progress_arg,
    non_negative_float,
    positive_float,
    positive_int,
)
from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("source", type=Path, help="Gaussian model (.npz, .pt) or atomic model (.pdb, .cif)")
    add_output_args(parser)
    parser.add_argument("--particles", "-n", type=positive_int, default=1000,
                        help="number of particles (default: 1000)")
    parser.add_argument("--box", type=positive_int, default=64, help="box size D in pixels (default: 64)")
    add_pixel_size_arg(parser, default=1.5, help="pixel size in Å (default: 1.5)")
    parser.add_argument("--snr", type=positive_float, default=math.inf,
                        help="signal-to-noise ratio, var(signal)/var(noise) over the box (default: inf, no noise)")
    parser.add_argument("--max-shift", type=non_negative_float, default=0.0,
                        help="origins drawn uniformly in ±MAX_SHIFT Å on each axis (default: 0)")
    parser.add_argument("--defocus", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="apply a CTF with defocus U uniform in [MIN, MAX] Å (RELION sign, 300 kV, Cs 2.7 mm, "
                             "amplitude contrast 0.1, up to 300 Å astigmatism); default: no CTF")
    parser.add_argument("--seed", type=int, default=0, help="random seed for poses, CTF and noise (default: 0)")
    add_progress_arg(parser)
    add_compute_args(parser)


def main(args):
    from cryogs.commands._run_folder import RunFolder
    from cryogs.simulate import load_source, random_ctf_params, simulate_stack, write_dataset

    if not args.source.is_file():
        raise CryogsError(f"{args.source}: no such file")
    if args.defocus is not None and not 0 < args.defocus[0] <= args.defocus[1]:
        raise CryogsError(f"--defocus {args.defocus[0]:g} {args.defocus[1]:g}: give MIN ≤ MAX, both positive (Å, "
                          "underfocus as in RELION)")
    folder = RunFolder.prepare(args)
    model = load_source(args.source, pixel_size=args.pixel_size)
    ctf = None if args.defocus is None else random_ctf_params(args.particles, tuple(args.defocus), seed=args.seed)
    with folder.claimed():
        stack = simulate_stack(model, args.particles, box_size=args.box, pixel_size=args.pixel_size, snr=args.snr,
                               max_shift=args.max_shift, seed=args.seed, device=args.device, backend=args.backend,
                               progress=not args.no_progress and sys.stderr.isatty(), ctf=ctf)
        files = write_dataset(args.out, model, stack, box_size=args.box, pixel_size=args.pixel_size)
        folder.finish()
    print(f"wrote {args.particles} particles ({args.box} px, {args.pixel_size} Å/px, noise σ = "
          f"{stack.noise_sigma:.4g}) to {files['star']}")
