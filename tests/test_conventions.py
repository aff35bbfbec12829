import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryogs.physics.conventions import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_quat,
    quat_to_matrix,
    random_rotations,
)


def _random_euler(n, seed):
    r = np.random.default_rng(seed)
    return np.stack([r.uniform(-180, 180, n), r.uniform(0, 180, n), r.uniform(-180, 180, n)], 1)


def test_euler_matches_relion_formula_and_scipy(rng):
    eul = _random_euler(50, int(torch.randint(0, 2**31, (1,), generator=rng)))
    A = euler_to_matrix(eul).numpy()
    ref = Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(A, ref, atol=1e-12)
    # RELION's Euler_angles2matrix, element by element (src/euler.cpp)
    a, b, g = np.deg2rad(eul).T
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    relion = np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb,
                       -sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb,
                       sc, ss, cb], 1).reshape(-1, 3, 3)
    np.testing.assert_allclose(A, relion, atol=1e-12)


def test_euler_round_trip(rng):
    eul = _random_euler(40, int(torch.randint(0, 2**31, (1,), generator=rng)))
    back = matrix_to_euler(euler_to_matrix(eul))
    np.testing.assert_allclose(euler_to_matrix(back).numpy(), euler_to_matrix(eul).numpy(), atol=1e-10)


def test_quaternion_conversions_match_scipy(rng):
    q = torch.randn(30, 4, generator=rng, dtype=torch.float64)
    R = quat_to_matrix(q)
    qn = (q / q.norm(dim=-1, keepdim=True)).numpy()
    ref = Rotation.from_quat(qn[:, [1, 2, 3, 0]]).as_matrix()
    np.testing.assert_allclose(R.numpy(), ref, atol=1e-12)
    back = matrix_to_quat(R)
    np.testing.assert_allclose(quat_to_matrix(back).numpy(), R.numpy(), atol=1e-12)
    assert (back[:, 0] >= 0).all()


def test_axis_angle_matches_scipy(rng):
    v = torch.randn(25, 3, generator=rng, dtype=torch.float64) * 2
    np.testing.assert_allclose(axis_angle_to_matrix(v).numpy(), Rotation.from_rotvec(v.numpy()).as_matrix(),
                               atol=1e-12)


@pytest.mark.statistical
def test_random_rotations_are_uniform_rotations(rng):
    """Statistical (seeded: see the ``statistical`` marker). Bernstein bound: a false failure has probability below
    1e-10."""
    R = random_rotations(20000, generator=rng, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(1, 2), eye.expand_as(R), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(len(R), dtype=torch.float64))
    # Haar measure: E[R] = 0 and the image of a fixed axis is uniform on the sphere (E[cos θ] = 0, E[cos² θ] = 1/3).
    # Bernstein's inequality for means of n = 20000 bounded draws: entries (|x| ≤ 1, variance 1/3) miss 0.03 with
    # probability < 9·2·exp(−n·0.03²/(2(1/3 + 0.03/3))) = 1e-10; cos² θ (variance 1/5 − 1/9) misses 0.02 with < 1e-18.
    assert R.mean(0).abs().max() < 0.03
    z = R[:, :, 2]
    assert abs(float((z[:, 2] ** 2).mean()) - 1 / 3) < 0.02
