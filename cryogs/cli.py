"""The ``cryogs`` command: one entry point with subcommands, in the manner of cryoDRGN's tool.

Building the parser imports every command module, but none of them imports torch, numpy or
matplotlib at module level: ``cryogs --help`` and ``cryogs COMMAND --help`` answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from cryogs import __version__
from cryogs.errors import CryogsError

COMMANDS = {
    "simulate": "simulate particle images with known poses from a Gaussian or atomic model",
    "reconstruct": "fit Gaussians to particles with known poses and write the map",
    "abinitio": "find poses and a first map from particle images alone (ab initio, no reference)",
    "backproject": "voxel baseline: direct Fourier inversion of particles with known poses (CTF Wiener, half maps)",
    "fsc": "Fourier shell correlation between two maps",
    "align": "align a map onto a reference (rotation, translation, hand), then their FSC",
    "flip": "mirror a map (flip its hand), keeping its voxel size",
    "demo": "simulate, reconstruct and evaluate the embedded adenylate kinase example",
    "info": "versions, torch build, CUDA extension, cpu backend and GPU",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument error is one line on stderr (exit 2), like every other cryogs error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="cryogs", description="3D Gaussian splatting for cryo-EM reconstruction.",
        epilog="Run 'cryogs COMMAND --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"cryogs {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"cryogs.commands.{name}")
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(run=module.main, parser=p)
    return parser


def _interrupted(args, argv: list[str]) -> str:
    """What to say on Ctrl-C: how to continue, where the command can."""
    if getattr(args, "resume", None) is not None and getattr(args, "out", None) is not None:
        return (f"interrupted; continue from the last checkpoint with: "
                f"cryogs {args.command} --out {shlex.quote(str(args.out))} --resume")
    if getattr(args, "out", None) is not None:
        return f"interrupted; {args.command} cannot resume: run it again with --overwrite"
    return "interrupted"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argument error (already printed as one line)
        return exc.code
    args.command_line = shlex.join(["cryogs", *argv])  # for command.txt
    try:
        args.run(args)
    except CryogsError as exc:
        print(f"cryogs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryogs {args.command}: {_interrupted(args, argv)}", file=sys.stderr)
        return 130
    return 0
