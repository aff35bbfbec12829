"""Shared by tests/test_cuda.py and tests/test_cuda_host_math.py: random cases for the CUDA rasterizer
and its float64 dense reference.

The truncated model is discontinuous at ``q = cutoff²``: a pixel whose float64 ``q`` lies within
float32 rounding of ``cutoff²`` may be kept by one backend and dropped by the other, changing that
pixel by ``w·exp(-cutoff²/2)`` (~1e-3 of the peak at cutoff 3.5). That is not a bug, so the accuracy
tests keep every pixel of every (image, Gaussian) pair at least ``tol`` (relative) away from the cutoff:
Gaussians too close are given a slightly different size (and dropped if that does not help).
"""
from __future__ import annotations

import os

import pytest
import torch

from cryogs import project
from cryogs.render import _extension
from cryogs.render.gaussian_math import preprocess

from helpers import random_mixture, random_poses

F64 = torch.float64
NAMES = ("means", "quats", "scales", "amplitudes", "rotations", "shifts")


def cpu_ops_or_skip():
    """The extension when it holds the cpu backend's ops; else skip, or fail under
    ``CRYOGS_REQUIRE_EXTENSION=1`` (CI, where the extension is built)."""
    if _extension.cpu_available():
        return _extension.module()
    msg = f"cpu backend ops {_extension.cpu_status()}"
    if os.environ.get("CRYOGS_REQUIRE_EXTENSION", "") == "1":
        pytest.fail(f"CRYOGS_REQUIRE_EXTENSION=1 but the {msg}")
    pytest.skip(msg)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 when both are all zero)."""
    got = got.detach().to("cpu", F64)
    ref = ref.detach().to("cpu", F64)
    scale = ref.abs().max() if ref.numel() else torch.tensor(0.0, dtype=F64)
    diff = (got - ref).abs().max() if ref.numel() else torch.tensor(0.0, dtype=F64)
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def cutoff_margins(params, box_size: int, pixel_size: float, cutoff: float) -> torch.Tensor:
    """``[N]`` smallest ``|q − k²| / k²`` over every image and pixel, per Gaussian (float64)."""
    m2, cn, _, _ = preprocess(*params, box_size=box_size, pixel_size=pixel_size, cutoff=cutoff)
    N = m2.shape[1]
    out = torch.full((N,), float("inf"), dtype=F64)
    if N == 0 or m2.shape[0] == 0:
        return out
    c = torch.arange(box_size, dtype=F64)
    k2 = cutoff * cutoff
    for g0 in range(0, N, 64):
        u = m2[:, g0:g0 + 64]
        dx = c[None, None, None, :] - u[..., 0, None, None]
        dy = c[None, None, :, None] - u[..., 1, None, None]
        a, b, cc = (cn[:, g0:g0 + 64, i, None, None] for i in range(3))
        q = a * dx * dx + 2 * b * dx * dy + cc * dy * dy
        out[g0:g0 + 64] = ((q - k2).abs() / k2).amin((-1, -2)).amin(0)
    return out


def guard_cutoff(params, box_size, pixel_size, cutoff, *, tol, gen, rounds=60):
    """Resizes (then drops) Gaussians with a pixel within ``tol`` of the cutoff in some image.

    ``params`` are float64 tensors already rounded to float32; returns the new tuple.
    """
    means, quats, scales, amps, rot, shifts = params
    scales = scales.clone()
    bad = torch.arange(means.shape[0])  # only resized Gaussians need checking again
    for _ in range(rounds):
        sub = (means[bad], quats[bad], scales[bad], amps[bad], rot, shifts)
        bad = bad[cutoff_margins(sub, box_size, pixel_size, cutoff) < tol]
        if not bad.numel():
            return means, quats, scales, amps, rot, shifts
        jitter = 1 + 0.05 * (2 * torch.rand(bad.numel(), 1, generator=gen, dtype=F64) - 1)
        scales[bad] = (scales[bad] * jitter).float().double()
    keep = torch.ones(means.shape[0], dtype=torch.bool)
    keep[bad] = False
    return means[keep], quats[keep], scales[keep], amps[keep], rot, shifts


def make_case(gen, *, B=3, N=60, D=48, pixel_size=1.3, cutoff=3.5, scale_range=(1.5, 4.0), spread=10.0,
              max_shift=4.0, tol=2e-5, params=None):
    """A random case: dict with ``params`` (float64 values exactly representable in float32), ``D``,
    ``p``, ``k``. ``params`` may be given (float64 6-tuple), then only rounded and guarded."""
    if params is None:
        means, quats, scales, amps = random_mixture(N, gen, spread=spread, scale_range=scale_range)
        rot, shifts = random_poses(B, gen, max_shift=max_shift)
        params = (means, quats, scales, amps, rot, shifts)
    params = tuple(t.to(torch.float32).to(F64) for t in params)
    if tol:
        params = guard_cutoff(params, D, pixel_size, cutoff, tol=tol, gen=gen)
    return {"params": params, "D": D, "p": pixel_size, "k": cutoff}


def dense_reference(case, v=None):
    """float64 dense image ``[B, D, D]`` and, if ``v`` is given, the gradients of ``(I·v).sum()``."""
    leaves = [t.detach().clone().requires_grad_(v is not None) for t in case["params"]]
    img = project(*leaves, box_size=case["D"], pixel_size=case["p"], backend="dense", cutoff=case["k"])
    if v is None:
        return img.detach(), None
    (img * v.to(F64)).sum().backward()
    return img.detach(), {n: t.grad for n, t in zip(NAMES, leaves)}
