"""Fit Gaussians to particle images with known poses: min Σ_i ‖I_i − Γ(θ, pose_i)‖²."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cryogs.analysis.figures import plot_loss
from cryogs.errors import CryogsError
from cryogs.io.atomic import write_json
from cryogs.io.loader import PRELOAD_BYTES, EpochSampler, make_loader, preload_images
from cryogs.io.particles import ParticleSet
from cryogs.io.progress import Report
from cryogs.model.densify import DensifyConfig, DensityControl
from cryogs.model.gaussians import GaussianModel
from cryogs.model.priors import map_prior, repulsion, scale_bounds
from cryogs.physics.ctf import apply_ctf, particle_ctf
from cryogs.physics.fourier import crop_half_spectrum, fourier_crop_tensor
from cryogs.physics.noise import (
    contrast_scales,
    estimate_noise_spectrum,
    gaussian_nll,
    half_grid_multiplicity,
    whitening_filter,
)
from cryogs.render.project import project, resolve_backend, voxelize

from . import checkpoint
from .config import TrainConfig
from .convergence import ANNEAL_EPOCHS, MIN_EPOCHS, HeldOutRule, heldout_indices
from .distributed import Group
from .outputs import montage_indices, particle_metrics, write_map_and_model, write_montage, write_refined_star
from .poses import PoseRefiner, perturb


def _data_scale(particles: ParticleSet, seed: int, n_sample: int = 256) -> float:
    """``1 / (½·D²·v)`` with ``v`` the mean pixel variance of a sample of images: it makes the data term
    dimensionless, independent of the images' scale (Adam is anyway), so prior weights carry over."""
    rng = np.random.default_rng([seed, 7])
    idx = np.sort(rng.choice(len(particles), size=min(n_sample, len(particles)), replace=False))
    var = float(particles.images(idx).astype(np.float64).var(axis=(1, 2)).mean())
    if not var > 0:
        raise CryogsError("the particle images are constant (zero variance): nothing to fit")
    return 1.0 / (0.5 * particles.box_size ** 2 * var)


def heldout_for(n_particles: int, config: TrainConfig) -> np.ndarray | None:
    """The particles a fit holds out for its stopping rule, or None when it runs every epoch (rule
    off, pose refinement, which needs the whole schedule, or too few particles or epochs)."""
    if not config.early_stop or config.refine_poses or config.epochs <= MIN_EPOCHS:
        return None
    return heldout_indices(n_particles, config.seed)


def planned_steps(n_particles: int, config: TrainConfig) -> int:
    """Optimizer steps of a fit of ``n_particles`` that runs every epoch (what :class:`Report` plans):
    with held-out particles, all epochs but the last train without them."""
    held = heldout_for(n_particles, config)
    k = 0 if held is None else len(held)
    return (config.epochs - 1) * math.ceil((n_particles - k) / config.batch_size) + math.ceil(
        n_particles / config.batch_size)


@dataclass
class Stage:
    """The sampling one part of the schedule fits at: the full box, or the coarse (Fourier-cropped) one."""

    box: int
    pixel: float  # Å
    filter: torch.Tensor | None  # [box, box//2+1] whitening filter, or None (white noise)
    min_scale: float  # Å: half a pixel; narrower Gaussians alias at this sampling
    loss_factor: float  # (box/D)²: a cropped residual's Σ_x r² is (D/box)² × the low-pass part of the full one


class Trainer:
    """Adam on the Gaussian parameters, one learning rate per group, exponential decay; optional density
    control, noise model, priors and pose refinement (see :class:`TrainConfig`).

    ``group`` is the set of processes training this model together (:mod:`cryogs.reconstruct.distributed`); each
    sees its share of every global batch, and only its main rank writes files. ``report`` says how far
    the fit is (a run's shared one, whose caller plans the steps; by default its own, with bars
    unless ``progress`` is False); ``label`` (e.g. "half 1: ") prefixes its lines and bars.
    ``on_epoch``, if given, is called with the trainer after every epoch (benchmarks follow the map with it).
    """

    def __init__(self, particles: ParticleSet, config: TrainConfig, out_dir, *, progress: bool = True,
                 initial: GaussianModel | None = None, group: Group | None = None, report: Report | None = None,
                 label: str = "", on_epoch: Callable[[Trainer], None] | None = None):
        self.particles, self.cfg, self.out = particles, config, Path(out_dir)
        self.on_epoch = on_epoch
        self.group = group or Group()
        self.label = label
        self.device = torch.device(config.device)
        self.backend = resolve_backend(config.backend, self.device)
        p, D = particles.pixel_size, particles.box_size
        self.particle_radius = config.init_radius / 0.8  # Å, as default_config estimated it
        self.min_scale = config.min_scale or 0.5 * p
        self.max_scale = config.max_scale or 3 * p
        self.start = "random" if initial is None else "given"  # for metrics.json (--init auto chooses)
        if initial is None:
            initial = GaussianModel.random(config.n_gaussians, config.init_radius, config.init_scale,
                                           config.total_mass, seed=config.seed)
        config.n_gaussians = len(initial)
        self.model = GaussianModel.from_arrays(initial.arrays()).to(self.device)
        with torch.no_grad():  # a start computed on each rank (e.g. a backprojection with GPU atomics) may differ
            self.group.broadcast_([p.data for p in self.model.parameters()])
        self.optimizer = torch.optim.Adam([
            {"params": [self.model.means], "lr": config.lr_means or 0.5 * p},
            {"params": [self.model.log_scales], "lr": config.lr_scales},
            {"params": [self.model.quats], "lr": config.lr_quats},
            {"params": [self.model.log_amplitudes], "lr": config.lr_amplitudes},
        ])
        n = len(particles)
        if config.batch_size < self.group.size:
            raise CryogsError(f"--batch-size {config.batch_size} is smaller than the {self.group.size} processes: "
                              "every process needs at least one image per step")
        # the stopping rule's held-out particles (None: every epoch runs); they join for the last epoch
        self.heldout = heldout_for(n, config)
        self.rule = HeldOutRule()
        self.end_epoch = config.epochs  # moves forward to the annealing epochs' end once the rule has converged
        self.stop_reason = f"ran all {config.epochs} epochs"
        train = None if self.heldout is None else np.setdiff1d(np.arange(n), self.heldout)
        self.sampler = EpochSampler(n, config.batch_size, seed=config.seed, rank=self.group.rank,
                                    world_size=self.group.size, population=train)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = max(1, planned_steps(n, config))
        self.decay = config.final_lr_fraction ** (1 / self.total_steps)
        self.anneal: tuple[int, float] | None = None  # (first step, factor per step) of the annealing epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.rotations = torch.as_tensor(particles.rotations, dtype=torch.float32, device=self.device)
        self.shifts = torch.as_tensor(particles.shifts, dtype=torch.float32, device=self.device)
        self.cache = preload_images(particles, self.device, PRELOAD_BYTES)
        self.loader = None if self.cache is not None else make_loader(particles, self.sampler, device=self.device)
        self.density = DensityControl(self._densify_config()) if config.densify else None
        self.poses = None
        if config.refine_poses:
            self.poses = PoseRefiner(n, lr_rotation=math.radians(config.lr_rotation),
                                     lr_shift=config.lr_shift or 0.2 * p, device=self.device)
        self.data_scale = _data_scale(particles, config.seed)
        self.filter = None
        if config.noise == "coloured":
            # the CTF spreads the particle's signal a few pixels beyond its radius: keep that out of the noise
            mask = min(self.particle_radius / p + 4, D / 2 - 2)
            self.filter = whitening_filter(estimate_noise_spectrum(
                particles, mask_radius_px=mask, seed=config.seed)).to(self.device)
        elif config.noise != "white":
            raise CryogsError(f"unknown noise model {config.noise!r} (white or coloured)")
        if not 0 <= config.coarse <= 1:
            raise CryogsError(f"--coarse must be a fraction of the steps in [0, 1], got {config.coarse}")
        self.full = Stage(D, p, self.filter, self.min_scale, 1.0)
        d = 2 * (D // 4)  # even, so the cropped centre D//2 → d//2 stays on a pixel centre
        self.coarse_steps = round(config.coarse * self.total_steps) if d >= 8 else 0
        self.coarse = Stage(d, p * D / d, None if self.filter is None else crop_half_spectrum(self.filter, d),
                            max(self.min_scale, 0.5 * p * D / d), (d / D) ** 2)
        self.epoch = 0  # completed epochs
        self.batch = 0  # completed global batches of the current epoch
        self.step_count = 0
        self.losses: list[float] = []
        self.seconds = 0.0
        self.densify_log: list[dict] = []
        self.visited = np.zeros(n, dtype=bool)  # particles of the current epoch already trained on
        self.report = report
        if report is None:
            self.report = Report(bars=progress, enabled=self.group.is_main)
            self.report.plan(planned_steps(n, config))

    def lr_factor(self, step: int) -> float:
        """The learning rates' factor at ``step``: an exponential decay to ``final_lr_fraction`` over the
        planned steps, or, once the fit has converged, over its annealing epochs."""
        if self.anneal is None or step <= self.anneal[0]:
            return self.decay ** step
        start, rate = self.anneal
        return self.decay ** start * rate ** (step - start)

    def _densify_config(self) -> DensifyConfig:
        # prune centres well outside the particle (its radius from the images, plus a quarter): Adam only
        # shrinks solvent Gaussians slowly, and beyond the particle the data want nothing
        p, D = self.particles.pixel_size, self.particles.box_size
        return DensifyConfig.for_run(self.total_steps, p, D, min_scale=self.min_scale, max_scale=self.max_scale,
                                     max_gaussians=self.cfg.max_gaussians or 2 * self.cfg.n_gaussians,
                                     radius=min(1.25 * self.particle_radius, 0.5 * D * p))

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / checkpoint.CHECKPOINT

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly here: model, optimizer, schedule, density control and pose
        state, the position in the epoch (whose order follows from the seed), and the RNG states."""
        if not self.group.is_main:
            return
        checkpoint.save(self.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "batch": self.batch,
            "step": self.step_count, "losses": self.losses, "seconds": self.seconds, "config": asdict(self.cfg),
            "density": None if self.density is None else self.density.state_dict(),
            "poses": None if self.poses is None else self.poses.state_dict(), "densify_log": self.densify_log,
            "visited": self.visited, "rule": self.rule.state_dict(), "anneal": self.anneal,
            "end_epoch": self.end_epoch, "stop_reason": self.stop_reason, "start": self.start})

    def resume(self) -> None:
        ck = checkpoint.load(self.checkpoint_path, self.device)
        with torch.no_grad():  # N may have changed under density control: take the checkpoint's
            for name, param in self.model.named_parameters():
                param.data = ck["model"][name].to(self.device)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.density is not None and ck["density"] is not None:
            self.density.load_state_dict(ck["density"])
        if self.poses is not None and ck["poses"] is not None:
            self.poses.load_state_dict(ck["poses"])
        self.epoch, self.batch, self.step_count = ck["epoch"], ck["batch"], ck["step"]
        self.losses, self.seconds, self.densify_log = ck["losses"], ck["seconds"], ck["densify_log"]
        self.visited, self.start = ck["visited"], ck.get("start", "given")
        self.rule.load_state_dict(ck["rule"])
        if ck["anneal"] is not None:  # converged: its end is set; otherwise the configuration's epochs count
            self.end_epoch, self.stop_reason = ck["end_epoch"], ck["stop_reason"]
            self._start_annealing(*ck["anneal"])
        checkpoint.restore_rng(ck)
        self.report.skip(self.step_count)

    # ------------------------------------------------------------------ training
    def stage(self) -> Stage:
        """The sampling of the current step: coarse for the first ``coarse`` fraction of the steps."""
        return self.coarse if self.step_count < self.coarse_steps else self.full

    def render(self, rotations, shifts, ctf=None, params=None, stage: Stage | None = None):
        """Γ of the model (or of ``params``) in these poses at the stage's sampling (default: full),
        convolved with the CTF when one is given."""
        stage = stage or self.full
        images = project(*(self.model() if params is None else params), rotations, shifts,
                         box_size=stage.box, pixel_size=stage.pixel, backend=self.backend)
        return images if ctf is None else apply_ctf(images, ctf)

    def _data_loss(self, pred, images, share: float, stage: Stage):
        """This rank's data term: its images' NLL over the global batch, in units of the images' variance
        (at the coarse stage, the low-pass part of the full-size term)."""
        scales = contrast_scales(pred.detach(), images, stage.filter) if self.cfg.contrast else None
        return gaussian_nll(pred, images, stage.filter, scales) * (self.data_scale * share * stage.loss_factor)

    def _update_poses(self, grad: torch.Tensor, global_batch: np.ndarray) -> None:
        """Sum this rank's pose gradients ``[k,5]`` into the global batch's rows over the ranks, so every rank
        takes the same per-particle Adam step on every particle of the batch."""
        rows = torch.zeros(len(global_batch), 5, device=self.device)
        start = sum(len(s) for s in np.array_split(global_batch, self.group.size)[:self.group.rank])
        rows[start:start + len(grad)] = grad
        self.group.all_reduce_sum_([rows])
        self.poses.step(torch.as_tensor(global_batch, device=self.device), rows, self.lr_factor(self.step_count))

    def _refine_poses_only(self, t, images, ctf, share, global_batch, stage: Stage) -> None:
        """One pose step for the batch against the current (frozen) Gaussians."""
        corrections = self.poses.leaf(t)
        params = [x.detach() for x in self.model()]
        pred = self.render(*perturb(self.rotations[t], self.shifts[t], corrections), ctf, params=params, stage=stage)
        grad, = torch.autograd.grad(self._data_loss(pred, images, share, stage), corrections)
        self._update_poses(grad, global_batch)

    def _priors(self) -> torch.Tensor | float:
        c, total = self.cfg, 0.0
        if not (c.reg_repulsion or c.reg_scale or c.reg_tv or c.reg_smooth):
            return total
        means, quats, scales, amps = self.model()
        if c.reg_repulsion:
            total = total + c.reg_repulsion * repulsion(means, c.reg_min_distance or self.particles.pixel_size)
        if c.reg_scale:
            total = total + c.reg_scale * scale_bounds(self.model.log_scales, self.min_scale, self.max_scale)
        for weight, kind in ((c.reg_tv, "tv"), (c.reg_smooth, "smooth")):
            if weight:
                # on a half-size grid: the priors shape the map at length scales above the pixel, at 1/8 the cost
                total = total + weight * map_prior((means, quats, scales, amps), box_size=self.particles.box_size,
                                                   pixel_size=self.particles.pixel_size, kind=kind,
                                                   grid=max(16, self.particles.box_size // 2))
        return total

    def step(self, images: torch.Tensor, idx: np.ndarray) -> float:
        """One optimizer step on this rank's share ``idx`` of the global batch; returns the global batch's
        mean data loss: the negative log-likelihood per image in units of ``½·D²·var(images)``, so about 1 is
        an empty model and the ``--reg-*`` weights mean the same for any data.

        While refining poses, each batch first takes ``pose_steps − 1`` pose-only steps against the current
        Gaussians, then one joint step: a particle is seen once per epoch, and its pose needs tens of steps.
        """
        global_batch = self.sampler.global_batch(self.batch)
        if self.visited[global_batch].any():  # the data order and the resume position disagree
            raise RuntimeError(f"epoch {self.epoch + 1}, batch {self.batch}: particles visited twice")
        self.visited[global_batch] = True
        share = len(idx) / len(global_batch)  # summed over the ranks, the losses make the global mean
        t = torch.as_tensor(idx, device=self.device)
        ctf = particle_ctf(self.particles, idx, device=self.device)
        stage = self.stage()
        if stage is self.coarse:
            images = fourier_crop_tensor(images, stage.box)
            ctf = None if ctf is None else crop_half_spectrum(ctf, stage.box)
        rotations, shifts = self.rotations[t], self.shifts[t]
        refining = self.poses is not None and self.step_count >= self.cfg.refine_start * self.total_steps
        if refining:
            for _ in range(self.cfg.pose_steps - 1):
                self._refine_poses_only(t, images, ctf, share, global_batch, stage)
            corrections = self.poses.leaf(t)
            rotations, shifts = perturb(rotations, shifts, corrections)
        data = self._data_loss(self.render(rotations, shifts, ctf, stage=stage), images, share, stage)
        loss = data + self._priors() / self.group.size
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.model.parameters())
        reduced = [p.grad for p in params] + [data.detach().reshape(1)]
        self.group.all_reduce_sum_(reduced)
        if refining:
            self._update_poses(corrections.grad, global_batch)
        if self.density is not None:
            self.density.accumulate(self.model)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        with torch.no_grad():
            self.model.log_scales.clamp_(math.log(stage.min_scale), math.log(self.max_scale))
            self.model.quats /= self.model.quats.norm(dim=-1, keepdim=True)
        if self.density is not None:
            change = self.density.update(self.step_count, self.model, self.optimizer)
            if change:
                self.densify_log.append({"step": self.step_count, **change})
        return float(reduced[len(params)])

    def _batches(self):
        """This epoch's remaining ``(images, local indices)`` on the device, from memory or the loader."""
        if self.cache is not None:
            for idx in self.sampler:
                # index_select, not fancy indexing: the latter stalls on oversubscribed CPU cores
                yield self.cache.index_select(0, torch.as_tensor(idx, device=self.device)), idx
        else:
            for images, idx in self.loader:
                yield images.to(self.device, non_blocking=True), idx.numpy()

    def heldout_losses(self) -> np.ndarray:
        """Per-image data loss of the held-out particles under the current model (no gradients), in the
        units of the training loss; each rank scores its share."""
        held = self.heldout
        losses = torch.zeros(len(held), dtype=torch.float64, device=self.device)
        mine = np.array_split(np.arange(len(held)), self.group.size)[self.group.rank]
        with torch.no_grad():
            for pos in np.array_split(mine, max(1, math.ceil(len(mine) / self.cfg.batch_size))):
                if len(pos) == 0:
                    continue
                idx = held[pos]
                t = torch.as_tensor(idx, device=self.device)
                images = (self.cache.index_select(0, t) if self.cache is not None
                          else torch.from_numpy(self.particles.images(idx)).to(self.device))
                ctf = particle_ctf(self.particles, idx, device=self.device)
                pred = self.render(self.rotations[t], self.shifts[t], ctf)
                scales = contrast_scales(pred, images, self.filter) if self.cfg.contrast else None
                nll = gaussian_nll(pred, images, self.filter, scales, per_image=True) * self.data_scale
                losses[torch.as_tensor(pos, device=self.device)] = nll.double()
        self.group.all_reduce_sum_([losses])
        return losses.cpu().numpy()

    def _start_annealing(self, start: int, rate: float) -> None:
        """From step ``start`` on, the learning rates fall by ``rate`` per step, over epochs of every
        particle, the held-out ones included."""
        self.anneal = (start, rate)
        self.sampler.set_population(None)
        self.steps_per_epoch = self.sampler.batches_per_epoch

    def _check_convergence(self) -> None:
        """After an epoch: score the held-out particles; once the rule says converged, make the next
        epoch the last, annealing the learning rates to their final value."""
        if self.heldout is None or self.anneal is not None:
            return
        losses = self.heldout_losses()
        if self.rule.update(self.epoch, losses) and self.epoch + 1 < self.cfg.epochs:
            epochs = min(ANNEAL_EPOCHS, self.cfg.epochs - self.epoch)
            steps = epochs * math.ceil(len(self.particles) / self.cfg.batch_size)
            factor = self.lr_factor(self.step_count)
            self._start_annealing(self.step_count, (self.cfg.final_lr_fraction / factor) ** (1 / steps))
            self.report.plan(-(planned_steps(len(self.particles), self.cfg) - self.step_count - steps))
            self.end_epoch = self.epoch + epochs
            more = f"{epochs} annealing epoch{'s' if epochs > 1 else ''}"
            self.stop_reason = f"{self.rule.reason()} after epoch {self.epoch}; {more} followed"
            self.report.line(f"{self.label}{self.stop_reason.split(';')[0]}; {more} follow")

    def fit(self) -> None:
        n = len(self.particles)
        if self.heldout is not None and not self.rule.history:
            self.rule.update(0, self.heldout_losses())  # the start's score, for the first epoch's improvement
        while self.epoch < self.end_epoch:
            self.sampler.set_epoch(self.epoch, start_batch=self.batch)
            t0, done0 = time.perf_counter(), self.batch
            last_save = t0
            bar = self.report.bar(f"{self.label}epoch {self.epoch + 1}/{self.end_epoch}", self.steps_per_epoch,
                                  self.batch)
            for images, idx in self._batches():
                loss = self.step(images, idx)
                if not math.isfinite(loss):
                    raise CryogsError(f"the loss became {loss} at epoch {self.epoch + 1}; "
                                      "try smaller learning rates")
                self.losses.append(loss)
                self.batch += 1
                now = time.perf_counter()
                rate = min(n, (self.batch - done0) * self.cfg.batch_size) / (now - t0)
                bar.update(1)
                self.report.advance()
                bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{rate:.0f}", N=len(self.model))
                if self.batch < self.steps_per_epoch and self.step_count % self.cfg.checkpoint_every == 0:
                    self.seconds += now - last_save
                    last_save = now
                    self.save_checkpoint()
            bar.close()
            unvisited = self.sampler.size - int(self.visited.sum())
            if unvisited:
                raise RuntimeError(f"epoch {self.epoch + 1} ended with {unvisited} particles unvisited")
            self.visited[:] = False
            now = time.perf_counter()
            self.seconds += now - last_save
            self.epoch, self.batch = self.epoch + 1, 0
            if not self.group.in_sync(list(self.model.parameters())):
                raise RuntimeError("the processes' models differ: their updates diverged")
            self._check_convergence()
            self.save_checkpoint()
            if self.on_epoch is not None:
                self.on_epoch(self)
            self.report.line(f"{self.label}epoch {self.epoch}/{self.end_epoch}: mean loss "
                             f"{np.mean(self.losses[-self.steps_per_epoch:]):.5g}, {len(self.model)} Gaussians, "
                             f"{(self.steps_per_epoch - done0) * self.cfg.batch_size / (now - t0):.0f} images/s",
                             eta=True)

    # ------------------------------------------------------------------ outputs
    def refined_poses(self):
        """``(rotations [n,3,3], shifts [n,2])`` with the pose corrections applied (the input ones without)."""
        if self.poses is None:
            return self.rotations, self.shifts
        return self.poses.refined(self.rotations, self.shifts)

    def volume(self) -> np.ndarray:
        with torch.no_grad():
            return voxelize(*[t.detach() for t in self.model()], box_size=self.particles.box_size,
                            pixel_size=self.particles.pixel_size).cpu().numpy()

    def noise_floor(self) -> float | None:
        """The loss a perfect model would reach: the noise power measured in the solvent around the
        particle, weighted (whitened) as the data term weighs residuals, in its units (the images'
        variance). None when the box leaves no solvent to measure it in."""
        p, D = self.particles.pixel_size, self.particles.box_size
        try:
            power = estimate_noise_spectrum(self.particles, mask_radius_px=min(self.particle_radius / p + 4, D / 2 - 2),
                                            seed=self.cfg.seed)
        except CryogsError:
            return None
        weight = half_grid_multiplicity(D).expand(D, -1)
        if self.filter is not None:
            weight = weight * self.filter.double().cpu() ** 2
        return float(0.5 * (weight * power).sum() / D ** 2 * self.data_scale)

    def write_outputs(self, extra_metrics: dict | None = None, volume: np.ndarray | None = None, *,
                      map_figures: bool = True) -> dict:
        """``map.mrc``, ``gaussians.{npz,pt,ply}``, ``loss.png``, ``montage.png``, ``metrics.json``,
        with ``map_figures`` ``slices.png`` and ``gaussians.png``, and, with pose refinement,
        ``refined_poses.star``. ``volume`` is :meth:`volume`, if the caller has it."""
        self.report.line(f"{self.label}writing the map, the model and the figures")
        p = self.particles.pixel_size
        volume = self.volume() if volume is None else volume
        write_map_and_model(self.out, volume, self.model, p, figures=map_figures)
        floor = self.noise_floor()
        plot_loss(self.out / "loss.png", self.steps_per_epoch, self.losses, noise_floor=floor,
                  heldout=[(r["epoch"], r["loss"]) for r in self.rule.history])
        idx = montage_indices(len(self.particles))
        rotations, shifts = (x[torch.as_tensor(idx, device=self.device)] for x in self.refined_poses())
        with torch.no_grad():
            rendered = self.render(rotations, shifts, particle_ctf(self.particles, idx, device=self.device))
        write_montage(self.out, self.particles, idx, rendered.cpu().numpy())
        if self.poses is not None:
            write_refined_star(self.out / "refined_poses.star", self.particles, *self.refined_poses())
        n_images = self.step_count * self.cfg.batch_size
        metrics = {**particle_metrics(self.particles), "n_gaussians": len(self.model),
                   "n_gaussians_initial": self.cfg.n_gaussians, "start": self.start,
                   "epochs": self.epoch, "epochs_planned": self.cfg.epochs, "stop_reason": self.stop_reason,
                   "heldout_particles": 0 if self.heldout is None else len(self.heldout),
                   "heldout_loss": self.rule.history, "backend": self.backend, "device": str(self.device),
                   "processes": self.group.size, "final_loss": float(np.mean(self.losses[-self.steps_per_epoch:])),
                   "loss_noise_floor": floor,
                   "train_seconds": self.seconds, "images_per_second": n_images / max(self.seconds, 1e-9),
                   "density_control": self.densify_log}
        metrics.update(extra_metrics or {})
        write_json(self.out / "metrics.json", metrics)
        return metrics


def run_training(particles: ParticleSet, config: TrainConfig, out_dir, *, resume: bool = False,
                 progress: bool = True, command: str | None = None,
                 initial: GaussianModel | Callable[[ParticleSet], GaussianModel] | None = None,
                 group: Group | None = None, report: Report | None = None, label: str = "",
                 on_epoch: Callable[[Trainer], None] | None = None) -> Trainer:
    """Train from ``initial`` (default: random in a sphere) and checkpoint into ``out_dir``.

    ``initial`` may be a function of the particles trained on (e.g. a backprojection of them), called
    only when the run starts afresh: a checkpoint to resume from replaces the start. ``report``,
    ``label`` and ``on_epoch`` as for :class:`Trainer`.
    Returns the finished trainer; call :meth:`Trainer.write_outputs` for the map and figures.
    """
    out = Path(out_dir)
    resuming = resume and (out / checkpoint.CHECKPOINT).exists()
    if initial is not None and not isinstance(initial, GaussianModel):  # a function of the particles
        initial = None if resuming else initial(particles)
    trainer = Trainer(particles, config, out, progress=progress, initial=initial, group=group, report=report,
                      label=label, on_epoch=on_epoch)
    if trainer.group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if resuming:
        trainer.resume()
    elif resume and trainer.group.is_main:
        print(f"note: no checkpoint in {out} yet (stopped during its first epoch); starting it afresh")
    if trainer.group.is_main:
        write_json(out / "config.json", asdict(config))
        if command is not None:  # every invocation, the first and each --resume, one line each
            with open(out / "command.txt", "a") as fh:
                fh.write(command + "\n")
    trainer.fit()
    return trainer
