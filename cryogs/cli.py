"""The ``cryogs`` command: one entry point with subcommands, in the manner of cryoDRGN's tool."""
from __future__ import annotations

import argparse
import importlib
import sys

from cryogs.errors import CryogsError

COMMANDS = {
    "simulate": "simulate particle images with known poses from a Gaussian or atomic model",
    "reconstruct": "fit Gaussians to particles with known poses and write the map",
    "backproject": "voxel baseline: direct Fourier inversion of particles with known poses (CTF Wiener, half maps)",
    "fsc": "Fourier shell correlation between two maps",
    "demo": "simulate, reconstruct and evaluate the embedded adenylate kinase example",
    "info": "versions, torch build, CUDA extension and GPU",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryogs", description="3D Gaussian splatting for cryo-EM reconstruction.",
        epilog="Run 'cryogs COMMAND --help' for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"cryogs.commands.{name}")
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(run=module.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CryogsError as exc:
        print(f"cryogs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryogs {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
