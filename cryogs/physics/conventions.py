"""The one place where cryogs fixes its geometric conventions.

Rotation
    RELION's matrix ``A = Rz(-psi) @ Ry(-tilt) @ Rz(-rot)`` built from the ZYZ Euler angles
    (rot, tilt, psi) in degrees. ``A`` maps *map* coordinates to *image* coordinates; it equals
    ``scipy.spatial.transform.Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True)
    .as_matrix().T``.

Projection
    ``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz``. A 3D Gaussian with mean μ and covariance Σ projects to a 2D
    Gaussian with mean ``(A μ)_xy`` and covariance equal to the top-left 2×2 block of ``A Σ Aᵀ``;
    its integral equals the Gaussian's amplitude (its integrated mass).

Arrays and pixels
    Volumes are ``V[z, y, x]`` and images ``I[y, x]``. The centre is at index ``D // 2`` on every
    axis and pixel centres sit at integer indices, so index ``i`` is at ``(i - D // 2) * pixel_size``
    Å. Images hold mass per pixel and volumes mass per voxel, so summing an image (or a volume)
    gives the total mass.

Shifts
    A RELION origin ``o`` (Å) means the observed image is the centred projection translated by
    ``-o``: a Gaussian at image position ``u`` (px) in the centred projection is observed at
    ``u - o / pixel_size``.

Quaternions
    Unit quaternions are ``(w, x, y, z)``, scalar first; they rotate a Gaussian's principal axes
    into map coordinates (``Σ = R diag(s²) Rᵀ``).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "quat_to_matrix",
    "matrix_to_quat",
    "axis_angle_to_matrix",
    "random_rotations",
    "centre_index",
]


def centre_index(box_size: int) -> int:
    """Index of the origin on every axis of a box of ``box_size`` samples."""
    return box_size // 2


def _rz(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*angle.shape, 3, 3)


def _ry(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*angle.shape, 3, 3)


def euler_to_matrix(euler_deg) -> torch.Tensor:
    """RELION rotation matrices ``A`` from ``[..., 3]`` Euler angles (rot, tilt, psi) in degrees.

    Differentiable; accepts numpy arrays or tensors and returns a tensor (float64 for numpy input).
    """
    e = torch.as_tensor(euler_deg)
    if not e.is_floating_point():
        e = e.double()
    r = torch.deg2rad(e)
    return _rz(-r[..., 2]) @ _ry(-r[..., 1]) @ _rz(-r[..., 0])


def matrix_to_euler(matrices) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`: ``[..., 3, 3]`` ``A`` to (rot, tilt, psi) in degrees."""
    a = np.asarray(torch.as_tensor(matrices).detach().cpu(), dtype=np.float64)
    flat = a.reshape(-1, 3, 3)
    eul = Rotation.from_matrix(np.transpose(flat, (0, 2, 1))).as_euler("ZYZ", degrees=True)
    return eul.reshape(*a.shape[:-2], 3)


def quat_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from ``[..., 4]`` quaternions ``(w, x, y, z)``, normalised first."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quat(matrices) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` with ``w ≥ 0`` from ``[..., 3, 3]`` rotation matrices."""
    m = torch.as_tensor(matrices)
    flat = np.asarray(m.detach().cpu(), dtype=np.float64).reshape(-1, 3, 3)
    xyzw = Rotation.from_matrix(flat).as_quat()
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    wxyz *= np.where(wxyz[:, :1] < 0, -1.0, 1.0)
    out = torch.from_numpy(wxyz.reshape(*m.shape[:-2], 4))
    return out.to(m.dtype if m.is_floating_point() else torch.float64)


def axis_angle_to_matrix(rotvec) -> torch.Tensor:
    """Rotation matrices from ``[..., 3]`` axis-angle vectors (radians), via Rodrigues' formula."""
    v = torch.as_tensor(rotvec)
    if not v.is_floating_point():
        v = v.double()
    theta = v.norm(dim=-1, keepdim=True)
    k = v / theta.clamp_min(1e-30)
    kx, ky, kz = k.unbind(-1)
    z = torch.zeros_like(kx)
    K = torch.stack([z, -kz, ky, kz, z, -kx, -ky, kx, z], -1).reshape(*v.shape[:-1], 3, 3)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + s * K + (1 - c) * (K @ K)


def random_rotations(n: int, *, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """``[n, 3, 3]`` rotations drawn uniformly from SO(3) (Haar measure).

    A normalised 4D standard normal vector is a uniform unit quaternion.
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return quat_to_matrix(q).to(dtype)

