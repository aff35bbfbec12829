"""cryogs: 3D Gaussian splatting for cryo-EM reconstruction."""
from .conventions import euler_to_matrix, matrix_to_euler, quat_to_matrix, random_rotations
from .errors import CryogsError
from .gaussian_math import CUTOFF_SIGMA
from .projection import project, voxelize

__version__ = "0.1.0"

__all__ = [
    "CUTOFF_SIGMA",
    "CryogsError",
    "euler_to_matrix",
    "matrix_to_euler",
    "project",
    "quat_to_matrix",
    "random_rotations",
    "voxelize",
]
