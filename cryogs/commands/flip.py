"""Mirror a map (flip its hand): V'(x, y, z) = V(x, y, −z) about the box centre.

Projections cannot tell a structure from its mirror image, so an ab initio map comes out in either
hand; when it is the wrong one (α-helices turning left, a known fold mirrored), flip it. The voxel
size and origin of the header are kept.

Examples:
  cryogs flip ab1/map.mrc --out ab1/map_flipped.mrc
"""
from pathlib import Path

from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("map", type=Path, help="map to mirror (.mrc)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="the mirrored map (.mrc); replaced if it exists")


def main(args):
    from cryogs.analysis.align import mirror_map
    from cryogs.io.mrc import read_mrc, write_mrc

    volume, voxel, origin = read_mrc(args.map, return_origin=True)
    if len(set(volume.shape)) != 1:
        raise CryogsError(f"{args.map}: is {volume.shape[2]}x{volume.shape[1]}x{volume.shape[0]} voxels; cryogs "
                          "flips cubic maps")
    if args.out.resolve() == args.map.resolve():
        raise CryogsError(f"--out {args.out} is the input map; give another file")
    if args.out.is_dir():
        raise CryogsError(f"--out {args.out} is a folder; give a file name")
    write_mrc(args.out, mirror_map(volume), voxel, origin=origin)
    print(f"wrote the mirror image of {args.map} to {args.out} (voxel size {voxel[0]:.4g} Å)")
