"""cryogs: 3D Gaussian splatting for cryo-EM reconstruction.

The package follows the data: ``io`` (particle files, maps) → ``physics`` (conventions, CTF, noise)
→ ``render`` (Γ: the projection of Gaussians) → ``model`` (the Gaussians) → ``reconstruct``
(fitting) → ``analysis`` (FSC, figures); ``commands`` is the command line. The public API below is
imported on first use, so ``import cryogs`` (and ``cryogs --help``) does not load torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CryogsError": "cryogs.errors",
    "euler_to_matrix": "cryogs.physics.conventions",
    "matrix_to_euler": "cryogs.physics.conventions",
    "quat_to_matrix": "cryogs.physics.conventions",
    "random_rotations": "cryogs.physics.conventions",
    "CUTOFF_SIGMA": "cryogs.render.gaussian_math",
    "project": "cryogs.render.project",
    "voxelize": "cryogs.render.project",
    "GaussianModel": "cryogs.model.gaussians",
    "ParticleSet": "cryogs.io.particles",
    "load_particles": "cryogs.io.load",
    "TrainConfig": "cryogs.reconstruct.config",
    "default_config": "cryogs.reconstruct.config",
    "run_training": "cryogs.reconstruct.fit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cryogs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
