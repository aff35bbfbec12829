"""Fit Gaussians to particle images with known poses: min Σ_i ‖I_i − Γ(θ, pose_i)‖²."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_path, write_json
from .errors import CryogsError
from .figures import plot_gaussians, plot_loss, plot_montage, plot_slices
from .model import GaussianModel
from .mrc import write_mrc
from .ctf import apply_ctf, compute_ctf, wiener_filter
from .particles import ParticleSet
from .projection import project, resolve_backend, voxelize

#: Particle stacks smaller than this are read into memory once; larger ones stream from disk.
PRELOAD_BYTES = 2 << 30
PRELOAD_CHUNK = 4096


@dataclass
class TrainConfig:
    """Everything that determines a run; saved as ``config.json`` and in each checkpoint."""

    n_gaussians: int
    epochs: int
    init_radius: float  # Å: random initial centres lie inside this sphere
    init_scale: float  # Å: initial isotropic standard deviation
    total_mass: float  # initial summed amplitude, estimated from the images
    batch_size: int = 32
    lr_means: float = 0.0  # Å per step at the start; 0 means "0.5 pixel"
    lr_scales: float = 0.02  # log-scale per step
    lr_quats: float = 0.02
    lr_amplitudes: float = 0.03  # log-amplitude per step
    final_lr_fraction: float = 0.02  # learning rates decay exponentially to this fraction
    min_scale: float = 0.0  # Å; 0 means "0.5 pixel"
    max_scale: float = 0.0  # Å; 0 means "3 pixels"
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def estimate_extent(particles: ParticleSet, n_sample: int = 256, seed: int = 0) -> tuple[float, float]:
    """``(radius Å, total mass)`` of the particle from a sample of images.

    The mass is the mean image sum (noise averages out) divided by the mean CTF(0), since the CTF
    scales the zero frequency. The mean of randomly oriented projections is nearly round; after
    Wiener-filtering each image with its CTF, the radius holding 95 % of the mean image's mass,
    enlarged by 10 %, bounds the particle.
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(particles), size=min(n_sample, len(particles)), replace=False))
    images = torch.from_numpy(particles.images(idx)).double()
    ctf = particle_ctf(particles, idx)
    total = float(images.sum((1, 2)).mean())
    if ctf is not None:
        ctf = ctf.double()
        total /= float(ctf[:, 0, 0].mean())
        images = wiener_filter(images, ctf)
    if not total > 0:
        raise CryogsError("the particles have no positive mass on average: is the contrast inverted? (try --invert)")
    mean = images.mean(0).numpy()
    D, p = particles.box_size, particles.pixel_size
    yy, xx = np.indices(mean.shape) - D // 2
    r = np.hypot(xx, yy).ravel()
    order = np.argsort(r)
    cum = np.cumsum(mean.ravel()[order])
    r95 = r[order][min(len(r) - 1, np.searchsorted(cum, 0.95 * cum[-1]))] if cum[-1] > 0 else D / 2
    radius = float(np.clip(1.1 * r95, 0.15 * D, 0.45 * D)) * p
    return radius, total


def default_config(particles: ParticleSet, **overrides) -> TrainConfig:
    """A configuration that works without tuning, derived from box, pixel size and particle count."""
    radius, mass = estimate_extent(particles)
    p = particles.pixel_size
    volume = 4 / 3 * math.pi * radius ** 3
    n_gaussians = int(np.clip(round(0.5 * volume / (2 * p) ** 3), 50, 20000))
    epochs = int(np.clip(math.ceil(20000 / len(particles)), 4, 40))
    cfg = TrainConfig(n_gaussians=n_gaussians, epochs=epochs, init_radius=0.8 * radius,
                      init_scale=1.5 * p, total_mass=mass)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


class ParticleBatches:
    """Mini-batches of (images, rotations, shifts, ctf) on the training device, in a seeded order per epoch.

    ``ctf`` is the ``[k, D, D//2+1]`` CTF of each image (squared for CTF-premultiplied data), or
    ``None`` when the particles carry no CTF.
    """

    def __init__(self, particles: ParticleSet, batch_size: int, device: torch.device, seed: int):
        self.particles, self.batch_size, self.device, self.seed = particles, batch_size, device, seed
        n, D = len(particles), particles.box_size
        self.rotations = torch.as_tensor(particles.rotations, dtype=torch.float32, device=device)
        self.shifts = torch.as_tensor(particles.shifts, dtype=torch.float32, device=device)
        self.cache = None
        if n * D * D * 4 <= PRELOAD_BYTES:
            # filled in chunks: reading (and Fourier-cropping) all at once would first allocate the
            # stack at its full, un-downsampled size
            self.cache = torch.empty(n, D, D, device=device)
            for i in range(0, n, PRELOAD_CHUNK):
                idx = np.arange(i, min(n, i + PRELOAD_CHUNK))
                self.cache[i:i + len(idx)] = torch.from_numpy(particles.images(idx)).to(device)

    def __len__(self) -> int:
        return math.ceil(len(self.particles) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.particles))

    def ctf(self, idx: np.ndarray):
        return particle_ctf(self.particles, idx, device=self.device)

    def batch(self, idx: np.ndarray):
        if self.cache is not None:
            images = self.cache[torch.as_tensor(idx, device=self.device)]
        else:
            idx = np.sort(idx)
            images = torch.from_numpy(self.particles.images(idx)).to(self.device)
        t = torch.as_tensor(idx, device=self.device)
        return images, self.rotations[t], self.shifts[t], self.ctf(idx)


def particle_ctf(particles: ParticleSet, idx, *, device=None):
    """``[k, D, D//2+1]`` CTFs of particles ``idx``, or None without CTF values.

    For CTF-premultiplied images the model is multiplied by CTF², for phase-flipped ones by |CTF|.
    """
    if particles.ctf is None:
        return None
    c = {k: v[idx] for k, v in particles.ctf.items()}
    ctf = compute_ctf(particles.box_size, particles.pixel_size, c["defocus_u"], c["defocus_v"], c["defocus_angle"],
                      c["voltage"], c["cs"], c["amplitude_contrast"], c["phase_shift"], c["bfactor"], device=device)
    if particles.ctf_premultiplied:
        return ctf * ctf
    return ctf.abs() if particles.ctf_phase_flipped else ctf


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """Adam on the Gaussian parameters, one learning rate per group, exponential decay."""

    def __init__(self, particles: ParticleSet, config: TrainConfig, out_dir, *, progress: bool = True,
                 initial: GaussianModel | None = None):
        self.particles, self.cfg, self.out = particles, config, Path(out_dir)
        self.progress = progress
        self.device = torch.device(config.device)
        self.backend = resolve_backend(config.backend, self.device)
        p, D = particles.pixel_size, particles.box_size
        self.min_scale = config.min_scale or 0.5 * p
        self.max_scale = config.max_scale or 3 * p
        if initial is None:
            initial = GaussianModel.random(config.n_gaussians, config.init_radius, config.init_scale,
                                           config.total_mass, seed=config.seed)
        config.n_gaussians = len(initial)
        self.model = GaussianModel.from_arrays(initial.arrays()).to(self.device)
        lr_means = config.lr_means or 0.5 * p
        self.optimizer = torch.optim.Adam([
            {"params": [self.model.means], "lr": lr_means},
            {"params": [self.model.log_scales], "lr": config.lr_scales},
            {"params": [self.model.quats], "lr": config.lr_quats},
            {"params": [self.model.log_amplitudes], "lr": config.lr_amplitudes},
        ])
        self.batches = ParticleBatches(particles, config.batch_size, self.device, config.seed)
        total_steps = max(1, config.epochs * len(self.batches))
        decay = config.final_lr_fraction ** (1 / total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: decay ** step)
        self.epoch = 0
        self.losses: list[float] = []
        self.seconds = 0.0

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        _atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                            "losses": self.losses, "seconds": self.seconds, "config": asdict(self.cfg)},
                           self.checkpoint_path)

    def resume(self) -> None:
        ck = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        if ck["model"]["means"].shape[0] != len(self.model):
            raise CryogsError(f"{self.checkpoint_path}: checkpoint has {ck['model']['means'].shape[0]} Gaussians, "
                              f"the configuration {len(self.model)}; resume with the same settings")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.losses, self.seconds = ck["epoch"], ck["losses"], ck["seconds"]

    # ------------------------------------------------------------------ training
    def render(self, rotations, shifts, ctf=None):
        """Γ of the model in these poses, convolved with the CTF when one is given."""
        images = project(*self.model(), rotations, shifts, box_size=self.particles.box_size,
                         pixel_size=self.particles.pixel_size, backend=self.backend)
        return images if ctf is None else apply_ctf(images, ctf)

    def step(self, images, rotations, shifts, ctf) -> float:
        pred = self.render(rotations, shifts, ctf)
        loss = ((pred - images) ** 2).sum((1, 2)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.log_scales.clamp_(math.log(self.min_scale), math.log(self.max_scale))
            self.model.quats /= self.model.quats.norm(dim=-1, keepdim=True)
        return float(loss.detach())

    def fit(self) -> None:
        n_batches, bs = len(self.batches), self.cfg.batch_size
        while self.epoch < self.cfg.epochs:
            order = self.batches.order(self.epoch)
            t0 = time.perf_counter()
            bar = tqdm(range(n_batches), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="batch",
                       disable=not self.progress, leave=False)
            for i in bar:
                loss = self.step(*self.batches.batch(order[i * bs:(i + 1) * bs]))
                if not math.isfinite(loss):
                    raise CryogsError(f"the loss became {loss} at epoch {self.epoch + 1}; "
                                      "try smaller learning rates")
                self.losses.append(loss)
                rate = min(len(order), (i + 1) * bs) / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{rate:.0f}")
            self.seconds += time.perf_counter() - t0
            self.epoch += 1
            self.save_checkpoint()
            if self.progress:
                tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs}: mean loss "
                           f"{np.mean(self.losses[-n_batches:]):.5g}, {len(order) / (time.perf_counter() - t0):.0f} images/s")

    # ------------------------------------------------------------------ outputs
    def volume(self) -> np.ndarray:
        with torch.no_grad():
            return voxelize(*[t.detach() for t in self.model()], box_size=self.particles.box_size,
                            pixel_size=self.particles.pixel_size).cpu().numpy()

    def write_outputs(self, extra_metrics: dict | None = None, volume: np.ndarray | None = None) -> dict:
        """``map.mrc``, ``gaussians.{npz,pt,ply}``, ``loss.png``, ``montage.png``, ``slices.png``,
        ``gaussians.png`` and ``metrics.json``. ``volume`` is :meth:`volume`, if the caller has it."""
        p, D = self.particles.pixel_size, self.particles.box_size
        volume = self.volume() if volume is None else volume
        write_mrc(self.out / "map.mrc", volume, p)
        plot_slices(self.out / "slices.png", volume, p)
        arrays = self.model.arrays()
        plot_gaussians(self.out / "gaussians.png", arrays["means"], arrays["amplitudes"], D * p)
        for ext in ("npz", "pt", "ply"):
            self.model.save(self.out / f"gaussians.{ext}")
        plot_loss(self.out / "loss.png", len(self.batches), self.losses)
        idx = np.linspace(0, len(self.particles) - 1, min(4, len(self.particles))).astype(int)
        images, rotations, shifts, ctf = self.batches.batch(idx)
        with torch.no_grad():
            rendered = self.render(rotations, shifts, ctf).cpu().numpy()
        plot_montage(self.out / "montage.png", images.cpu().numpy(), rendered,
                     titles=[f"particle {i}" for i in idx])
        n_images = self.cfg.epochs * len(self.particles)
        metrics = {"n_particles": len(self.particles), "box_size": self.particles.box_size, "pixel_size": p,
                   "n_gaussians": len(self.model), "epochs": self.cfg.epochs, "backend": self.backend,
                   "device": str(self.device), "final_loss": float(np.mean(self.losses[-len(self.batches):])),
                   "train_seconds": self.seconds, "images_per_second": n_images / max(self.seconds, 1e-9)}
        metrics.update(extra_metrics or {})
        write_json(self.out / "metrics.json", metrics)
        return metrics


def run_training(particles: ParticleSet, config: TrainConfig, out_dir, *, resume: bool = False,
                 progress: bool = True, command: str | None = None,
                 initial: GaussianModel | None = None) -> Trainer:
    """Train from ``initial`` (default: random in a sphere) and checkpoint into ``out_dir``.

    Returns the finished trainer; call :meth:`Trainer.write_outputs` for the map and figures.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(particles, config, out, progress=progress, initial=initial)
    if resume and trainer.checkpoint_path.exists():
        trainer.resume()
    elif resume:
        print(f"note: no checkpoint in {out} yet (stopped during its first epoch); starting it afresh")
    write_json(out / "config.json", asdict(config))
    if command is not None:  # every invocation, the first and each --resume, one line each
        with open(out / "command.txt", "a") as fh:
            fh.write(command + "\n")
    trainer.fit()
    return trainer
