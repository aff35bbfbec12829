"""Voxel baseline: reconstruct a map from particles with known poses by direct Fourier inversion.

Every image is inserted as a central slice into a 3D Fourier grid (padded twice, trilinear
gridding, |k| density compensation, gridding correction), weighted by its CTF; the map is
Σ CTF·F / (Σ CTF² + λ) with a Wiener regularisation λ per shell estimated from the half-map FSC.
Use it to compare cryogs with a conventional voxel reconstruction of the same particles.

Outputs in DIR (new or empty, unless --overwrite): map.mrc (the Wiener-regularised
reconstruction from all particles), half1.mrc and half2.mrc (independent halves, split by
rlnRandomSubset when present, else at random, not regularised, for the FSC), half_split.star
(each particle's half as _rlnRandomSubset), fsc.png (half-map FSC with a soft spherical mask),
slices.png, metrics.json (FSC 0.143 and 0.5 in Å, mask, wall time, device), command.txt and
run.json. Maps carry the voxel size, so they open at scale in ChimeraX. With --reference also the
FSC against a known map (fsc_reference.png, same mask). With --no-half-maps only map.mrc,
slices.png and metrics.json, regularised by the constant --wiener (default: none).

Examples:
  cryogs backproject particles.star --out bp1
  cryogs backproject particles.star --out bp1 --datadir /data/Extract --reference gt_map.mrc
  cryogs backproject J24_particles.cs --out bp2 --datadir /data/cryosparc/P12 --downsample 128
  cryogs backproject particles.mrcs --poses pose.pkl --ctf ctf.pkl --out bp3 --device cuda
  cryogs backproject particles.star --out bp4 --no-half-maps --wiener 0.1
"""
from pathlib import Path

from cryogs.commands._options import (
    add_compute_args,
    add_output_args,
    add_particle_args,
    add_progress_arg,
    non_negative_float,
    positive_float,
    positive_int,
)
from cryogs.errors import CryogsError


def add_args(parser):
    add_particle_args(parser)
    add_output_args(parser)
    parser.add_argument("--no-half-maps", action="store_true",
                        help="reconstruct all particles once, without half maps, FSC or FSC-based regularisation")
    parser.add_argument("--wiener", type=non_negative_float, default=None, metavar="LAMBDA",
                        help="constant Wiener regularisation added to Σ CTF² in every Fourier voxel, in units of "
                             "one image's weight (the inverse SNR of one image); replaces the per-shell value "
                             "estimated from the half-map FSC (default: from the FSC, or none with "
                             "--no-half-maps)")
    parser.add_argument("--mask-radius", type=positive_float, default=None,
                        help="radius in Å (not a diameter, not pixels) of the soft spherical mask of the FSCs, "
                             "half-map and --reference (default: the particle radius estimated from the images, "
                             "plus 4 pixels, as 'cryogs reconstruct')")
    parser.add_argument("--reference", type=Path, default=None,
                        help="known map to report the FSC against (its box and voxel size must match the "
                             "particles', after --downsample; checked before the run starts)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random half split when the particles carry no rlnRandomSubset (default: 0)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images inserted at a time (default: 64)")
    add_progress_arg(parser)
    add_compute_args(parser, backend=False)  # no Gaussians are projected


def main(args):
    from cryogs.analysis.evaluate import check_reference
    from cryogs.analysis.fsc import check_mask_radius
    from cryogs.commands._options import load_particles_from_args
    from cryogs.commands._run_folder import RunFolder
    from cryogs.io.progress import Report
    from cryogs.reconstruct.backproject import run_backproject

    if args.no_half_maps and args.mask_radius is not None and args.reference is None:
        raise CryogsError("--mask-radius sets the mask of the FSCs, and --no-half-maps without --reference has none")
    folder = RunFolder.prepare(args)
    report = Report(bars=not args.no_progress)
    report.line(f"set-up: reading {args.particles}")
    particles = load_particles_from_args(args)
    if args.reference is not None:
        check_reference(args.reference, particles.box_size, particles.pixel_size)
    if args.mask_radius is not None:
        check_mask_radius(args.mask_radius, particles.pixel_size)
    if not args.no_half_maps and len(particles) < 2:
        raise CryogsError(f"half maps need at least 2 particles, got {len(particles)} (or give --no-half-maps)")
    report.line(f"{len(particles)} particles, {particles.box_size} px, {particles.pixel_size:.4g} Å/px; "
                f"direct Fourier inversion on {args.device}")
    with folder.claimed():
        metrics = run_backproject(particles, args.out, half_maps=not args.no_half_maps, seed=args.seed,
                                  mask_radius=args.mask_radius, reference=args.reference, wiener=args.wiener,
                                  device=args.device, batch_size=args.batch_size, report=report)
        folder.finish()
    line = f"done in {metrics['wall_seconds']:.1f} s"
    if "fsc_half_0.143_angstrom" in metrics:
        note = " (Nyquist-limited)" if metrics["fsc_half_nyquist_limited"] else ""
        line += f"; half-map FSC 0.143: {metrics['fsc_half_0.143_angstrom']:.2f} Å{note}"
    if "fsc_0.5_angstrom" in metrics:
        line += f"; FSC vs reference at 0.5: {metrics['fsc_0.5_angstrom']:.2f} Å"
    print(f"{line}; outputs in {args.out}")
