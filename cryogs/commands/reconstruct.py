"""Fit 3D Gaussians to particle images with known poses (min Σ‖I − Γ(θ, pose)‖²) and write the map.

Outputs in DIR: map.mrc (voxel size set, opens at scale in ChimeraX), gaussians.npz/.pt/.ply,
loss.png, montage.png (data, model and residual for a few particles), metrics.json, config.json,
command.txt and checkpoint.pt (written every epoch; continue a stopped run with --resume).

Defaults follow from the data: the particle radius and mass are estimated from the mean image,
the number of Gaussians from the particle volume, and the epochs from the particle count.

Examples:
  cryogs reconstruct particles.star --out run1
  cryogs reconstruct particles.star --out run1 --datadir /data/Extract --gaussians 3000 --epochs 30
  cryogs reconstruct particles.star --out run1 --resume
  python -m cryogs reconstruct particles.star --out run1 --device cuda --reference gt_map.mrc
"""
import json
import shlex
import sys
from pathlib import Path

from cryogs.commands._options import add_compute_args
from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("particles", type=Path, help="RELION STAR file (3.0, 3.1 or 5) with poses")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument("--datadir", type=Path, default=None,
                        help="folder to find the stacks in (default: paths relative to the STAR file)")
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
    parser.add_argument("--reference", type=Path, default=None,
                        help="known map to report the FSC against (its voxel size must match)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    add_compute_args(parser)


def main(args):
    from cryogs.particles import load_particles
    from cryogs.train import TrainConfig, default_config, run_training

    particles = load_particles(args.particles, datadir=args.datadir)
    checkpoint = args.out / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise CryogsError(f"--resume: no checkpoint at {checkpoint}")
        config = TrainConfig.from_dict(json.loads((args.out / "config.json").read_text()))
    else:
        config = default_config(
            particles, n_gaussians=args.gaussians, epochs=args.epochs, batch_size=args.batch_size,
            lr_means=args.lr_means, lr_scales=args.lr_scales, lr_quats=args.lr_quats,
            lr_amplitudes=args.lr_amplitudes, seed=args.seed, device=args.device, backend=args.backend)
    print(f"{len(particles)} particles, {particles.box_size} px, {particles.pixel_size:.4g} Å/px; "
          f"{config.n_gaussians} Gaussians, {config.epochs} epochs on {config.device}")
    trainer = run_training(particles, config, args.out, resume=args.resume, progress=not args.no_progress,
                           command=shlex.join(["cryogs", *sys.argv[1:]]))
    extra = {}
    if args.reference is not None:
        from cryogs.evaluate import compare_maps_files

        extra = compare_maps_files(trainer.volume(), particles.pixel_size, args.reference, args.out / "fsc.png")
    metrics = trainer.write_outputs(extra)
    line = f"done in {metrics['train_seconds']:.0f} s ({metrics['images_per_second']:.0f} images/s)"
    if "fsc_0.5_angstrom" in metrics:
        line += f"; FSC vs reference: {metrics['fsc_0.5_angstrom']:.2f} Å at 0.5, {metrics['fsc_0.143_angstrom']:.2f} Å at 0.143"
    print(f"{line}; outputs in {args.out}")
