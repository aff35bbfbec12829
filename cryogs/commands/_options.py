"""Options shared by several subcommands."""
from pathlib import Path

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_compute_args(parser, *, backend: bool = True) -> None:
    """``--device`` and, for commands that project Gaussians, ``--backend``."""
    parser.add_argument("--device", default=default_device(),
                        help="torch device to compute on (default: cuda if a GPU is visible, else cpu)")
    if not backend:
        return
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "torch", "dense"],
                        help="projection backend: auto picks the CUDA kernels on a GPU when built, else the "
                             "torch splat; dense is the exact (slow) reference (default: auto)")


def add_particle_args(parser) -> None:
    """The particle input: the positional particle file and the options that locate and select the images."""
    parser.add_argument("particles", type=Path,
                        help="particles with poses: a RELION STAR file (3.0, 3.1 or 5), a cryoSPARC .cs file, or a "
                             "cryoDRGN-style .mrcs stack / .txt list of stacks (with --poses)")
    parser.add_argument("--datadir", type=Path, default=None,
                        help="folder to find the stacks in (default: paths relative to the particle file)")
    parser.add_argument("--poses", type=Path, default=None,
                        help="cryoDRGN pose.pkl, (rot, trans) or rotations only; needed for .mrcs/.txt input")
    parser.add_argument("--ctf", type=Path, default=None, help="cryoDRGN ctf.pkl for .mrcs/.txt input")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="pixel size in Å for .mrcs/.txt input when no ctf.pkl gives it")
    parser.add_argument("--optics-groups", type=int, nargs="+", default=None, metavar="N",
                        help="RELION optics groups to use (default: all; they must share one pixel size)")
    parser.add_argument("--ind", type=Path, default=None,
                        help="index file (.pkl, .npy or .txt of 0-based particle indices) selecting a subset")
    parser.add_argument("--invert", action="store_true", help="flip the contrast of the images (multiply by −1)")
    parser.add_argument("--downsample", type=int, default=None, metavar="D",
                        help="Fourier-crop the images to D pixels (the pixel size grows by box/D)")


def load_particles_from_args(args):
    """Load and check the particles named by the options of ``add_particle_args``; returns a ParticleSet."""
    from cryogs.io.load import load_particles

    extra = {} if args.optics_groups is None else {"optics_groups": args.optics_groups}
    particles = load_particles(args.particles, datadir=args.datadir, poses=args.poses, ctf=args.ctf,
                               pixel_size=args.pixel_size, ind=args.ind, invert=args.invert,
                               downsample=args.downsample, **extra)
    particles.check_stacks()
    if particles.ctf is None:
        print("note: the particles carry no defocus values, so they are reconstructed without a CTF")
    return particles
