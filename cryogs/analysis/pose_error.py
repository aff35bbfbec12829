"""How far estimated poses are from true ones, up to what ab initio cannot know: a global rotation of
the map, and its hand.

If the estimated map is the true one rotated, ``V_est(u) = V_true(G u)``, its projection in pose ``A``
is the true map's in pose ``A Gᵀ``, so ``A_est = A_true G``. If it is the mirror image,
``V_est(u) = V_true(G M u)`` with ``M = diag(1, 1, −1)``, then ``A_est = M A_true M G`` (``M A M`` is a
rotation: the mirrored map projects like the true one seen from the mirrored direction, the image
mirrored back). For each hand ``G`` is the orthogonal Procrustes solution
``argmax_G tr(Gᵀ Σ A_trueᵀ A_est)`` (an SVD), refined once on the particles within 30° of it so that
a minority of wrong poses does not tilt it; the hand with the smaller median error is reported.
"""
from __future__ import annotations

import numpy as np

MIRROR = np.diag([1.0, 1.0, -1.0])


def _procrustes(true: np.ndarray, est: np.ndarray, weights=None) -> np.ndarray:
    """``G`` (a rotation) minimising ``Σ w ‖est − true G‖²``."""
    w = np.ones(len(true)) if weights is None else weights
    m = np.einsum("n,nji,njk->ik", w, true, est)  # Σ trueᵀ est
    u, _, vt = np.linalg.svd(m)
    s = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    return u @ s @ vt


def angles_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees of ``a bᵀ`` for ``[n, 3, 3]`` rotations."""
    cos = (np.einsum("nij,nij->n", a, b) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def pose_errors(estimated, true) -> dict:
    """Per-particle angular errors (degrees) of ``estimated`` against ``true`` (``[n, 3, 3]`` RELION
    matrices) after the best global rotation, for the better hand.

    Returns ``{"errors": [n], "median_degrees", "within_10_degrees" (fraction), "mirrored" (bool),
    "rotation" (G)}``.
    """
    est = np.asarray(estimated, dtype=np.float64)
    tru = np.asarray(true, dtype=np.float64)
    best = None
    for mirrored in (False, True):
        t = MIRROR @ tru @ MIRROR if mirrored else tru
        g = _procrustes(t, est)
        for _ in range(2):
            err = angles_degrees(est, t @ g)
            inlier = err < max(30.0, np.median(err))
            if inlier.sum() >= 3:
                g = _procrustes(t[inlier], est[inlier])
        err = angles_degrees(est, t @ g)
        result = {"errors": err, "median_degrees": float(np.median(err)),
                  "within_10_degrees": float(np.mean(err <= 10)), "mirrored": mirrored, "rotation": g}
        if best is None or result["median_degrees"] < best["median_degrees"]:
            best = result
    return best
