"""Adaptive density control for transmission images: clone, split and prune Gaussians while training.

The forward model (:mod:`cryogs.render.project`) makes each image a sum of line integrals of mass,
``I_b(x) = Σ_g a_g N(x; P_b μ_g, P_b Σ_g P_bᵀ)``: additive and linear in the masses ``a_g``, with no
opacity and no transmittance. The rules below follow from that, not from 3DGS's opacity rules:

* **Mass, mean and covariance are what the images see.** Projection is linear, so a pair of
  Gaussians whose total mass, mean and covariance equal one Gaussian's projects, in every pose, to
  a pair with the same 2D moments; the images differ only in fourth and higher moments. A split is
  therefore moment matched (:func:`split_offsets`), and a clone halves the mass so the sum is kept.
* **Where to add Gaussians.** ``∂L/∂μ_g = a_g · Σ_b ∫ (∂L/∂I_b) ∇_μ N_g`` is the pull of the
  residual on Gaussian ``g``. A pull that is the same from batch to batch moves the Gaussian, and
  the optimizer follows it; pulls that disagree between batches (different views want the Gaussian
  in different places) are what one Gaussian cannot satisfy. The statistic is therefore the part of
  the mean per-step pull that cancels: ``mean_t ‖g_t‖ − ‖mean_t g_t‖`` over the steps since the
  last decision (:meth:`DensityControl.statistic`). The loss scale depends on the data, so the
  threshold is relative, ``grad_factor`` × the median over Gaussians. A relative threshold always
  selects the upper tail: N grows at every decision until ``max_gaussians`` or ``stop_step``, so
  the cap is the budget. Second, a Gaussian held at ``max_scale`` that the data pushes wider needs
  more Gaussians whatever its pull (:meth:`DensityControl.densify_mask`).
* **What to remove.** With no transmittance a Gaussian never hides another, so there is nothing
  like 3DGS's opacity reset: a Gaussian is useless only if it carries (almost) no mass, if it sits
  outside the particle, where the data has none, or if the data drives it below the sampling limit.
  See :meth:`DensityControl.prune_mask`. In the solvent the data term does drain a Gaussian's mass,
  but under Adam only like ``t^(-1/2)`` (its gradient falls with its mass squared while Adam's
  second moment remembers the start), so leaving the particle sphere (``radius``) is what marks
  most solvent Gaussians; the amplitude rule catches those that have lost nearly everything.

Decisions are a deterministic function of the parameters and the accumulated statistics (stable
sorts, ties broken by index, no random numbers), so ranks that all-reduce their gradients take the
same decisions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryogs.errors import CryogsError
from cryogs.physics.conventions import quat_to_matrix

#: Half-distance between split children in units of the parent's largest standard deviation,
#: ``u = d / σ₁``. The children's scale along the axis is ``σ₁√(1 − u²)``. Moment matching makes the
#: image change fourth order in ``u``: the relative L2 change of any projection of the parent is at
#: most :func:`split_image_change` ``(u)``, 1.9 % at ``u = ½`` (0.09 % at ¼, 11 % at 1/√2). Smaller
#: ``u`` changes the images less but leaves the children nearly coincident, and the difference of
#: their gradients (what separates them) is proportional to ``u``; ``u = ½`` places the children
#: one parent-σ apart, still a single-peaked pair (two-peaked from ``u > 1/√2``).
SPLIT_OFFSET = 0.5

#: A clone's copy moves along the descent direction of its accumulated mean gradient by this many
#: standard deviations of the Gaussian along that direction. Moving half the mass along ``−∇`` lowers
#: the loss to first order; a quarter σ keeps the image change small (in every projection the
#: copy's image overlaps its original's by at least ``exp(−0.25²/4) = 98.4 %`` in the L2 sense, as
#: projection cannot lengthen a shift measured in standard deviations) while making the two distinct.
CLONE_SHIFT = 0.25

#: Relative distance to a scale bound within which a scale counts as sitting at it. The trainer
#: clamps log-scales exactly onto the bounds, so pinned scales are equal to them up to rounding.
PIN_TOLERANCE = 0.01


@dataclass
class DensifyConfig:
    """Settings of :class:`DensityControl`. :meth:`for_run` derives all of them from the run.

    The four lengths (Å) have no universal value, since they scale with the pixel size; left at 0
    they must be filled in (by :meth:`for_run` or by hand) before use.
    """

    interval: int = 100  # optimizer steps between decisions; statistics average over them
    start_step: int = 500  # first step at which decisions are taken (the random start has settled)
    stop_step: int = 15000  # last step at which decisions are taken (new Gaussians need time to settle)
    grad_factor: float = 2.0  # densify where the statistic (mean pull that cancels) exceeds this × its median
    max_gaussians: int = 50000  # cap on N; densification stops at it, pruning is unaffected
    split_scale: float = 0.0  # Å; Gaussians whose largest scale exceeds this are split, others cloned
    min_amplitude_fraction: float = 0.01  # prune when the mass is below this × the median mass
    min_scale: float = 0.0  # Å; the trainer's lower scale bound (the sampling limit, 0.5 pixel)
    max_scale: float = 0.0  # Å; the trainer's upper scale bound
    radius: float = 0.0  # Å; prune Gaussians whose centre is farther than this from the box centre

    @classmethod
    def for_run(cls, total_steps: int, pixel_size: float, box_size: int, *, min_scale: float = 0.0,
                max_scale: float = 0.0, **overrides) -> DensifyConfig:
        """Settings for a run of ``total_steps`` optimizer steps on ``box_size``-pixel images.

        ``min_scale``/``max_scale`` default (0) to the trainer's 0.5 and 3 pixels. Decisions run
        every ``min(100, total_steps // 20)`` steps (at least 10) from the second interval to half
        the run, so the second half, with decaying learning rates, settles what was added. Splitting
        starts above twice the minimum scale (children along the split axis keep ``√¾ × 2 = 1.7``
        times the minimum). The radius defaults to the sphere inscribed in the box: a centre beyond
        it projects outside the image in some poses, where the data cannot constrain it; pass the
        particle's radius (``radius=``, e.g. from :func:`cryogs.reconstruct.fit.estimate_extent`) to prune
        solvent Gaussians as soon as they leave the particle. ``overrides`` set any field directly.
        """
        min_scale = min_scale or 0.5 * pixel_size
        max_scale = max_scale or 3.0 * pixel_size
        interval = max(10, min(100, total_steps // 20))
        cfg = cls(interval=interval, start_step=2 * interval, stop_step=total_steps // 2,
                  split_scale=2.0 * min_scale, min_scale=min_scale, max_scale=max_scale,
                  radius=0.5 * box_size * pixel_size)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise CryogsError(f"unknown density-control setting {k!r}")
            setattr(cfg, k, v)
        return cfg

    def check(self) -> None:
        if self.interval < 1 or self.max_gaussians < 1:
            raise CryogsError("density control needs interval ≥ 1 and max_gaussians ≥ 1")
        if not (0 < self.min_scale < self.max_scale and self.split_scale > 0 and self.radius > 0):
            raise CryogsError("density control needs 0 < min_scale < max_scale, split_scale > 0 and radius > 0 "
                              "(in Å; DensifyConfig.for_run derives them from the pixel size)")


def split_image_change(u: float) -> float:
    """Largest relative L2 change ``‖I_pair − I_parent‖ / ‖I_parent‖`` of a projection when a
    Gaussian is split with offset ``u = d/σ₁`` (continuous images, no truncation).

    Whitening the parent's projected covariance ``C`` makes the parent ``N(0, I)`` and the children
    ``½N(±d e, I − d² e eᵀ)`` with ``e = C^{-1/2} P v``; since ``C ⪰ σ₁² (Pv)(Pv)ᵀ``, ``d|e| ≤ u``.
    Orthogonal to ``e`` nothing changes, so the ratio is the 1D one at ``d|e|``, which grows with it;
    the 1D ratio follows from ``∫N(x; a, A) N(x; b, B) dx = N(a − b; 0, A + B)``.
    """
    s2 = 1.0 - u * u  # children's variance along the axis, parent σ₁ = 1
    cross = 2 * math.sqrt(math.pi) * math.exp(-u * u / (2 * (1 + s2))) / math.sqrt(2 * math.pi * (1 + s2))
    pair = (1 + math.exp(-u * u / s2)) / (2 * math.sqrt(s2))
    return math.sqrt(max(0.0, 1 - 2 * cross + pair))


def split_offsets(quats: torch.Tensor, log_scales: torch.Tensor):
    """Moment-matched split of K Gaussians along their principal axes.

    Returns ``offset [K, 3]`` (Å; the children sit at ``μ ± offset``) and the children's
    ``log_scales [K, 3]``; the principal axis ``v`` is that of the largest scale (the first on ties).
    With ``d = u σ₁`` and the children's variance ``σ₁² − d²`` along ``v``, the pair
    ``½N(μ ± d v, Σ − d² v vᵀ)`` has the parent's mean and covariance ``Σ − d² v vᵀ + d² v vᵀ = Σ``.
    """
    axis = log_scales.argmax(-1)
    v = quat_to_matrix(quats).gather(-1, axis[:, None, None].expand(-1, 3, 1))[..., 0]
    sigma1 = log_scales.gather(-1, axis[:, None]).exp()
    new_log_scales = log_scales.clone()
    new_log_scales.scatter_add_(-1, axis[:, None],
                                torch.full_like(sigma1, 0.5 * math.log1p(-SPLIT_OFFSET ** 2)))
    return SPLIT_OFFSET * sigma1 * v, new_log_scales


def clone_shifts(quats: torch.Tensor, log_scales: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    """``[K, 3]`` displacement (Å) of each clone's copy: :data:`CLONE_SHIFT` standard deviations
    along ``−ĝ``, the descent direction of the accumulated mean gradient ``grad_sum``. Where that is
    exactly zero, the principal axis is used instead, so the copy still differs from its original."""
    axis_offset, _ = split_offsets(quats, log_scales)
    norm = grad_sum.norm(dim=-1, keepdim=True)
    direction = torch.where(norm > 0, -grad_sum / norm.clamp_min(torch.finfo(grad_sum.dtype).tiny),
                            axis_offset / axis_offset.norm(dim=-1, keepdim=True))
    R = quat_to_matrix(quats)
    local = (R.transpose(-1, -2) @ direction[..., None])[..., 0]  # direction in the principal frame
    sigma_along = ((local * log_scales.exp()) ** 2).sum(-1, keepdim=True).sqrt()  # √(ĝᵀ Σ ĝ)
    return CLONE_SHIFT * sigma_along * direction


class DensityControl:
    """Accumulates per-Gaussian gradient statistics and clones, splits and prunes at decision steps.

    Use with a :class:`cryogs.model.gaussians.GaussianModel` and its optimizer::

        loss.backward()
        control.accumulate(model)
        optimizer.step()            # then the trainer's scale clamp and quaternion normalisation
        counts = control.update(step, model, optimizer)   # step = optimizer steps taken so far

    The model's Parameters stay the same objects; their data, their gradients (set to ``None``)
    and their optimizer state are rebuilt by one index map.
    """

    def __init__(self, config: DensifyConfig):
        config.check()
        self.cfg = config
        self.count = 0  # steps accumulated since the last decision
        self.grad_norm_sum = None  # [N] Σ_t ‖∂L/∂μ‖
        self.grad_sum = None  # [N, 3] Σ_t ∂L/∂μ: the consistent pull, and the clone direction
        self.log_scale_grad_sum = None  # [N, 3] Σ_t ∂L/∂log s: where the data pushes pinned scales

    # ------------------------------------------------------------------ statistics
    def accumulate(self, model) -> None:
        """Add this step's gradients (call after ``backward()``, before ``optimizer.step()``)."""
        g = model.means.grad
        if g is None:
            raise CryogsError("density control: accumulate() needs model.means.grad; call it after backward()")
        gs = model.log_scales.grad
        if self.grad_norm_sum is None:
            self._reset(len(model), g)
        elif self.grad_norm_sum.shape[0] != len(model):
            raise CryogsError(f"density control holds statistics for {self.grad_norm_sum.shape[0]} Gaussians, "
                              f"the model has {len(model)}: change N only through update()")
        with torch.no_grad():
            self.grad_norm_sum += g.detach().norm(dim=-1)
            self.grad_sum += g.detach()
            if gs is not None:
                self.log_scale_grad_sum += gs.detach()
        self.count += 1

    def _reset(self, n: int, like: torch.Tensor) -> None:
        self.count = 0
        self.grad_norm_sum = like.new_zeros(n)
        self.grad_sum = like.new_zeros(n, 3)
        self.log_scale_grad_sum = like.new_zeros(n, 3)

    def statistic(self) -> torch.Tensor | None:
        """``[N]`` ``mean_t ‖∂L/∂μ‖ − ‖mean_t ∂L/∂μ‖`` over the accumulated steps (≥ 0 by the
        triangle inequality): the mean pull that cancels between batches. None before any step."""
        return None if self.count == 0 else (self.grad_norm_sum - self.grad_sum.norm(dim=-1)) / self.count

    # ------------------------------------------------------------------ decisions
    def is_decision_step(self, step: int) -> bool:
        c = self.cfg
        return c.start_step <= step <= c.stop_step and step % c.interval == 0

    def prune_mask(self, model) -> dict[str, torch.Tensor]:
        """``[N]`` boolean masks, one per prune criterion:

        * ``amplitude``: mass below ``min_amplitude_fraction`` × the median mass. Images are linear in
          mass, so such a Gaussian contributes that small a fraction of a typical Gaussian's signal.
          Its mass goes to nobody: the data term restores any that was real.
        * ``outside``: centre farther than ``radius`` from the box centre: outside the particle the
          data has no mass, and beyond the box's inscribed sphere some images do not see it.
        * ``speck``: every scale at ``min_scale`` and the accumulated log-scale gradient positive on
          every axis, i.e. the bound is active and the data pushes the Gaussian narrower still. The
          images are sampled at pixel centres, and below half a pixel a sampled Gaussian no longer
          integrates to its mass (Poisson summation); a Gaussian the data drives under that limit
          in every direction fits single-pixel features, which the band-limited signal does not
          have: noise. (At ``max_scale`` nothing is pruned: a Gaussian that wants to be wider and
          keeps its mass covers real broad density; it is split, and one that dissolves loses
          its mass and is pruned by ``amplitude``.) Needs accumulated gradients.
        """
        c = self.cfg
        with torch.no_grad():
            amps = model.log_amplitudes.exp()
            masks = {"amplitude": amps < c.min_amplitude_fraction * amps.median(),
                     "outside": model.means.norm(dim=-1) > c.radius}
            pinned = (model.log_scales <= math.log(c.min_scale) + math.log1p(PIN_TOLERANCE)).all(-1)
            pushed = (self.log_scale_grad_sum > 0).all(-1) if self.count else torch.zeros_like(pinned)
            masks["speck"] = pinned & pushed
        return masks

    def densify_mask(self, model) -> torch.Tensor:
        """``[N]`` Gaussians that need company (before pruning and the cap); needs statistics.

        * the :meth:`statistic` exceeds ``grad_factor`` × its median: the batches keep pulling the
          Gaussian in directions that cancel, so it straddles structure it cannot express;
        * or a scale sits at ``max_scale``, the accumulated gradient pushes it wider still (the bound
          is active), and the mass is at least the median: the data asks one heavy Gaussian to
          cover more than a Gaussian may, which only more Gaussians can. This catches the uniformly
          under-fitted start, where every Gaussian straddles several features and the gradient
          statistic, relative to its median, singles none out. (Gaussians dissolving in the solvent
          are pushed wider too, but they are losing their mass, hence the median-mass condition.)
        """
        c = self.cfg
        stat = self.statistic()
        with torch.no_grad():
            pulled = stat > c.grad_factor * stat.median()
            at_max = model.log_scales >= math.log(c.max_scale) - math.log1p(PIN_TOLERANCE)
            amps = model.log_amplitudes.exp()
            cramped = (at_max & (self.log_scale_grad_sum < 0)).any(-1) & (amps >= amps.median())
        return pulled | cramped

    def update(self, step: int, model, optimizer) -> dict | None:
        """At decision steps, prune, then clone or split, in place; returns
        ``{"cloned", "split", "pruned", "n"}`` (``n``: Gaussians after) or None at other steps.

        Pruning comes first (never all Gaussians: if every one qualifies, the heaviest stays). The
        kept Gaussians in :meth:`densify_mask` are then split (largest scale above ``split_scale``)
        or cloned, each adding one Gaussian; when more qualify than ``max_gaussians`` leaves room
        for, those with the largest :meth:`statistic` win (ties: lower index). Statistics restart
        after a decision. Call it after the optimizer step and the trainer's scale clamp.
        """
        if not self.is_decision_step(step):
            return None
        c = self.cfg
        if self.grad_norm_sum is None:
            self._reset(len(model), model.means)
        with torch.no_grad():
            prune = torch.stack(list(self.prune_mask(model).values())).any(0)
            if prune.all():
                prune[model.log_amplitudes.argmax()] = False
            stat = self.statistic()
            grow = torch.zeros_like(prune)
            headroom = c.max_gaussians - int((~prune).sum())
            if stat is not None and headroom > 0:
                candidates = ~prune & self.densify_mask(model)
                key = torch.where(candidates, -stat, torch.full_like(stat, math.inf))
                order = torch.sort(key, stable=True).indices
                chosen = order[:min(headroom, int(candidates.sum()))]
                grow[chosen] = True
            is_split = grow & (model.log_scales.max(-1).values > math.log(c.split_scale))
            is_clone = grow & ~is_split
            self._apply(model, optimizer, prune | is_split, is_clone, is_split)
            self._reset(len(model), model.means)
        return {"cloned": int(is_clone.sum()), "split": int(is_split.sum()), "pruned": int(prune.sum()),
                "n": len(model)}

    def _apply(self, model, optimizer, drop, is_clone, is_split) -> None:
        """Rebuild the parameters as [kept originals, clone copies, split children (+), (−)]."""
        means, quats, log_scales, log_amps = model.means, model.quats, model.log_scales, model.log_amplitudes
        half = math.log(2.0)
        keep = torch.nonzero(~drop).squeeze(-1)
        cl = torch.nonzero(is_clone).squeeze(-1)
        sp = torch.nonzero(is_split).squeeze(-1)
        kept_log_amps = torch.where(is_clone[keep], log_amps[keep] - half, log_amps[keep])
        shift = clone_shifts(quats[cl], log_scales[cl], self.grad_sum[cl])
        offset, split_log_scales = split_offsets(quats[sp], log_scales[sp])
        new = {
            means: torch.cat([means[keep], means[cl] + shift, means[sp] + offset, means[sp] - offset]),
            quats: torch.cat([quats[keep], quats[cl], quats[sp], quats[sp]]),
            log_scales: torch.cat([log_scales[keep], log_scales[cl], split_log_scales, split_log_scales]),
            log_amps: torch.cat([kept_log_amps, log_amps[cl] - half, log_amps[sp] - half, log_amps[sp] - half]),
        }
        n_old, n_new = means.shape[0], new[means].shape[0]
        for param, data in new.items():
            _replace_data(param, data)
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                # per-Gaussian moments (exp_avg, exp_avg_sq, ...) follow the index map; Adam's
                # scalar ``step`` is shared by the whole tensor and stays
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n_old:
                    moved = value.new_zeros((n_new,) + value.shape[1:])
                    moved[:len(keep)] = value[keep]
                    state[key] = moved

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"count": self.count, "grad_norm_sum": self.grad_norm_sum, "grad_sum": self.grad_sum,
                "log_scale_grad_sum": self.log_scale_grad_sum}

    def load_state_dict(self, d: dict) -> None:
        """Restore statistics saved by :meth:`state_dict` (their N is the checkpointed model's)."""
        self.count = int(d["count"])
        self.grad_norm_sum, self.grad_sum, self.log_scale_grad_sum = (
            d["grad_norm_sum"], d["grad_sum"], d["log_scale_grad_sum"])


def _replace_data(param: torch.nn.Parameter, data: torch.Tensor) -> None:
    """``param.data = data`` with a new N, and ``param.grad = None``.

    While any autograd graph that used ``param`` is alive (a caller still holding last step's
    ``loss``), PyTorch reuses the leaf's gradient accumulator, which remembers the old shape, and
    ``.data =`` renews it only when the dtype or device changes; passing through another dtype forces
    that renewal, so the next backward works whatever the caller still holds.
    """
    param.data = data.to(torch.float16 if data.dtype != torch.float16 else torch.float32)
    param.data = data
    param.grad = None
