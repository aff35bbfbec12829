"""Per-particle pose refinement, learned jointly with the Gaussians from the analytic gradients of Γ.

Each particle carries a correction ``(ω, δ)``: ``ω`` (radians, 3) is a rotation vector in the
*image* frame and ``δ`` (Å, 2) an origin offset, so the refined pose is

    A' = exp([ω]ₓ) · A,        o' = o + δ.

Left-multiplying keeps ``ω`` meaningful whatever the pose: ``ω_z`` is an in-plane rotation and
``ω_x, ω_y`` tilt the viewing direction. Every particle is updated by its own Adam (moments and
step count per particle), since a particle is seen once per epoch while the Gaussians move every
step; a shared step count would mis-correct the bias of rarely updated rows.
"""
from __future__ import annotations

import torch

#: Adam's constants, as torch.optim.Adam's defaults.
BETAS = (0.9, 0.999)
EPS = 1e-8


def perturb(rotations: torch.Tensor, shifts: torch.Tensor, corrections: torch.Tensor):
    """Refined ``(rotations [k,3,3], shifts [k,2])`` from corrections ``[k,5]`` (ω rad, δ Å); differentiable."""
    skew = torch.zeros(*corrections.shape[:-1], 3, 3, dtype=corrections.dtype, device=corrections.device)
    w = corrections[..., :3]
    skew[..., 0, 1], skew[..., 0, 2], skew[..., 1, 2] = -w[..., 2], w[..., 1], -w[..., 0]
    skew = skew - skew.transpose(-1, -2)
    # matrix_exp of a skew matrix is Rodrigues' formula, and is smooth at ω = 0 where it starts
    return torch.linalg.matrix_exp(skew) @ rotations.to(corrections.dtype), shifts + corrections[..., 3:]


class PoseRefiner:
    """Corrections ``[n, 5]`` for every particle, with per-particle Adam state.

    ``lr_rotation`` (radians) and ``lr_shift`` (Å) are the step sizes at learning-rate factor 1.
    """

    def __init__(self, n: int, *, lr_rotation: float, lr_shift: float, device=None):
        self.lr = torch.tensor([lr_rotation] * 3 + [lr_shift] * 2, device=device)
        self.corrections = torch.zeros(n, 5, device=device)
        self.exp_avg = torch.zeros(n, 5, device=device)
        self.exp_avg_sq = torch.zeros(n, 5, device=device)
        self.steps = torch.zeros(n, device=device)

    def __len__(self) -> int:
        return self.corrections.shape[0]

    def leaf(self, idx: torch.Tensor) -> torch.Tensor:
        """The corrections of particles ``idx`` as a fresh leaf that collects their gradient."""
        return self.corrections[idx].clone().requires_grad_(True)

    @torch.no_grad()
    def step(self, idx: torch.Tensor, grad: torch.Tensor, lr_factor: float = 1.0) -> None:
        """One Adam step for particles ``idx`` (unique) along ``grad [k,5]``."""
        b1, b2 = BETAS
        t = self.steps[idx] + 1
        m = self.exp_avg[idx].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.exp_avg_sq[idx].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = m / (1 - b1 ** t)[:, None]
        v_hat = v / (1 - b2 ** t)[:, None]
        self.corrections[idx] -= lr_factor * self.lr * m_hat / (v_hat.sqrt() + EPS)
        self.exp_avg[idx], self.exp_avg_sq[idx], self.steps[idx] = m, v, t

    @torch.no_grad()
    def refined(self, rotations: torch.Tensor, shifts: torch.Tensor):
        """All particles' refined poses, from their original ``rotations [n,3,3]`` and ``shifts [n,2]``."""
        r, s = perturb(rotations.to(self.corrections), shifts.to(self.corrections), self.corrections)
        return r, s

    def state_dict(self) -> dict:
        return {"corrections": self.corrections, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            getattr(self, k).copy_(v)


def rotation_error_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of ``a bᵀ`` for ``[n,3,3]`` rotations: how far apart two poses are."""
    cos = ((a @ b.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def random_perturbations(n: int, degrees: tuple[float, float], shift: float, *, generator=None,
                         dtype=torch.float64) -> torch.Tensor:
    """Corrections ``[n,5]``: rotations by an angle uniform in ``degrees`` about a uniformly random axis,
    and shifts of length ``shift`` (Å) in a random direction. For tests and the quality benchmark."""
    axis = torch.randn(n, 3, generator=generator, dtype=dtype)
    axis /= axis.norm(dim=-1, keepdim=True)
    lo, hi = degrees
    angle = torch.deg2rad(lo + (hi - lo) * torch.rand(n, 1, generator=generator, dtype=dtype))
    phi = 2 * torch.pi * torch.rand(n, generator=generator, dtype=dtype)
    return torch.cat([axis * angle, shift * torch.stack([phi.cos(), phi.sin()], -1)], -1)

