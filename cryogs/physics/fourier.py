"""Fourier cropping of images and of half-spectra (``rfft2`` layout ``[..., D, D//2 + 1]``)."""
from __future__ import annotations

import torch

from cryogs.errors import CryogsError


def _check(D: int, d: int) -> None:
    if not 1 <= d <= D:
        raise CryogsError(f"cannot Fourier-crop {D}px images to {d}px")


def crop_half_spectrum(spectrum: torch.Tensor, size: int) -> torch.Tensor:
    """The ``[..., size, size//2 + 1]`` block of a ``[..., D, D//2 + 1]`` half-spectrum holding the same
    frequencies (|k| ≤ size/2 cycles per box on each axis): e.g. a CTF or a whitening filter sampled on
    the ``D`` grid, for images Fourier-cropped to ``size`` with pixels ``D/size`` times larger."""
    D, d = spectrum.shape[-2], int(size)
    _check(D, d)
    lo, hi = d // 2, (d - 1) // 2  # kept frequencies -lo..hi along y; 0..d//2 along x
    return torch.cat([spectrum[..., : hi + 1, : d // 2 + 1], spectrum[..., D - lo:, : d // 2 + 1]], dim=-2)


def fourier_crop_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample ``[..., D, D]`` real images to ``[..., size, size]`` by Fourier cropping, on their device.

    The image centre (index ``D//2``) is the origin of the transform, so it maps to index ``size//2``
    and a centred blob stays centred. The zero frequency is kept unscaled, so the image sum (mass) is
    unchanged and each pixel holds the mass of its larger area. For even ``size`` the +N and −N
    frequencies (N = size/2) of the original fall on one frequency of the new grid: they are added
    (as :func:`scipy.signal.resample` does), so the result is the original low-pass filtered to
    ``|k| ≤ N`` and sampled at the new pixel centres.
    """
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise CryogsError(f"Fourier cropping needs square images [..., D, D], got shape {list(images.shape)}")
    D, d = images.shape[-1], int(size)
    _check(D, d)
    if d == D:
        return images.clone()
    f = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    g = crop_half_spectrum(f, d)
    if d % 2 == 0:
        lo = d // 2
        g[..., d - lo, :] += f[..., lo, : d // 2 + 1]  # join +N into the −N (Nyquist) row
        g[..., :, -1] *= 2  # join −N into +N along x (irfft keeps the real part of the Nyquist column)
    return torch.fft.fftshift(torch.fft.irfft2(g, s=(d, d)), dim=(-2, -1))
