"""Fit 3D Gaussians to particle images with known poses (min Σ‖I − Γ(θ, pose)‖²) and write the map.

Outputs in DIR, which must be new or empty (--overwrite writes over another run's files; --resume
continues the run in it): map.mrc (voxel size set, opens at scale in ChimeraX),
gaussians.npz/.pt/.ply, slices.png (central slices), gaussians.png (centres coloured by
amplitude), loss.png (with the noise floor), montage.png (data, model and residual for a few
particles), metrics.json, config.json, command.txt (every command line that wrote into DIR),
run.json (what determines the run, for --resume) and checkpoint.pt (written every
--checkpoint-every steps and every epoch). With --half-maps: half1.mrc, half2.mrc, map.mrc (their
average), slices.png (of the average), fsc.png (half-map FSC), half_split.star (each particle's half, as
_rlnRandomSubset) and metrics.json in DIR, and each half's own outputs in DIR/half1, DIR/half2 (without
slices.png and gaussians.png); with --reference also
the FSC against it (fsc.png, or fsc_reference.png with half maps). With --refine-poses:
refined_poses.star.

A stopped or killed run continues with 'cryogs reconstruct --out DIR --resume': the particle file
and every option come from DIR/run.json (an option given with another value, or an input file
whose content changed, is refused; only --device, --backend, --gpus and --no-progress may change),
and the fit continues mid-epoch from the last checkpoint. A finished run is left as it is.

The CTF of every particle (RELION's formula and sign) is applied to the rendered images when the
STAR file has defocus columns; particles without them are reconstructed without a CTF.

Defaults follow from the data: the particle radius and mass are estimated from the mean image,
the number of Gaussians from the particle volume, and the epochs from the number of particles each
model trains on (all, or each half with --half-maps). Each model starts on the Wiener-filtered
backprojection of its own particles (--init backproject), so the two halves stay independent.
Density control (--densify) and the priors (--reg-*) are off unless asked for.

Several GPUs: --gpus K relaunches under torchrun; or run 'torchrun --nproc_per_node=K -m cryogs
reconstruct ...' yourself (on CPUs it uses gloo). Each process reads its share of every batch;
gradients are all-reduced, so the result matches one process with the same --batch-size. With
--half-maps on two or more processes, the halves train at the same time on the two process halves.

Examples:
  cryogs reconstruct particles.star --out run1
  cryogs reconstruct particles.star --out run1 --datadir /data/Extract --gaussians 3000 --epochs 30
  cryogs reconstruct --out run1 --resume
  cryogs reconstruct particles.star --out run1 --half-maps --reference emd_1234.mrc
  cryogs reconstruct particles.star --out run2 --init random --seed 7
  cryogs reconstruct particles.star --out run3 --init pdb model.cif --refine-poses --noise coloured --contrast
  cryogs reconstruct J24_particles.cs --out run4 --datadir /data/cryosparc/P12 --downsample 128 --gpus 4
  cryogs reconstruct particles.mrcs --poses pose.pkl --ctf ctf.pkl --ind keep.pkl --out run5
  python -m cryogs reconstruct particles.star --out run1 --device cuda --reference gt_map.mrc
"""
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from cryogs.commands._options import (
    add_compute_args,
    add_output_args,
    add_particle_args,
    add_progress_arg,
    fraction,
    load_particles_from_args,
    non_negative_float,
    positive_float,
    positive_int,
)
from cryogs.errors import CryogsError


def add_args(parser):
    add_particle_args(parser, resumable=True)
    add_output_args(parser)
    parser.add_argument("--gaussians", type=positive_int, default=None,
                        help="number of Gaussians (default: from the particle volume)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="the most passes over the particles (default: about 20,000 images per model, 4 to 40 "
                        "epochs; with --half-maps each half is a model); a fit stops sooner once the loss of the "
                        "10%% of particles it holds out stops falling, then anneals for up to 3 epochs on all of them")
    parser.add_argument("--no-early-stop", action="store_true",
                        help="run every epoch, holding no particles out (early stopping is also off with "
                             "--refine-poses and for fits of fewer than 640 particles or 4 epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default: 32)")
    parser.add_argument("--lr-means", type=positive_float, default=None, help="initial step for the centres, Å (default: 0.5 px)")
    parser.add_argument("--lr-scales", type=positive_float, default=None, help="initial step for the log-scales (default: 0.02)")
    parser.add_argument("--lr-quats", type=positive_float, default=None, help="initial step for the rotations (default: 0.02)")
    parser.add_argument("--lr-amplitudes", type=positive_float, default=None,
                        help="initial step for the log-amplitudes (default: 0.03)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for initialisation and order (default: 0)")
    parser.add_argument("--init", nargs="+", default=["auto"], metavar="KIND [FILE]",
                        help="initial Gaussians: 'random' (inside the particle sphere), 'backproject' (on a "
                             "Wiener-filtered backprojection of the particles, as 'cryogs backproject' makes; with "
                             "--half-maps each half's own, so the halves stay independent), 'auto' (backproject when "
                             "that map's half maps agree to 6 pixels or finer, random otherwise, as at very low SNR), "
                             "'map MAP' (on a map file) or 'pdb MODEL' (one per residue of a PDB/mmCIF model, mass "
                             "centre at the box centre). On a map: --gaussians of them, at its peaks and the rest "
                             "drawn where its density is (default: auto; see benchmarks/QUALITY.md)")
    parser.add_argument("--max-gaussians", type=positive_int, default=None,
                        help="cap on the number of Gaussians under density control (default: 2 × --gaussians)")
    parser.add_argument("--densify", action="store_true",
                        help="adaptive density control: split, clone and prune Gaussians during the first half of "
                             "the steps (off by default: on the quality benchmark it tied with a fixed N, see "
                             "benchmarks/QUALITY.md)")
    parser.add_argument("--noise", choices=["white", "coloured"], default=None,
                        help="noise model: 'white' (plain squared error) or 'coloured' (whitened by the noise "
                             "spectrum measured outside the particle; right for real micrographs) (default: white)")
    parser.add_argument("--contrast", action="store_true",
                        help="fit a contrast scale per image (closed form, every step): for data whose particles "
                             "vary in ice thickness or normalisation")
    parser.add_argument("--reg-repulsion", type=non_negative_float, default=None,
                        help="weight of the prior keeping Gaussian centres at least --reg-min-distance apart (default: 0, off)")
    parser.add_argument("--reg-min-distance", type=positive_float, default=None,
                        help="minimum distance in Å between Gaussian centres for --reg-repulsion (default: 1 pixel)")
    parser.add_argument("--reg-scale", type=non_negative_float, default=None,
                        help="weight of the soft prior keeping Gaussian widths within [0.5, 3] pixels (default: 0, off)")
    parser.add_argument("--reg-tv", type=non_negative_float, default=None,
                        help="weight of the total-variation prior on the voxelized map (default: 0, off)")
    parser.add_argument("--reg-smooth", type=non_negative_float, default=None,
                        help="weight of the squared-gradient smoothness prior on the voxelized map (default: 0, off)")
    parser.add_argument("--refine-poses", action="store_true",
                        help="refine each particle's rotation and shift with the Gaussians (from --refine-start on); "
                             "writes refined_poses.star")
    parser.add_argument("--refine-start", type=fraction, default=None,
                        help="fraction of the epochs fitted with fixed poses before --refine-poses starts (default: 0.5)")
    parser.add_argument("--lr-rotation", type=positive_float, default=None,
                        help="initial pose-refinement step for rotations, degrees (default: 0.5)")
    parser.add_argument("--lr-shift", type=positive_float, default=None,
                        help="initial pose-refinement step for shifts, Å (default: 0.2 px)")
    parser.add_argument("--pose-steps", type=positive_int, default=None,
                        help="pose-refinement steps per batch and epoch: all but the last against the current "
                             "Gaussians, the last jointly with them; a rotation needs tens of steps (default: 8)")
    parser.add_argument("--coarse", type=fraction, default=None,
                        help="fraction of the steps fitted to images Fourier-cropped to half the box (pixels twice "
                             "as large; 4× fewer pixels to render) before the full-size images: the low "
                             "resolution is placed first (default: 0, off)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None,
                        help="steps between mid-epoch checkpoints; one is also written after every epoch (default: 200)")
    parser.add_argument("--gpus", type=positive_int, default=None,
                        help="train on this many GPUs of this node: relaunches the command under torchrun "
                             "(same as 'torchrun --nproc_per_node=K -m cryogs reconstruct ...')")
    parser.add_argument("--half-maps", action="store_true",
                        help="fit two independent half-set models (split by rlnRandomSubset when present, else at "
                             "random; the split is written to half_split.star), write half1.mrc, half2.mrc and "
                             "their average map.mrc, and report their FSC at 0.143 with a soft spherical mask. For "
                             "a Gaussian model it measures reproducibility, not resolution: it overstates the "
                             "resolution (see README, 'What each FSC means')")
    parser.add_argument("--mask-radius", type=positive_float, default=None,
                        help="radius in Å (not a diameter, not pixels) of the soft spherical mask of the FSCs, "
                             "half-map and --reference (default: the particle radius estimated from the images, "
                             "plus 4 pixels, as 'cryogs backproject')")
    parser.add_argument("--reference", type=Path, default=None,
                        help="known map to report the FSC against at 0.5 (its box and voxel size must match the "
                             "particles', after --downsample; checked before the run starts)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --out from its last checkpoint, with everything that "
                             "determines it (particle file, data and training options) as recorded in its run.json; "
                             "only --device, --backend, --gpus and --no-progress may change, and an option given "
                             "with another value is refused. A finished run is left as it is")
    add_progress_arg(parser)
    add_compute_args(parser)


def _init_words(words: list[str]) -> list:
    """--init's words, checked, with the file of 'map FILE' or 'pdb FILE' as a Path (recorded as an input)."""
    kind, *rest = words
    if kind in ("random", "backproject", "auto") and not rest:
        return words
    if kind not in ("map", "pdb") or len(rest) != 1:
        raise CryogsError(f"--init {shlex.join(words)}: use 'auto', 'random', 'backproject', 'map MAP' or "
                          "'pdb MODEL'")
    if not Path(rest[0]).is_file():
        raise CryogsError(f"--init {kind}: {rest[0]} does not exist")
    return [kind, Path(rest[0])]


def initial_model(words, n_gaussians: int, seed: int, device: str, report):
    """The start named by --init ``words``: None for random Gaussians, else a function of the particle set
    a model trains on (all particles, or one half with --half-maps), called only if no checkpoint
    replaces the start."""
    from cryogs.io.atoms import AtomSet
    from cryogs.model.gaussians import GaussianModel
    from cryogs.reconstruct.backproject import automatic_start, gaussians_on_backprojection

    kind, *rest = words
    if kind == "random":
        return None
    if kind == "backproject":  # each half from its own particles: the halves stay independent

        def backprojection(ps):
            report.line(f"start: backprojecting the {len(ps)} particles, {n_gaussians} Gaussians on the map")
            return gaussians_on_backprojection(ps, n_gaussians, seed=seed, device=device, progress=report.bars,
                                               label="start: ")
        return backprojection
    if kind == "auto":  # None (random Gaussians) when the backprojection is too poor to start on

        def automatic(ps):
            report.line(f"start: backprojecting the {len(ps)} particles")
            model, why = automatic_start(ps, n_gaussians, seed=seed, device=device, progress=report.bars,
                                         label="start: ")
            report.line(f"start: {why}")
            return model
        return automatic
    path = Path(rest[0])

    def start(ps):
        if not path.exists():
            raise CryogsError(f"--init {kind}: {path} does not exist")
        if kind == "pdb":
            return GaussianModel.from_atoms(AtomSet.read(path), per="residue", min_sigma=ps.pixel_size)
        return GaussianModel.from_map(*_read_map(path), n_gaussians, seed=seed)
    return start


def _read_map(path):
    """``(volume, voxel size)`` of an --init map, which must have one voxel size on all axes."""
    import numpy as np

    from cryogs.io.mrc import read_mrc

    volume, voxel = read_mrc(path)
    if not (min(voxel) > 0 and np.allclose(voxel, voxel[0], rtol=1e-4)):
        raise CryogsError(f"--init map: {path} needs one positive voxel size on all axes, its header gives {voxel}")
    return volume, float(voxel[0])


def _check_inputs(args, particles) -> float:
    """Refuse, before any expensive step, what would fail or mean nothing at the end; returns the radius
    (Å) of the mask of every FSC of the run."""
    from cryogs.analysis.evaluate import check_reference
    from cryogs.analysis.fsc import check_mask_radius
    from cryogs.reconstruct.config import default_mask_radius

    if args.reference is not None:
        check_reference(args.reference, particles.box_size, particles.pixel_size)
    if args.mask_radius is not None:
        check_mask_radius(args.mask_radius, particles.pixel_size)
    if args.half_maps and len(particles) < 2:
        raise CryogsError(f"--half-maps needs at least 2 particles, got {len(particles)}")
    if args.half_maps or args.reference is not None:
        return default_mask_radius(particles) if args.mask_radius is None else args.mask_radius
    return args.mask_radius


def main(args):
    import time

    from cryogs.analysis.evaluate import compare_maps_files
    from cryogs.commands._run_folder import RunFolder
    from cryogs.io.atomic import write_json
    from cryogs.io.progress import Report
    from cryogs.reconstruct import distributed
    from cryogs.reconstruct.config import TrainConfig, check_memory, default_config
    from cryogs.reconstruct.fit import planned_steps, run_training
    from cryogs.reconstruct.half_maps import HALF_MAP_CAVEAT, run_half_maps

    if args.resume and args.overwrite:
        raise CryogsError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.gpus and args.gpus > 1 and distributed.world()[1] == 1:
        argv, skip = [], False
        for a in sys.argv[1:]:  # everything but --gpus K
            if skip or a == "--gpus" or a.startswith("--gpus="):
                skip = a == "--gpus"
                continue
            argv.append(a)
        distributed.launch(args.gpus, argv)
    start_time = time.perf_counter()
    group, device = distributed.init(args.device)
    args.init = _init_words(args.init)
    folder = RunFolder.prepare(args, main=group.is_main)
    if folder.finished_already():
        return
    report = Report(bars=not args.no_progress, enabled=group.is_main)
    if args.resume:
        report.line(folder.resume_line())
    report.line(f"set-up: reading {args.particles}")
    particles = load_particles_from_args(args)
    config_file = args.out / "config.json"
    if args.resume:
        if not config_file.exists():
            raise CryogsError(f"--resume: {args.out} has no configuration yet ({config_file}); start it again "
                              "with --overwrite")
        config = TrainConfig.from_dict(json.loads(config_file.read_text()))
        config.device, config.backend = str(device), args.backend  # where it runs now may differ
    else:
        config = default_config(
            particles, images_per_model=len(particles) // 2 if args.half_maps else None,
            n_gaussians=args.gaussians, epochs=args.epochs, batch_size=args.batch_size,
            lr_means=args.lr_means, lr_scales=args.lr_scales, lr_quats=args.lr_quats,
            lr_amplitudes=args.lr_amplitudes, seed=args.seed, device=str(device), backend=args.backend,
            max_gaussians=args.max_gaussians, noise=args.noise, reg_repulsion=args.reg_repulsion,
            reg_min_distance=args.reg_min_distance, reg_scale=args.reg_scale, reg_tv=args.reg_tv,
            reg_smooth=args.reg_smooth, refine_start=args.refine_start, lr_rotation=args.lr_rotation,
            lr_shift=args.lr_shift, pose_steps=args.pose_steps, checkpoint_every=args.checkpoint_every,
            coarse=args.coarse, init=shlex.join(map(str, args.init)))
        config.densify, config.contrast, config.refine_poses = args.densify, args.contrast, args.refine_poses
        config.early_stop = not args.no_early_stop
    mask_radius = _check_inputs(args, particles)
    check_memory(config)
    initial = initial_model(shlex.split(config.init), config.n_gaussians, config.seed, config.device, report)
    if initial is not None and not args.resume and shlex.split(config.init)[0] in ("map", "pdb"):
        initial = initial(particles)  # a file's start: read it now, to fail early and to know its N
        config.n_gaussians = len(initial)
    report.line(f"{len(particles)} particles, {particles.box_size} px, {particles.pixel_size:.4g} Å/px; "
                f"{config.n_gaussians} Gaussians (start: {config.init}), {config.epochs} epochs"
                + (" per half" if args.half_maps else "") + f" on {config.device}"
                + (f", {group.size} processes" if group.size > 1 else ""))
    with folder.claimed():
        if args.half_maps:
            if group.is_main:
                write_json(config_file, asdict(config))
            volume, metrics = run_half_maps(particles, config, args.out, resume=args.resume,
                                            command=args.command_line, mask_radius=mask_radius, initial=initial,
                                            group=group, report=report)
        else:
            report.plan(planned_steps(len(particles), config))
            trainer = run_training(particles, config, args.out, resume=args.resume, initial=initial, group=group,
                                   report=report)
            volume, metrics = trainer.volume(), {}
        if not group.is_main:
            return
        if args.reference is not None:
            report.line(f"FSC against {args.reference}")
            metrics.update(compare_maps_files(volume, particles.pixel_size, args.reference,
                                              args.out / ("fsc_reference.png" if args.half_maps else "fsc.png"),
                                              mask_radius=mask_radius))
        metrics["wall_seconds"] = time.perf_counter() - start_time
        if args.half_maps:
            write_json(args.out / "metrics.json", metrics)
        else:
            metrics = trainer.write_outputs(metrics, volume)
        folder.finish()
    report.close()
    line = f"done in {metrics['wall_seconds']:.0f} s ({metrics['train_seconds']:.0f} s fitting)"
    if "fsc_half_0.143_angstrom" in metrics:
        limited = " (Nyquist-limited)" if metrics["fsc_half_nyquist_limited"] else ""
        line += (f"; half-map FSC 0.143: {metrics['fsc_half_0.143_angstrom']:.2f} Å{limited}, "
                 f"{HALF_MAP_CAVEAT}")
    if "fsc_0.5_angstrom" in metrics:
        line += f"; FSC vs reference at 0.5: {metrics['fsc_0.5_angstrom']:.2f} Å"
    print(f"{line}; outputs in {args.out}")
