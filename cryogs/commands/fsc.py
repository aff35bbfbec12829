"""Fourier shell correlation between two maps of the same box and voxel size.

Prints the resolution in Å where the FSC crosses 0.5 and 0.143 and writes the curve as a
figure (with the mask used printed on it) and as a table (frequency in 1/Å and FSC). --out FILE
names the figure, and the table is FILE with .txt; without --out both go to the current folder as
fsc_MAP1_MAP2.png/.txt, with a number added rather than replace an existing file: cryogs never
overwrites a file you did not name.

Examples:
  cryogs fsc half1.mrc half2.mrc
  cryogs fsc run1/map.mrc sim/gt_map.mrc --mask-radius 40 --out run1/fsc_gt.png
"""
from pathlib import Path

from cryogs.commands._options import add_pixel_size_arg, positive_float
from cryogs.errors import CryogsError


def add_args(parser):
    parser.add_argument("map1", type=Path, help="first map (.mrc)")
    parser.add_argument("map2", type=Path, help="second map (.mrc)")
    parser.add_argument("--mask-radius", type=positive_float, default=None,
                        help="radius in Å (not a diameter, not pixels) of a soft spherical mask (cosine edge of 6 "
                             "voxels) applied to both maps; at least one voxel (default: no mask)")
    add_pixel_size_arg(parser, default=None,
                       help="voxel size in Å, overriding the headers (default: from MAP1's header)")
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="figure path; the table goes beside it with .txt, and both are replaced if they exist "
                             "(default: fsc_MAP1_MAP2.png/.txt in the current folder, never replacing a file)")


def _free_path(stem: str) -> Path:
    """``stem.png`` in the current folder, or ``stem_2.png``, ``stem_3.png`` ...: the first whose figure and
    table both do not exist yet."""
    k, name = 1, stem
    while Path(f"{name}.png").exists() or Path(f"{name}.txt").exists():
        k += 1
        name = f"{stem}_{k}"
    return Path(f"{name}.png")


def _check_figure_path(out: Path) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.is_dir():
        raise CryogsError(f"--out {out} is a folder; give the figure's file name (e.g. {out / 'fsc.png'})")
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise CryogsError(f"--out {out}: {out.suffix} is not an image format; use one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")


def main(args):
    import numpy as np

    from cryogs.analysis.fsc import check_mask_radius, fsc, mask_label, plot_fsc, resolution_at
    from cryogs.io.atomic import atomic_path
    from cryogs.io.mrc import read_mrc

    if args.out is not None:
        _check_figure_path(args.out)
    v1, vs1 = read_mrc(args.map1)
    v2, vs2 = read_mrc(args.map2)
    apix = args.pixel_size if args.pixel_size is not None else vs1[0]
    if args.pixel_size is None:
        if not vs1[0] > 0:
            raise CryogsError(f"{args.map1}: its header gives no voxel size ({vs1[0]} Å); give --pixel-size")
        if len(set(np.round(vs1, 4))) != 1:
            raise CryogsError(f"{args.map1}: voxels are not cubic ({vs1} Å); resample the map first")
        if not np.allclose(vs1, vs2, rtol=1e-3):
            raise CryogsError(f"voxel sizes differ: {args.map1} has {vs1[0]:.4g} Å, {args.map2} {vs2[0]:.4g} Å")
    if v1.shape != v2.shape:
        raise CryogsError(f"box sizes differ: {args.map1} is {v1.shape}, {args.map2} is {v2.shape}")
    if args.mask_radius is not None:
        check_mask_radius(args.mask_radius, apix)
    freqs, curve = fsc(v1, v2, pixel_size=apix, mask_radius=args.mask_radius)
    r5, r143 = resolution_at(freqs, curve, 0.5), resolution_at(freqs, curve, 0.143)
    out = args.out or _free_path(f"fsc_{args.map1.stem}_{args.map2.stem}")
    table = out.with_suffix(".txt")
    plot_fsc(out, {f"{args.map1.name} vs {args.map2.name}": (freqs, curve)},
             title=f"FSC: {r5:.2f} Å at 0.5, {r143:.2f} Å at 0.143", mask=mask_label(args.mask_radius, apix))
    with atomic_path(table) as tmp:
        np.savetxt(tmp, np.stack([freqs, curve], 1), fmt="%.6f",
                   header=f"frequency_1/A fsc; {mask_label(args.mask_radius, apix)}")
    note = " (Nyquist-limited)" if r143.nyquist_limited else ""
    print(f"FSC 0.5: {r5:.2f} Å")
    print(f"FSC 0.143: {r143:.2f} Å{note}")
    print(f"wrote {out} and {table}")
