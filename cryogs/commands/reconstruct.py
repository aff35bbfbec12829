"""Fit 3D Gaussians to particle images with known poses (min Σ‖I − Γ(θ, pose)‖²) and write the map.

Outputs in DIR: map.mrc (voxel size set, opens at scale in ChimeraX), gaussians.npz/.pt/.ply,
loss.png, montage.png (data, model and residual for a few particles), metrics.json, config.json,
command.txt and checkpoint.pt (written every epoch; continue a stopped run with --resume, which
reuses the saved configuration). With --half-maps: half1.mrc, half2.mrc, map.mrc (their
average), fsc.png and metrics.json in DIR, and each half's own outputs in DIR/half1, DIR/half2.

The CTF of every particle (RELION's formula and sign) is applied to the rendered images when the
STAR file has defocus columns; particles without them are reconstructed without a CTF.

Defaults follow from the data: the particle radius and mass are estimated from the mean image,
the number of Gaussians from the particle volume, and the epochs from the particle count.

Examples:
  cryogs reconstruct particles.star --out run1
  cryogs reconstruct particles.star --out run1 --datadir /data/Extract --gaussians 3000 --epochs 30
  cryogs reconstruct particles.star --out run1 --resume
  cryogs reconstruct particles.star --out run1 --half-maps --reference emd_1234.mrc
  cryogs reconstruct J24_particles.cs --out run2 --datadir /data/cryosparc/P12 --downsample 128
  cryogs reconstruct particles.mrcs --poses pose.pkl --ctf ctf.pkl --ind keep.pkl --out run3
  python -m cryogs reconstruct particles.star --out run1 --device cuda --reference gt_map.mrc
"""
import json
import shlex
from dataclasses import asdict
import sys
from pathlib import Path

from cryogs.commands._options import add_compute_args, add_particle_args, load_particles_from_args
from cryogs.errors import CryogsError


def add_args(parser):
    add_particle_args(parser)
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument("--gaussians", "-n", type=int, default=None,
                        help="number of Gaussians (default: from the particle volume)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the particles (default: from count)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 32)")
    parser.add_argument("--lr-means", type=float, default=None, help="initial step for the centres, Å (default: 0.5 px)")
    parser.add_argument("--lr-scales", type=float, default=None, help="initial step for the log-scales (default: 0.02)")
    parser.add_argument("--lr-quats", type=float, default=None, help="initial step for the rotations (default: 0.02)")
    parser.add_argument("--lr-amplitudes", type=float, default=None,
                        help="initial step for the log-amplitudes (default: 0.03)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for initialisation and order (default: 0)")
    parser.add_argument("--half-maps", action="store_true",
                        help="gold standard: fit two independent half-set models (split by rlnRandomSubset when "
                             "present, else at random), write half1.mrc, half2.mrc and their average map.mrc, and "
                             "report the half-map FSC at 0.143 with a soft spherical mask")
    parser.add_argument("--mask-radius", type=float, default=None,
                        help="radius in Å of the soft spherical mask for the half-map FSC (default: particle "
                             "radius estimated from the images, plus 4 pixels)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="known map to report the FSC against at 0.5 (its box and voxel size must match)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run in DIR from its last checkpoint, with its saved configuration "
                             "(--device and --backend may change)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    add_compute_args(parser)


def main(args):
    from cryogs.atomic import write_json
    from cryogs.evaluate import compare_maps_files
    from cryogs.gold_standard import run_half_maps
    from cryogs.train import TrainConfig, default_config, run_training

    particles = load_particles_from_args(args)
    config_file = args.out / "config.json"
    if args.resume:
        if not config_file.exists():
            raise CryogsError(f"--resume: no earlier run in {args.out} (missing {config_file})")
        config = TrainConfig.from_dict(json.loads(config_file.read_text()))
        config.device, config.backend = args.device, args.backend  # where it runs now may differ
        print(f"resuming with the configuration in {config_file}; only --device and --backend are taken "
              "from this command line")
    else:
        config = default_config(
            particles, n_gaussians=args.gaussians, epochs=args.epochs, batch_size=args.batch_size,
            lr_means=args.lr_means, lr_scales=args.lr_scales, lr_quats=args.lr_quats,
            lr_amplitudes=args.lr_amplitudes, seed=args.seed, device=args.device, backend=args.backend)
    print(f"{len(particles)} particles, {particles.box_size} px, {particles.pixel_size:.4g} Å/px; "
          f"{config.n_gaussians} Gaussians, {config.epochs} epochs on {config.device}")
    command = shlex.join(["cryogs", *sys.argv[1:]])
    progress = not args.no_progress
    if args.half_maps:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(config_file, asdict(config))
        volume, metrics = run_half_maps(particles, config, args.out, resume=args.resume, progress=progress,
                                        command=command, mask_radius=args.mask_radius)
    else:
        trainer = run_training(particles, config, args.out, resume=args.resume, progress=progress, command=command)
        volume, metrics = trainer.volume(), {}
    if args.reference is not None:
        metrics.update(compare_maps_files(volume, particles.pixel_size, args.reference,
                                          args.out / ("fsc_reference.png" if args.half_maps else "fsc.png")))
    if args.half_maps:
        write_json(args.out / "metrics.json", metrics)
    else:
        metrics = trainer.write_outputs(metrics, volume)
    line = f"done in {metrics['train_seconds']:.0f} s"
    if "fsc_half_0.143_angstrom" in metrics:
        line += f"; half-map FSC 0.143: {metrics['fsc_half_0.143_angstrom']:.2f} Å"
    if "fsc_0.5_angstrom" in metrics:
        line += f"; FSC vs reference at 0.5: {metrics['fsc_0.5_angstrom']:.2f} Å"
    print(f"{line}; outputs in {args.out}")
