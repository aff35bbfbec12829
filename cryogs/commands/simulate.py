"""Simulate particle images with known poses from a Gaussian model or an atomic model.

Writes DIR/particles.mrcs, DIR/particles.star (RELION 3.1, poses and origins in Å), the
ground-truth map DIR/gt_map.mrc and the ground-truth Gaussians DIR/gt_gaussians.npz.

From an atomic model (PDB or mmCIF), every atom is a small Gaussian (σ² = B/8π² + pixel²,
amplitude = atomic number), so images come from the atoms, not from a model cryogs later fits.

Noise: white Gaussian noise at the given SNR, defined as the variance of the noise-free
projections (over all pixels of the box, averaged over particles) divided by the noise variance.

Examples:
  cryogs simulate model.pdb --out sim -n 2000 --box 64 --apix 1.5 --snr 0.5
  cryogs simulate gaussians.npz --out sim -n 500 --box 48 --apix 2 --max-shift 4
  cryogs simulate model.pdb --out sim --box 64 --apix 1.5 --snr 0.1 --defocus 10000 25000
"""
import math
from pathlib import Path

from cryogs.commands._options import add_compute_args
from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("source", type=Path, help="Gaussian model (.npz, .pt) or atomic model (.pdb, .cif)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument("-n", "--particles", type=int, default=1000, help="number of particles (default: 1000)")
    parser.add_argument("--box", type=int, default=64, help="box size D in pixels (default: 64)")
    parser.add_argument("--apix", type=float, default=1.5, help="pixel size in Å (default: 1.5)")
    parser.add_argument("--snr", type=float, default=math.inf,
                        help="signal-to-noise ratio, var(signal)/var(noise) over the box (default: inf, no noise)")
    parser.add_argument("--max-shift", type=float, default=0.0,
                        help="origins drawn uniformly in ±MAX_SHIFT Å on each axis (default: 0)")
    parser.add_argument("--defocus", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="apply a CTF with defocus U uniform in [MIN, MAX] Å (RELION sign, 300 kV, Cs 2.7 mm, "
                             "amplitude contrast 0.1, up to 300 Å astigmatism); default: no CTF")
    parser.add_argument("--seed", type=int, default=0, help="random seed for poses, CTF and noise (default: 0)")
    add_compute_args(parser)


def main(args):
    from cryogs.simulate import load_source, random_ctf_params, simulate_stack, write_dataset

    if not args.source.exists():
        raise CryogsError(f"{args.source}: no such file")
    if args.apix <= 0:
        raise CryogsError(f"--apix must be positive, got {args.apix}")
    model = load_source(args.source, pixel_size=args.apix)
    ctf = None if args.defocus is None else random_ctf_params(args.particles, tuple(args.defocus), seed=args.seed)
    stack = simulate_stack(model, args.particles, box_size=args.box, pixel_size=args.apix, snr=args.snr,
                           max_shift=args.max_shift, seed=args.seed, device=args.device, backend=args.backend,
                           progress=True, ctf=ctf)
    files = write_dataset(args.out, model, stack, box_size=args.box, pixel_size=args.apix)
    print(f"wrote {args.particles} particles ({args.box} px, {args.apix} Å/px, noise σ = {stack.noise_sigma:.4g}) "
          f"to {files['star']}")
