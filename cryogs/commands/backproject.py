"""Voxel baseline: reconstruct a map from particles with known poses by direct Fourier inversion.

Every image is inserted as a central slice into a 3D Fourier grid (padded twice, trilinear
gridding, |k| density compensation, gridding correction), weighted by its CTF; the map is
Σ CTF·F / (Σ CTF² + λ) with a Wiener regularisation λ per shell estimated from the half-map FSC.
Use it to compare cryogs with a conventional voxel reconstruction of the same particles.

Outputs in DIR: map.mrc (the Wiener-regularised reconstruction from all particles), half1.mrc
and half2.mrc (independent halves, split by rlnRandomSubset when present, else at random, not
regularised, for the FSC), fsc.png (half-map FSC with a soft spherical mask), slices.png and
metrics.json (FSC 0.143 and 0.5 in Å, wall time, device). Maps carry the voxel size, so they open at scale in ChimeraX. With --reference also the
FSC against a known map (fsc_reference.png). With --no-half-maps only map.mrc, slices.png and
metrics.json, regularised by the constant --wiener (default: none).

Examples:
  cryogs backproject particles.star --out bp1
  cryogs backproject particles.star --out bp1 --datadir /data/Extract --reference gt_map.mrc
  cryogs backproject J24_particles.cs --out bp2 --datadir /data/cryosparc/P12 --downsample 128
  cryogs backproject particles.mrcs --poses pose.pkl --ctf ctf.pkl --out bp3 --device cuda
  cryogs backproject particles.star --out bp4 --no-half-maps --wiener 0.1
"""
from pathlib import Path

from cryogs.commands._options import add_compute_args, add_particle_args, load_particles_from_args
from cryogs.errors import CryogsError


def add_args(parser):
    add_particle_args(parser)
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument("--no-half-maps", action="store_true",
                        help="reconstruct all particles once, without half maps, FSC or FSC-based regularisation")
    parser.add_argument("--wiener", type=float, default=None, metavar="LAMBDA",
                        help="constant Wiener regularisation added to Σ CTF² in every Fourier voxel, in units of "
                             "one image's weight (the inverse SNR of one image); replaces the per-shell value "
                             "estimated from the half-map FSC (default: from the FSC, or none with "
                             "--no-half-maps)")
    parser.add_argument("--mask-radius", type=float, default=None,
                        help="radius in Å of the soft spherical mask for the half-map FSC (default: particle "
                             "radius estimated from the images, plus 4 pixels)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="known map to report the FSC against (its box and voxel size must match)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random half split when the particles carry no rlnRandomSubset (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images inserted at a time (default: 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    add_compute_args(parser, backend=False)  # no Gaussians are projected


def main(args):
    from cryogs.reconstruct.backproject import run_backproject

    if args.wiener is not None and args.wiener < 0:
        raise CryogsError(f"--wiener must be non-negative, got {args.wiener}")
    if args.no_half_maps and args.mask_radius is not None:
        raise CryogsError("--mask-radius sets the mask of the half-map FSC, which --no-half-maps skips")
    particles = load_particles_from_args(args)
    print(f"{len(particles)} particles, {particles.box_size} px, {particles.pixel_size:.4g} Å/px; "
          f"direct Fourier inversion on {args.device}")
    metrics = run_backproject(particles, args.out, half_maps=not args.no_half_maps, seed=args.seed,
                              mask_radius=args.mask_radius, reference=args.reference, wiener=args.wiener,
                              device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    line = f"done in {metrics['wall_seconds']:.1f} s"
    if "fsc_half_0.143_angstrom" in metrics:
        note = " (Nyquist-limited)" if metrics["fsc_half_nyquist_limited"] else ""
        line += f"; half-map FSC 0.143: {metrics['fsc_half_0.143_angstrom']:.2f} Å{note}"
    if "fsc_0.5_angstrom" in metrics:
        line += f"; FSC vs reference at 0.5: {metrics['fsc_0.5_angstrom']:.2f} Å"
    print(f"{line}; outputs in {args.out}")
