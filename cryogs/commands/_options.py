"""Options shared by several subcommands, and the checks argparse applies to their values.

Nothing here imports torch at module level: building the parser (``cryogs --help``) stays instant.
A check that fails is an argparse error, which ``cryogs.cli`` prints as one line.
"""
import argparse
import math
from pathlib import Path


def _number(text: str, kind, what: str, ok) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (ok(value) and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (a count or a size: 0 would produce nothing)."""
    return _number(text, int, "a whole number ≥ 1", lambda v: v >= 1)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number ≥ 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    return _number(text, float, "a fraction in [0, 1]", lambda v: 0 <= v <= 1)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(text: str) -> str:
    """A torch device that exists here; ``auto`` is cuda when a GPU is visible, else cpu."""
    import torch

    if text == "auto":
        return default_device()
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible here (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: cryogs runs on cpu or cuda devices")
    return text


#: The projection backends, as cryogs.render.project.BACKENDS (kept here so the parser imports no torch;
#: tests/test_cpu_backend.py checks the two agree).
BACKEND_CHOICES = ("auto", "cuda", "cpu", "torch", "dense")


def add_compute_args(parser, *, backend: bool = True) -> None:
    """``--device`` and, for commands that project Gaussians, ``--backend``."""
    parser.add_argument("--device", type=device_name, default="auto",
                        help="torch device to compute on: cpu, cuda or cuda:N (default: auto, cuda if a GPU is "
                             "visible, else cpu)")
    if not backend:
        return
    parser.add_argument("--backend", default="auto", choices=list(BACKEND_CHOICES),
                        help="projection backend: auto picks the CUDA kernels on a GPU and the cpu kernels "
                             "(OpenMP) on the CPU when the extension is built, else the torch splat; dense is "
                             "the exact (slow) reference (default: auto)")


def add_pixel_size_arg(parser, *, default, help: str) -> None:
    """``--pixel-size`` (Å), the one name for it in every command; ``--apix`` is kept as a hidden alias."""
    parser.add_argument("--pixel-size", type=positive_float, default=default, help=help)
    parser.add_argument("--apix", dest="pixel_size", type=positive_float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


def add_output_args(parser, *, what: str = "output folder") -> None:
    """``--out DIR`` and ``--overwrite``: a run never writes into a folder holding other files unless asked."""
    parser.add_argument("--out", "-o", type=Path, required=True,
                        help=f"{what}; it must be new or empty (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the files of the same names (files of an "
                             "earlier run that this one does not write stay)")


def add_progress_arg(parser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars; the one-line reports per stage and per epoch (with the time "
                             "elapsed and left) are still printed. Bars are also off when stderr is not a "
                             "terminal (a log file)")


def add_particle_args(parser, *, resumable: bool = False, poses: bool = True) -> None:
    """The particle input: the positional particle file and the options that locate and select the images.
    With ``resumable`` the file may be left out with --resume (the run record names it); without
    ``poses`` (ab initio) poses in the file are ignored and there is no --poses."""
    what = "particles with poses" if poses else "particle images (poses in them are ignored)"
    stack = "with --poses" if poses else "with --ctf"
    parser.add_argument("particles", type=Path, nargs="?" if resumable else None,
                        help=f"{what}: a RELION STAR file (3.0, 3.1 or 5), a cryoSPARC .cs file, or a "
                             f"cryoDRGN-style .mrcs stack / .txt list of stacks ({stack})"
                             + ("; may be left out with --resume" if resumable else ""))
    parser.add_argument("--datadir", type=Path, default=None,
                        help="folder to find the stacks in (default: paths relative to the particle file)")
    if poses:
        parser.add_argument("--poses", type=Path, default=None,
                            help="cryoDRGN pose.pkl, (rot, trans) or rotations only; needed for .mrcs/.txt input")
    parser.add_argument("--ctf", type=Path, default=None, help="cryoDRGN ctf.pkl for .mrcs/.txt input")
    add_pixel_size_arg(parser, default=None,
                       help="pixel size in Å for .mrcs/.txt input when no ctf.pkl gives it")
    parser.add_argument("--optics-groups", type=int, nargs="+", default=None, metavar="N",
                        help="RELION optics groups to use (default: all; they must share one pixel size)")
    parser.add_argument("--ind", type=Path, default=None,
                        help="index file (.pkl, .npy or .txt of 0-based particle indices) selecting a subset")
    parser.add_argument("--invert", action="store_true", help="flip the contrast of the images (multiply by −1)")
    parser.add_argument("--downsample", type=positive_int, default=None, metavar="BOX",
                        help="target box size in pixels: Fourier-crop the images to BOX×BOX (e.g. 128 for 256-px "
                             "particles); the pixel size grows by box/BOX (default: the images' box)")


def load_particles_from_args(args, *, poses: bool = True):
    """Load and check the particles named by the options of ``add_particle_args`` (with the same
    ``poses``: without, poses are not needed and those in the file are dropped); returns a ParticleSet."""
    from cryogs.io.load import load_particles

    extra = {} if args.optics_groups is None else {"optics_groups": args.optics_groups}
    particles = load_particles(args.particles, datadir=args.datadir, poses=args.poses if poses else None,
                               ctf=args.ctf, pixel_size=args.pixel_size, ind=args.ind, invert=args.invert,
                               downsample=args.downsample, require_poses=poses, **extra)
    particles.check_stacks()
    if not poses and particles.rotations is not None:
        print("note: the poses in the particle file are ignored: ab initio finds its own")
    if particles.ctf is None:
        print("note: the particles carry no defocus values, so no CTF is applied")
    return particles
