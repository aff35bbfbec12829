"""Voxel baseline: direct Fourier inversion of particle images with known poses, Wiener-weighted by the CTF.

The projection-slice theorem in cryogs' conventions: with ``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz``, the
2D Fourier transform of a projection at image frequency ``q = (kx, ky)`` is the 3D transform of the
map at ``Aᵀ (kx, ky, 0)``. Every image is inserted into a 3D Fourier grid:

1. its CTF factor ``c`` multiplies its ``rfft2`` on the image's own D×D grid, exactly as the forward
   model (:func:`cryogs.physics.ctf.apply_ctf`) applies the CTF;
2. the result is zero-padded to ``PADDING · D`` pixels (centre ``D//2`` to the padded centre) and
   transformed again, which gives the D×D transform at the even padded frequencies and interpolates
   it in between; a phase ramp moves the origin to the centre and undoes the particle's shift (the
   observed image is the centred projection translated by ``−origin``, so its transform carries
   ``exp(+2πi q·origin)``, which is removed);
3. the frequencies strictly inside the Nyquist circle are rotated to ``Aᵀ (kx, ky, 0)`` and spread
   by trilinear weights onto the padded 3D grid, accumulating a numerator ``Σ c·F`` and a weight
   ``Σ c²`` (c² interpolated like the numerator, through its real-space kernel; c = 1 without CTF);
4. the map's transform is ``V̂ = Σ c F / (Σ c² + λ)`` with the Wiener regularisation ``λ``, inverted,
   divided by the gridding kernel's transform and cropped back to ``D³``.

Choices, and why:

* Padding 2: the particle occupies at most half of the padded box, so its transform varies slowly on
  the padded grid and trilinear gridding is accurate to about 0.5 % (4–6 % without padding; relative
  L2 error against :func:`cryogs.voxelize` of noise-free Gaussian mixtures, 300 images, box 32).
* Density compensation: central sections all cross the origin, so samples are denser at low
  frequency, by ``1/|k|``; each sample is weighted by ``|q|`` (``R0``, the mean of ``|q|`` over the
  cell around the origin, for ``q = 0``) and each voxel's sums are divided by its own ``|k|``, which
  keeps them in units of images while making the sampling uniform around every voxel. This halves
  the error of the plain ratio at low frequency.
* Gridding correction: with uniform sampling the ratio Σ w F / Σ w (w the trilinear weights) is the
  transform convolved with the trilinear (tent) kernel, i.e. the map multiplied by
  ``sinc²(x / (PADDING·D))`` along every axis (x in pixels from the centre); the real-space map is
  divided by it (at most by 1/0.81 per axis, at the edge of the box).
* Hermitian half grid: only the half-space ``kx ≥ 0`` of the 3D transform is stored (as ``rfftn``).
  A sample that lands at ``kx < 0`` is inserted at ``−k`` with the complex-conjugate value; samples
  of the image's ``kx = 0`` column (which holds both ``q`` and ``−q``) count half; at the end the
  ``kx = 0`` plane receives its own Hermitian mirror, which is where the mirrored samples of points
  with ``0 ≤ kx < 1`` voxel spread.
* Scale: images hold mass per pixel and the DFT needs no normalisation for the slice theorem, so
  the output is mass per voxel, the scale of :func:`cryogs.voxelize`.
* CTF-modified data, as :func:`cryogs.reconstruct.fit.particle_ctf` models them: a normal image is
  ``CTF·X + n`` (numerator ``CTF·F``, weight ``CTF²``); a phase-flipped one is ``|CTF|·X + n``
  (numerator ``|CTF|·F``, weight ``CTF²``); a CTF-premultiplied one is ``CTF·(CTF·X + n)``, whose
  noise is coloured by the CTF: whitening divides it by CTF, so the numerator is the image as is and
  the weight ``CTF²``. Noise-free, all three give the same map.
* Wiener regularisation ``λ``: the term added to the weight, in units of one image's weight, i.e.
  the inverse spectral SNR of one image. From half maps it is estimated per shell as RELION does:
  ``SSNR_half = FSC / (1 − FSC)`` (FSC of the unregularised halves without a mask, which a mask
  would inflate at high frequency; clipped to [0.001, 0.999]) is the SSNR of a half map, whose
  weight per shell is ``W̄_half`` (the mean of Σ c² over the shell), so ``λ = W̄_half / SSNR_half``.
  The full data set has twice the weight and twice the SSNR (the usual doubling: its FSC is
  ``2 FSC / (1 + FSC)``, so ``SSNR_full = 2 SSNR_half``), which gives the same ``λ``; the halves and
  the full map share it. (RELION further takes the square root of the full map's FSC; this module
  does not.) Without regularisation the weight is kept from falling below 10⁻³ of its shell mean, so
  that sparsely sampled voxels do not blow up.

Limitation: the interpolation between the D×D frequencies (step 2) assumes the CTF-filtered image
fits in its box. When the CTF's delocalisation ``λ_e·Δf·k`` exceeds about a quarter of the box at
the highest frequencies (e.g. 64 px of 1.5 Å at 1–2.5 µm defocus), the CTF aliases on the image
grid and the reconstruction's low frequencies lose accuracy (measured: the total mass 15–20 % low);
a larger box avoids it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryogs.errors import CryogsError
from cryogs.io.particles import ParticleSet

__all__ = ["PADDING", "FourierSums", "accumulate", "reconstruct", "shell_mean_weight", "wiener_from_fsc",
           "backproject", "regularised_backprojection", "gaussians_on_backprojection", "automatic_start",
           "run_backproject"]

PADDING = 2
#: --init auto starts on the backprojection only when its half maps agree to this many pixels or finer.
AUTO_START_PIXELS = 6.0
WEIGHT_FLOOR = 1e-3  # fraction of a shell's mean weight below which an unregularised weight is not trusted
FSC_CLIP = (1e-3, 0.999)
R0 = (2 ** 0.5 + np.arcsinh(1.0)) / 6  # mean |q| over the unit cell around q = 0: the zero frequency's ramp weight


@dataclass
class FourierSums:
    """Accumulated slices on the padded Hermitian half grid ``[Dp, Dp, Dp//2 + 1]`` (z, y, x), Dp = PADDING·D."""

    numerator: torch.Tensor  # complex128, Σ c·F
    weight: torch.Tensor  # float64, Σ c²
    box_size: int  # D

    def __add__(self, other: "FourierSums") -> "FourierSums":
        return FourierSums(self.numerator + other.numerator, self.weight + other.weight, self.box_size)


def _plane_points(D: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded ``rfft2`` frequencies inserted: flat indices, ``(fx, fy)`` in padded grid units, and
    each sample's weight: its density compensation ``max(|q|, R0)`` (module notes), halved on the
    ``fx = 0`` column, which holds every ± pair twice."""
    Dp = PADDING * D
    fy = torch.fft.fftfreq(Dp, 1.0 / Dp, device=device, dtype=torch.float64)
    fx = torch.arange(Dp // 2 + 1, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(fy, fx, indexing="ij")
    inside = (gx * gx + gy * gy < (PADDING * D / 2) ** 2).flatten()  # strictly inside Nyquist
    flat = torch.nonzero(inside).squeeze(1)
    gx, gy = gx.flatten()[flat], gy.flatten()[flat]
    weight = torch.hypot(gx, gy).clamp_min(R0) * torch.where(gx == 0, 0.5, 1.0)
    return flat, gx, gy, weight


def _grid_radius(D: int, device) -> torch.Tensor:
    """``|k|`` of every voxel of the padded half grid ``[Dp, Dp, Dp//2 + 1]``, in padded grid units."""
    Dp = PADDING * D
    f = torch.fft.fftfreq(Dp, 1.0 / Dp, device=device, dtype=torch.float64)
    fx = torch.arange(Dp // 2 + 1, device=device, dtype=torch.float64)
    return torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)


def _shell_index(D: int, device) -> torch.Tensor:
    """Shell of every padded half-grid voxel in the original box's units (``round(|k| / PADDING)``)."""
    return torch.round(_grid_radius(D, device) / PADDING).long()


def _ctf_factors(particles: ParticleSet, idx: np.ndarray, device):
    """Per-particle ``(numerator factor, weight)`` on the ``[D, D//2+1]`` grid, or ``(None, None)``.

    From :func:`cryogs.reconstruct.fit.particle_ctf`, which gives CTF, |CTF| (phase-flipped) or CTF²
    (premultiplied): the weight is CTF² in every case; the numerator factor is None for
    premultiplied images, which already carry theirs (module notes).
    """
    if particles.ctf is None:
        return None, None
    from cryogs.physics.ctf import particle_ctf

    c = particle_ctf(particles, idx, device=device).double()
    return (None, c) if particles.ctf_premultiplied else (c, c * c)


def _padded_transform(images: torch.Tensor, flat, fx, fy) -> torch.Tensor:
    """``[b, P]`` transform of ``[b, D, D]`` images (centre at ``D//2``) at the inserted frequencies:
    zero-padded to ``Dp = PADDING·D`` (centre to centre), ``rfft2``, origin moved to the centre.

    At the frequencies of the D×D grid (even padded indices) this is exactly the images' own DFT;
    in between it interpolates it (the transform of an image confined to its box)."""
    b, D = images.shape[0], images.shape[-1]
    Dp = PADDING * D
    lo = Dp // 2 - D // 2
    padded = images.new_zeros((b, Dp, Dp))
    padded[:, lo:lo + D, lo:lo + D] = images
    F = torch.fft.rfft2(padded).flatten(1)[:, flat]
    return F * torch.polar(torch.ones_like(fx), np.pi * (fx + fy))  # exp(2πi q·(Dp/2)) with q = f/Dp


def _fold_kx0_plane(grid: torch.Tensor) -> None:
    """Add to the ``kx = 0`` plane its Hermitian mirror (conjugate at ``(−ky, −kz)``), in place."""
    plane = grid[:, :, 0]
    mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    grid[:, :, 0] = plane + (mirror.conj() if grid.is_complex() else mirror)


def accumulate(particles: ParticleSet, indices=None, *, device="cpu", batch_size: int = 64,
               progress: bool = False, desc: str = "backproject") -> FourierSums:
    """Insert particles ``indices`` (default all) into the padded 3D Fourier grid (see the module notes);
    ``progress`` shows a bar labelled ``desc``."""
    if particles.rotations is None:
        raise CryogsError(f"{particles.source or 'the particles'}: no poses (angles), which backprojection needs")
    idx_all = np.arange(len(particles)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx_all) == 0:
        raise CryogsError("backprojection needs at least one particle")
    if batch_size <= 0:
        raise CryogsError(f"the batch size must be positive, got {batch_size}")
    device = torch.device(device)
    D, p = particles.box_size, particles.pixel_size
    Dp = PADDING * D
    nx = Dp // 2 + 1
    sums = torch.zeros((Dp * Dp * nx, 3), dtype=torch.float64, device=device)  # Re Σ c F, Im Σ c F, Σ c²
    flat, fx, fy, sample_weight = _plane_points(D, device)
    for start in tqdm(range(0, len(idx_all), batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress):
        idx = idx_all[start:start + batch_size]
        b = len(idx)
        images = torch.from_numpy(particles.images(idx)).to(device=device, dtype=torch.float64)
        factor, ctf_weight = _ctf_factors(particles, idx, device)
        if factor is not None:  # on the image's own grid, exactly as the forward model applies the CTF
            images = torch.fft.irfft2(torch.fft.rfft2(images) * factor, s=(D, D))
        s = torch.as_tensor(particles.shifts[idx] / p, device=device)  # origins in pixels
        undo_shift = torch.polar(sample_weight.expand(b, -1), -2 * np.pi * (fx * s[:, :1] + fy * s[:, 1:]) / Dp)
        F = _padded_transform(images, flat, fx, fy) * undo_shift
        w = sample_weight.expand(b, -1)
        if ctf_weight is not None:  # CTF² interpolated like the numerator: through its real-space kernel
            kernel = torch.fft.fftshift(torch.fft.irfft2(ctf_weight, s=(D, D)), dim=(-2, -1))
            w = w * _padded_transform(kernel, flat, fx, fy).real
        A = torch.as_tensor(particles.rotations[idx], device=device)
        k = fx[None, :, None] * A[:, None, 0, :] + fy[None, :, None] * A[:, None, 1, :]  # Aᵀ(kx, ky, 0): [b, P, 3]
        flip = k[..., 0] < 0
        k = torch.where(flip[..., None], -k, k)
        F = torch.where(flip, F.conj(), F)
        _splat(sums, k.reshape(-1, 3), torch.cat([torch.view_as_real(F), w[..., None]], -1).reshape(-1, 3), Dp)
    sums = sums.view(Dp, Dp, nx, 3)
    numerator, weight = torch.complex(sums[..., 0], sums[..., 1]), sums[..., 2]
    _fold_kx0_plane(numerator)
    _fold_kx0_plane(weight)
    ramp = _grid_radius(D, device).clamp_min(R0)  # back to the units of one image's weight
    return FourierSums(numerator / ramp, weight / ramp, D)


def _splat(sums: torch.Tensor, k: torch.Tensor, values: torch.Tensor, Dp: int) -> None:
    """Trilinear gridding: add ``values [n, 3]`` of samples at ``k [n, 3]`` (x ≥ 0, grid units) to the
    flat half grid ``sums [Dp·Dp·(Dp//2+1), 3]``: on the CPU by the extension's ``cpu_grid_trilinear``
    (``csrc/grid_cpu.cpp``, about 3× faster) when it is built, else by :func:`_splat_torch`."""
    from cryogs.render import _extension

    ops = _extension.module()
    if sums.device.type == "cpu" and hasattr(ops, "cpu_grid_trilinear"):
        ops.cpu_grid_trilinear(sums, k.contiguous(), values.contiguous(), Dp)
    else:
        _splat_torch(sums, k, values, Dp)


def _splat_torch(sums: torch.Tensor, k: torch.Tensor, values: torch.Tensor, Dp: int) -> None:
    """:func:`_splat` in torch (any device): eight ``index_add_`` passes, one per neighbouring voxel."""
    nx = Dp // 2 + 1
    k0 = torch.floor(k)
    f = k - k0
    k0 = k0.long()
    ix = (k0[:, 0], k0[:, 0] + 1)
    iy = (torch.remainder(k0[:, 1], Dp), torch.remainder(k0[:, 1] + 1, Dp))
    iz = (torch.remainder(k0[:, 2], Dp), torch.remainder(k0[:, 2] + 1, Dp))
    wx, wy, wz = ((1 - f[:, a], f[:, a]) for a in range(3))
    for dz in (0, 1):
        for dy in (0, 1):
            row, w_zy = (iz[dz] * Dp + iy[dy]) * nx, wz[dz] * wy[dy]
            for dx in (0, 1):
                sums.index_add_(0, row + ix[dx], values * (w_zy * wx[dx])[:, None])


def shell_mean_weight(sums: FourierSums) -> np.ndarray:
    """``[D//2 + 1]`` mean of Σ c² over the padded grid's voxels of each shell of the original box."""
    D = sums.box_size
    shells = _shell_index(D, sums.weight.device).flatten()
    keep = shells <= D // 2
    total = torch.bincount(shells[keep], weights=sums.weight.flatten()[keep], minlength=D // 2 + 1)
    count = torch.bincount(shells[keep], minlength=D // 2 + 1)
    return (total / count.clamp_min(1)).cpu().numpy()


def wiener_from_fsc(fsc_curve, mean_weight) -> np.ndarray:
    """Per-shell ``λ = W̄_half / SSNR_half``, ``SSNR_half = FSC / (1 − FSC)`` (FSC clipped to [0.001, 0.999]).

    ``fsc_curve`` is the half-map FSC and ``mean_weight`` a half map's :func:`shell_mean_weight`
    (both ``[D//2 + 1]``). The result serves the halves and the full map alike (module notes).
    """
    f = np.clip(np.asarray(fsc_curve, dtype=np.float64), *FSC_CLIP)
    return np.asarray(mean_weight, dtype=np.float64) * (1 - f) / f


def reconstruct(sums: FourierSums, wiener=None) -> np.ndarray:
    """``[D, D, D]`` float32 map (mass per voxel) from accumulated slices.

    ``wiener``: ``None`` (no regularisation; the weight is floored at 10⁻³ of its shell mean), a
    number ``λ`` added to the weight everywhere, or ``[D//2 + 1]`` values ``λ`` per shell (in units
    of one image's weight: the inverse SSNR of one image; see :func:`wiener_from_fsc`).
    """
    D = sums.box_size
    Dp, device = PADDING * D, sums.weight.device
    shells = _shell_index(D, device).clamp_max(D // 2)
    if wiener is None:
        mean_w = torch.as_tensor(shell_mean_weight(sums), device=device)
        denom = torch.maximum(sums.weight, WEIGHT_FLOOR * mean_w[shells])
    else:
        lam = torch.as_tensor(np.asarray(wiener, dtype=np.float64), device=device)
        if lam.ndim == 1 and lam.shape[0] != D // 2 + 1:
            raise CryogsError(f"a per-shell Wiener regularisation needs {D // 2 + 1} values, got {lam.shape[0]}")
        if lam.ndim > 1 or (lam < 0).any():
            raise CryogsError("the Wiener regularisation must be a non-negative number or one per shell")
        denom = sums.weight + (lam[shells] if lam.ndim == 1 else lam)
    ratio = torch.where(denom > 0, sums.numerator / torch.where(denom > 0, denom, 1.0), 0)
    vol = torch.fft.fftshift(torch.fft.irfftn(ratio, s=(Dp, Dp, Dp)))
    x = torch.arange(Dp, device=device, dtype=torch.float64) - Dp // 2
    kernel = torch.sinc(x / Dp) ** 2  # transform of the trilinear (tent) kernel along one axis
    vol = vol / (kernel[:, None, None] * kernel[None, :, None] * kernel[None, None, :])
    lo = Dp // 2 - D // 2
    return vol[lo:lo + D, lo:lo + D, lo:lo + D].float().cpu().numpy()


def backproject(particles: ParticleSet, indices=None, *, device="cpu", batch_size: int = 64, wiener=None,
                progress: bool = False) -> np.ndarray:
    """``[D, D, D]`` map (mass per voxel, ``V[z, y, x]``) by direct Fourier inversion of particles ``indices``.

    ``wiener`` as in :func:`reconstruct`. Runs on any torch ``device``; ``batch_size`` images at a time.
    """
    sums = accumulate(particles, indices, device=device, batch_size=batch_size, progress=progress)
    return reconstruct(sums, wiener)


def regularised_backprojection(particles: ParticleSet, *, seed: int = 0, device="cpu", batch_size: int = 64,
                               progress: bool = False, label: str = "") -> np.ndarray:
    """The Wiener-regularised map of all ``particles``, ``λ`` per shell from the FSC of their own two
    halves (split by :func:`cryogs.reconstruct.half_maps.half_split` with ``seed``): ``cryogs backproject``'s
    map.mrc. ``reconstruct --init backproject`` calls it on each half-set, so the two half models
    start from independent maps. ``label`` prefixes the bars' labels."""
    return _regularised(particles, seed, device=device, batch_size=batch_size, progress=progress, label=label)[0]


def _regularised(particles: ParticleSet, seed: int, *, label: str = "", **opts) -> tuple[np.ndarray, float]:
    """:func:`regularised_backprojection`, and the resolution (Å) at which its unregularised half maps'
    unmasked FSC falls to 0.143."""
    _, sums, halves = _half_sums(particles, seed, label=label, **opts)
    lam, resolution = _wiener_from_halves(sums, halves, particles.pixel_size)
    return reconstruct(sums[0] + sums[1], lam), resolution


def _wiener_from_halves(sums, halves, pixel_size: float) -> tuple[np.ndarray, float]:
    """Per-shell ``λ`` from the unmasked FSC of the unregularised half maps (:func:`wiener_from_fsc`),
    and the resolution (Å) at which that FSC falls to 0.143."""
    from cryogs.analysis.fsc import fsc, resolution_at

    freqs, unmasked = fsc(halves[0], halves[1], pixel_size=pixel_size)
    lam = wiener_from_fsc(unmasked, 0.5 * (shell_mean_weight(sums[0]) + shell_mean_weight(sums[1])))
    return lam, float(resolution_at(freqs, unmasked, 0.143))


def _check_start_particles(particles: ParticleSet) -> None:
    if len(particles) < 2:  # its Wiener filter comes from the FSC of two halves
        raise CryogsError(f"a start on the backprojection needs at least 2 particles per model, got "
                          f"{len(particles)}: start from random Gaussians (--init random)")


def gaussians_on_backprojection(particles: ParticleSet, n: int, *, seed: int = 0, device="cpu",
                                progress: bool = False, label: str = ""):
    """``n`` Gaussians on :func:`regularised_backprojection` of ``particles``
    (:meth:`cryogs.model.gaussians.GaussianModel.from_map`, drawn with ``seed``): ``--init backproject``.
    ``progress`` and ``label`` as for :func:`regularised_backprojection`."""
    from cryogs.model.gaussians import GaussianModel

    _check_start_particles(particles)
    volume = regularised_backprojection(particles, seed=seed, device=device, progress=progress, label=label)
    return GaussianModel.from_map(volume, particles.pixel_size, n, seed=seed)


def automatic_start(particles: ParticleSet, n: int, *, seed: int = 0, device="cpu", progress: bool = False,
                    label: str = ""):
    """``(model, why)``: the default start (``--init auto``). ``model`` is ``n`` Gaussians on the
    regularised backprojection of ``particles`` (as :func:`gaussians_on_backprojection`) when its half
    maps agree, unmasked FSC 0.143, to :data:`AUTO_START_PIXELS` pixels or finer; otherwise None,
    for random Gaussians in the particle's sphere. ``why`` says which and why, in one line.

    The start's Gaussians are one voxel wide (σ), at the map's maxima and drawn where its density
    is. On a map that resolves nothing near that size they sit on blurred noise, and a fit from
    them ends worse than one from random Gaussians. Measured on ADK (box 64, 1.5 Å/px, CTF; the
    map's own half-map FSC, in pixels, then the FSC 0.5 against the truth after a default fit from
    each start): 1,000 particles at SNR 0.01, 6.9 px: backprojection start 6.27 Å, random 5.72 Å;
    2,000 at SNR 0.1, 4.0 px: 3.97 against 4.31 Å; 2,000 at SNR 1, 3.0 px: 3.44 against 3.72 Å.
    (The half-sets of a ``--half-maps`` run: 12.0, 4.8 and 3.5 px.)
    """
    from cryogs.model.gaussians import GaussianModel

    _check_start_particles(particles)
    volume, resolution = _regularised(particles, seed, device=device, progress=progress, label=label)
    pixels = resolution / particles.pixel_size
    agree = f"half maps agree to {resolution:.1f} Å ({pixels:.1f} px)"
    if pixels > AUTO_START_PIXELS:
        return None, (f"random Gaussians: the backprojection's {agree}, coarser than the {AUTO_START_PIXELS:g} px "
                      "a start on it needs")
    return GaussianModel.from_map(volume, particles.pixel_size, n, seed=seed), f"on the backprojection, whose {agree}"


def _half_sums(particles: ParticleSet, seed: int, *, label: str = "", report=None, **opts):
    """``(idx1, idx2, how)``, the two halves' :class:`FourierSums` and their unregularised maps; the bars
    say which half (after ``label``), and a :class:`~cryogs.io.progress.Report` says when each starts."""
    from .half_maps import half_split

    if len(particles) < 2:
        raise CryogsError(f"half maps need at least 2 particles, got {len(particles)}")
    idx1, idx2, how = half_split(particles, seed)
    sums = []
    for k, idx in enumerate((idx1, idx2), start=1):
        if report is not None:
            report.line(f"{label}backprojecting half {k}: {len(idx)} particles ({how})")
        sums.append(accumulate(particles, idx, desc=f"{label}backproject half {k}/2", **opts))
    return (idx1, idx2, how), sums, [reconstruct(s) for s in sums]  # unregularised: the FSC is the data's own


def run_backproject(particles: ParticleSet, out_dir, *, half_maps: bool = True, seed: int = 0,
                    mask_radius: float | None = None, reference=None, wiener=None, device="cpu",
                    batch_size: int = 64, progress: bool = True, report=None) -> dict:
    """Reconstruct and write ``map.mrc`` (the full-data reconstruction), ``slices.png`` and ``metrics.json``.

    With ``half_maps`` the particles are split by :func:`cryogs.reconstruct.half_maps.half_split`; each half
    is accumulated once and reconstructed without regularisation (``half1.mrc``, ``half2.mrc``: a
    Wiener filter would hide their noise and leave the correlation that a mask induces between them
    at high frequency). Their unmasked FSC gives the per-shell Wiener ``λ`` (:func:`wiener_from_fsc`),
    unless ``wiener`` fixes it, for the full map; ``half_split.star`` says which particle went into
    which half. Every FSC (``fsc.png``, and with a ``reference`` map ``fsc_reference.png``) uses a soft
    spherical mask of ``mask_radius`` Å (default :func:`~cryogs.reconstruct.config.default_mask_radius`,
    as ``reconstruct``). ``report`` (a :class:`~cryogs.io.progress.Report`) says how far it is; by
    default its own, with bars unless ``progress`` is False. Returns the metrics.
    """
    from cryogs.analysis.evaluate import compare_maps_files
    from cryogs.analysis.figures import plot_slices
    from cryogs.analysis.fsc import SOFT_EDGE_VOXELS, fsc, mask_label, plot_fsc, resolution_at
    from cryogs.io.atomic import write_json
    from cryogs.io.mrc import write_mrc
    from cryogs.io.progress import Report

    from .config import default_mask_radius
    from .outputs import HALF_SPLIT_STAR, particle_metrics, write_half_split_star

    report = report or Report(bars=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = particles.pixel_size
    start = time.perf_counter()
    opts = {"device": device, "batch_size": batch_size, "progress": report.bars}
    radius = default_mask_radius(particles) if mask_radius is None else mask_radius
    metrics = {**particle_metrics(particles), "device": str(device), "map": "full-data reconstruction",
               "padding": PADDING, "fsc_mask_radius_angstrom": radius, "fsc_mask_edge_angstrom": SOFT_EDGE_VOXELS * p}
    if half_maps:
        (idx1, idx2, how), (sums1, sums2), halves = _half_sums(particles, seed, report=report, **opts)
        write_half_split_star(out / HALF_SPLIT_STAR, particles, (idx1, idx2))
        for k, half in enumerate(halves, start=1):
            write_mrc(out / f"half{k}.mrc", half, p)
        if wiener is None:
            lam, _ = _wiener_from_halves((sums1, sums2), halves, p)
            metrics["wiener"] = "per shell from the unmasked half-map FSC"
            metrics["wiener_per_shell"] = lam.tolist()
        else:
            lam = metrics["wiener"] = wiener
        report.line("reconstructing the full map; half-map FSC")
        volume = reconstruct(sums1 + sums2, lam)
        freqs, curve = fsc(halves[0], halves[1], pixel_size=p, mask_radius=radius)
        r143, r5 = resolution_at(freqs, curve, 0.143), resolution_at(freqs, curve, 0.5)
        plot_fsc(out / "fsc.png", {"half 1 vs half 2": (freqs, curve)},
                 title=f"backprojection, gold-standard half-map FSC: {r143:.2f} Å at 0.143",
                 mask=mask_label(radius, p))
        metrics.update({"half_split": how, "half_sizes": [len(idx1), len(idx2)], "half_maps": "unregularised",
                        "fsc_half_0.143_angstrom": float(r143), "fsc_half_0.5_angstrom": float(r5),
                        "fsc_half_nyquist_limited": r143.nyquist_limited,
                        "fsc_half_0.5_nyquist_limited": r5.nyquist_limited,
                        "fsc_half_curve": {"frequency_per_angstrom": freqs.tolist(), "fsc": curve.tolist()}})
    else:
        report.line(f"backprojecting {len(particles)} particles")
        volume = reconstruct(accumulate(particles, **opts), wiener)
        metrics["wiener"] = wiener
    report.line("writing the map and the figures")
    write_mrc(out / "map.mrc", volume, p)
    plot_slices(out / "slices.png", volume, p)
    metrics["wall_seconds"] = time.perf_counter() - start
    if reference is not None:
        metrics.update(compare_maps_files(volume, p, reference, out / "fsc_reference.png", mask_radius=radius))
    write_json(out / "metrics.json", metrics)
    return metrics
