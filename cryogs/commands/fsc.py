"""Fourier shell correlation between two maps of the same box and voxel size.

Prints the resolution in Å where the FSC crosses 0.5 and 0.143 and writes the curve as a
figure (default fsc.png beside MAP1) and as a table (.txt, frequency in 1/Å and FSC).

Examples:
  cryogs fsc half1.mrc half2.mrc
  cryogs fsc run1/map.mrc sim/gt_map.mrc --mask-radius 40 --out run1/fsc_gt.png
"""
from pathlib import Path

import numpy as np

from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("map1", type=Path, help="first map (.mrc)")
    parser.add_argument("map2", type=Path, help="second map (.mrc)")
    parser.add_argument("--mask-radius", type=float, default=None,
                        help="radius in Å of a soft spherical mask applied to both maps (default: no mask)")
    parser.add_argument("--apix", type=float, default=None,
                        help="voxel size in Å, overriding the headers (default: from MAP1's header)")
    parser.add_argument("--out", "-o", type=Path, default=None, help="figure path (default: fsc.png beside MAP1)")


def main(args):
    from cryogs.analysis.fsc import fsc, plot_fsc, resolution_at
    from cryogs.io.atomic import atomic_path
    from cryogs.io.mrc import read_mrc

    v1, vs1 = read_mrc(args.map1)
    v2, vs2 = read_mrc(args.map2)
    apix = args.apix if args.apix is not None else vs1[0]
    if args.apix is None:
        if len(set(np.round(vs1, 4))) != 1:
            raise CryogsError(f"{args.map1}: voxels are not cubic ({vs1} Å); resample the map first")
        if not np.allclose(vs1, vs2, rtol=1e-3):
            raise CryogsError(f"voxel sizes differ: {args.map1} has {vs1[0]:.4g} Å, {args.map2} {vs2[0]:.4g} Å")
    if v1.shape != v2.shape:
        raise CryogsError(f"box sizes differ: {args.map1} is {v1.shape}, {args.map2} is {v2.shape}")
    freqs, curve = fsc(v1, v2, pixel_size=apix, mask_radius=args.mask_radius)
    r5, r143 = resolution_at(freqs, curve, 0.5), resolution_at(freqs, curve, 0.143)
    out = args.out or args.map1.with_name("fsc.png")
    plot_fsc(out, {f"{args.map1.name} vs {args.map2.name}": (freqs, curve)},
             title=f"FSC: {r5:.2f} Å at 0.5, {r143:.2f} Å at 0.143")
    with atomic_path(out.with_suffix(".txt")) as tmp:
        np.savetxt(tmp, np.stack([freqs, curve], 1), fmt="%.6f", header="frequency_1/A fsc")
    note = " (Nyquist-limited)" if r143.nyquist_limited else ""
    print(f"FSC 0.5: {r5:.2f} Å")
    print(f"FSC 0.143: {r143:.2f} Å{note}")
    print(f"wrote {out} and {out.with_suffix('.txt')}")
