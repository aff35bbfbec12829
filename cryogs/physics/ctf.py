"""The contrast transfer function, RELION's formula and sign, on the ``rfft2`` grid of a D×D image.

With spatial frequency k (Å⁻¹), its angle θ = atan2(ky, kx), the electron wavelength
``λ = 12.2639 / √(V + 0.97845e-6 V²)`` Å (V in volts), the astigmatic defocus
``Δf(θ) = ½[dfU + dfV + (dfU − dfV) cos 2(θ − dfAngle)]`` (Å, positive = underfocus) and
``χ = 2π(−½ Δf λ k² + ¼ Cs λ³ k⁴) − φ`` (Cs in Å, phase shift φ in radians):

    CTF(k) = −sin(χ − arcsin w) · exp(−B k² / 4)

with amplitude contrast w and B-factor B (Å²). This is RELION's sign: CTF(0) = +w, so a
projection with positive density keeps positive low-frequency contrast, as in RELION-extracted
particles. cryoDRGN's ``compute_ctf`` returns exactly the negative (−w at zero frequency) and
compensates by inverting the data by default.
"""
from __future__ import annotations

import math

import torch

__all__ = ["compute_ctf", "particle_ctf", "electron_wavelength", "apply_ctf", "wiener_filter", "frequency_grid"]


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2639 / (v + 0.97845e-6 * v * v) ** 0.5


def frequency_grid(box_size: int, pixel_size: float, *, device=None, dtype=torch.float32):
    """``(kx, ky)`` in Å⁻¹ on the ``rfft2`` grid, each ``[D, D//2 + 1]``."""
    ky = torch.fft.fftfreq(box_size, d=pixel_size, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box_size, d=pixel_size, device=device, dtype=dtype)
    return torch.meshgrid(kx, ky, indexing="xy")


def compute_ctf(box_size: int, pixel_size: float, defocus_u, defocus_v, defocus_angle, voltage, cs,
                amplitude_contrast, phase_shift=0.0, bfactor=0.0, *, device=None, dtype=torch.float32):
    """``[B, D, D//2 + 1]`` CTF values (RELION sign) for B particles.

    Units as in RELION: defocus in Å, angles in degrees, voltage in kV, Cs in mm, B-factor in Å².
    Every parameter is a scalar or a length-B sequence/array/tensor.
    """
    params = [torch.as_tensor(x, dtype=torch.float64) for x in
              (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift, bfactor)]
    params = torch.broadcast_tensors(*[p.reshape(-1) for p in params])
    dfu, dfv, dfang, kv, cs_mm, w, phase, bf = (p.to(device=device, dtype=dtype)[:, None, None] for p in params)
    kx, ky = frequency_grid(box_size, pixel_size, device=device, dtype=dtype)
    k2 = kx * kx + ky * ky
    theta = torch.atan2(ky, kx)
    lam = electron_wavelength(kv)
    defocus = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (theta - torch.deg2rad(dfang))))
    cs_a = cs_mm * 1e7
    chi = 2 * math.pi * (-0.5 * defocus * lam * k2 + 0.25 * cs_a * lam ** 3 * k2 * k2) - torch.deg2rad(phase)
    return -torch.sin(chi - torch.asin(w)) * torch.exp(-bf * k2 / 4)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Convolve ``[B, D, D]`` images with the CTF: multiply their ``rfft2`` by ``ctf [B, D, D//2+1]``."""
    D = images.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(images) * ctf, s=(D, D))


def wiener_filter(images: torch.Tensor, ctf: torch.Tensor, snr: float = 10.0) -> torch.Tensor:
    """Approximately undo the CTF: multiply the ``rfft2`` by ``CTF / (CTF² + 1/snr)``."""
    D = images.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(images) * ctf / (ctf * ctf + 1.0 / snr), s=(D, D))


def particle_ctf(particles, idx, *, device=None):
    """``[k, D, D//2+1]`` CTFs of particles ``idx`` of a :class:`cryogs.io.particles.ParticleSet` (its
    ``ctf`` parameters, box, pixel size and data flags), or None without CTF values.

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
