"""Align a map onto a reference (rotation, translation and hand), then report their FSC.

An ab initio map comes out in an arbitrary orientation, position and hand. This searches every
rotation (a ~15° grid at a coarse sampling, then local refinement at the full box) for both hands,
with the translation from the peak of the cross-correlation, writes the map so transformed, and
prints and records the FSC against the reference at 0.5 and 0.143 (soft spherical mask). Both maps
must have the same box and voxel size.

Writes ALIGNED (.mrc, the reference's voxel size) and, beside it, ALIGNED with .json (the transform:
mirrored or not, the rotation, the shift in Å; the FSC) and .png (the FSC curve).

Examples:
  cryogs align ab1/map.mrc sim/gt_map.mrc --out ab1/map_aligned.mrc
  cryogs align ab1/map.mrc emd_1234.mrc --out aligned.mrc --mask-radius 40
"""
from pathlib import Path

from cryogs.commands._options import positive_float
from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("map", type=Path, help="map to move (.mrc)")
    parser.add_argument("reference", type=Path, help="map to align it onto (.mrc), same box and voxel size")
    parser.add_argument("--out", "-o", type=Path, required=True,
                        help="the aligned map (.mrc); its .json and .png beside it; replaced if they exist")
    parser.add_argument("--mask-radius", type=positive_float, default=None,
                        help="radius in Å of the FSC's soft spherical mask (default: 0.45 of the box)")


def main(args):
    import numpy as np

    from cryogs.analysis.align import align_maps
    from cryogs.analysis.evaluate import compare_maps
    from cryogs.analysis.fsc import check_mask_radius, mask_label, plot_fsc
    from cryogs.io.atomic import write_json
    from cryogs.io.mrc import read_mrc, write_mrc

    volume, voxel = read_mrc(args.map)
    reference, ref_voxel = read_mrc(args.reference)
    if volume.shape != reference.shape or len(set(volume.shape)) != 1:
        raise CryogsError(f"{args.map} is {'x'.join(map(str, volume.shape[::-1]))} voxels and {args.reference} "
                          f"{'x'.join(map(str, reference.shape[::-1]))}: align needs two cubic maps of one box")
    if not np.allclose(voxel[0], ref_voxel[0], rtol=1e-3):
        raise CryogsError(f"{args.map} has voxels of {voxel[0]:.4g} Å and {args.reference} of {ref_voxel[0]:.4g} Å; "
                          "resample one to match")
    if args.out.is_dir():
        raise CryogsError(f"--out {args.out} is a folder; give a file name (.mrc)")
    if not args.out.parent.exists() and str(args.out.parent):
        raise CryogsError(f"--out {args.out}: folder {args.out.parent} does not exist")
    pixel = float(ref_voxel[0])
    if args.mask_radius is not None:
        check_mask_radius(args.mask_radius, pixel)
    result = align_maps(volume, reference)
    metrics, freqs, curve = compare_maps(result["aligned"], reference, pixel, mask_radius=args.mask_radius)
    write_mrc(args.out, result["aligned"], pixel)
    plot_fsc(args.out.with_suffix(".png"), {"aligned map vs reference": (freqs, curve)},
             title=f"FSC after alignment: {metrics['fsc_0.5_angstrom']:.2f} Å at 0.5",
             mask=mask_label(metrics["fsc_mask_radius_angstrom"], pixel))
    record = {"map": str(args.map), "reference": str(args.reference), "mirrored": bool(result["mirrored"]),
              "rotation": np.asarray(result["rotation"]).tolist(),
              "shift_angstrom": (np.asarray(result["shift_voxels"]) * pixel).tolist(),
              "correlation": result["correlation"], **metrics}
    write_json(args.out.with_suffix(".json"), record)
    hand = "mirrored (the map had the other hand)" if result["mirrored"] else "same hand"
    print(f"aligned {args.map} onto {args.reference}: {hand}; FSC 0.5: {metrics['fsc_0.5_angstrom']:.2f} Å, "
          f"0.143: {metrics['fsc_0.143_angstrom']:.2f} Å; wrote {args.out}")
