"""The ``cpu`` backend (OpenMP ops of ``cryogs.render._C``, csrc/project_cpu.cpp and voxelize_cpu.cpp)
against the float64 ``dense`` reference, torch autograd and the torch voxelizer, with the edge cases
of the other backends.

float32 inputs run the float32 ops and must meet the CUDA backend's tolerances (1e-5 forward, 1e-4
gradients, relative to the largest value); float64 inputs run the same code in float64 and must
match to ~1e-12 and pass ``torch.autograd.gradcheck``. Inputs are fresh random draws (seed printed on
failure), kept away from the cutoff by ``cuda_helpers.make_case`` where float32 rounding could move
a pixel across it. Outputs are NaN-poisoned before every run, so an unwritten element cannot pass.

Skipped when the extension lacks the CPU ops, except with ``CRYOGS_REQUIRE_EXTENSION=1``, where that
fails.
"""
from __future__ import annotations

import math

import pytest
import torch

from cryogs import CryogsError, project, voxelize
from cryogs.render.gaussian_math import CUTOFF_SIGMA, covariance_3d
from cryogs.render.project import resolve_backend
from cryogs.render.reference import voxelize_splat

from cuda_helpers import NAMES, cpu_ops_or_skip, dense_reference, guard_cutoff, make_case, rel_err
from helpers import random_mixture, random_poses

F64 = torch.float64
F32 = torch.float32
FWD_TOL = 1e-5
GRAD_TOL = 1e-4


@pytest.fixture(autouse=True)
def C():
    """The extension, with every op output NaN-poisoned before each run, for every test of this file."""
    mod = cpu_ops_or_skip()
    before = mod.debug_poison()
    mod.set_debug_poison(True)
    yield mod
    mod.set_debug_poison(before)


def _run(case, v=None, dtype=F32, **kw):
    """cpu image (float64) and gradients of (I·v).sum() for every input."""
    leaves = [t.to(dtype).clone().requires_grad_(v is not None) for t in case["params"]]
    img = project(*leaves, box_size=case["D"], pixel_size=case["p"], backend="cpu", cutoff=case["k"], **kw)
    assert img.dtype == dtype and img.shape == (leaves[4].shape[0], case["D"], case["D"])
    assert torch.isfinite(img).all(), "unwritten (NaN-poisoned) or non-finite pixels"
    if v is None:
        return img.detach().to(F64), None
    (img * v.to(dtype)).sum().backward()
    return img.detach().to(F64), {n: t.grad.to(F64) for n, t in zip(NAMES, leaves)}


def _check_against_dense(case, rng, dtype=F32):
    B, D = case["params"][4].shape[0], case["D"]
    v = torch.randn(B, D, D, generator=rng, dtype=F64)
    ref, ref_grads = dense_reference(case, v)
    img, grads = _run(case, v, dtype)
    fwd_tol, grad_tol = (FWD_TOL, GRAD_TOL) if dtype == F32 else (1e-12, 1e-10)
    assert rel_err(img, ref) <= fwd_tol, f"forward {rel_err(img, ref):.2e}"
    for n in NAMES:
        assert torch.isfinite(grads[n]).all(), n
        err = rel_err(grads[n], ref_grads[n])
        assert err <= grad_tol, f"{n} gradient {err:.2e}"
    return img, grads


CASES = {
    "box_1": {"B": 2, "N": 20, "D": 1, "spread": 1.0, "scale_range": (0.6, 2.0)},
    "box_8_single_image": {"B": 1, "N": 15, "D": 8, "spread": 3.0},
    "box_37": {"B": 3, "N": 40, "D": 37},
    "box_37_single_image": {"B": 1, "N": 40, "D": 37},
    "large_gaussians": {"B": 2, "N": 10, "D": 32, "scale_range": (8.0, 20.0)},
    "tiny": {"B": 2, "N": 30, "D": 32, "pixel_size": 1.0, "spread": 6.0, "scale_range": (0.3, 0.8)},
    "anisotropic": {"B": 2, "D": 40, "N": 40, "pixel_size": 1.0, "spread": 6.0, "scale_range": (0.4, 5.0), "tol": 2e-4},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_forward_and_gradients_match_dense(rng, name):
    _check_against_dense(make_case(rng, **CASES[name]), rng)


@pytest.mark.parametrize("D", [1, 8, 37])
def test_float64_forward_and_gradients_match_dense_exactly(rng, D):
    """In float64 the same code is the specification up to rounding (no cutoff guard needed)."""
    case = make_case(rng, B=3, N=25, D=D, spread=2.0 if D < 10 else 10.0, tol=0)
    _check_against_dense(case, rng, dtype=F64)


def test_gradcheck_float64_every_input(rng):
    D, p = 14, 1.3
    g = random_mixture(3, rng, spread=3.0, scale_range=(1.2, 2.5))
    R, sh = random_poses(2, rng, max_shift=2.0)
    # the hard cutoff is a jump: keep every pixel 1e-3·k² away from it (see test_projection's gradcheck)
    params = guard_cutoff((*g, R, sh), D, p, CUTOFF_SIGMA, tol=1e-3, gen=rng)
    inputs = [t.clone().requires_grad_(True) for t in params]
    v = torch.randn(2, D, D, generator=rng, dtype=F64)

    def f(means, quats, scales, amps, rot, shifts):
        return (project(means, quats, scales, amps, rot, shifts, box_size=D, pixel_size=p, backend="cpu") * v).sum()

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _edge_params(rng, D, p):
    """Gaussians (in image 0, identity pose) astride tile and image borders, outside, one larger than
    the image, tiny and thin; image 1 sees them under a random rotation and shift."""
    c0 = D // 2
    px = [  # (u_x, u_y, sigma_x, sigma_y, sigma_z) in pixels
        (16.0, 20.0, 1.5, 1.5, 1.5), (15.5, 15.5, 2.0, 1.0, 1.5),  # tile borders
        (0.0, 10.0, 2.0, 2.0, 2.0), (-1.5, 22.0, 2.0, 1.5, 2.0), (D - 0.5, D - 1.0, 1.8, 1.8, 1.8),  # image borders
        (D + 0.4, 5.0, 1.0, 1.0, 1.0),  # centre outside, footprint inside
        (-40.0, 12.0, 2.0, 2.0, 2.0), (12.0, D + 30.0, 1.5, 1.5, 1.5),  # wholly outside
        (c0 + 1.3, c0 - 2.1, 2.0 * D, 1.5 * D, 1.0 * D),  # larger than the image
        (10.2, 30.7, 0.3, 0.35, 0.3),  # tiny (< 1 px)
        (20.3, 24.1, 0.5, 6.0, 1.0), (8.1, 33.3, 5.0, 0.6, 0.8), (30.0, 12.0, 0.05, 4.0, 3.0),  # thin
    ]
    t = torch.tensor(px, dtype=F64)
    N = t.shape[0]
    means = torch.zeros(N, 3, dtype=F64)
    means[:, 0] = (t[:, 0] - c0) * p
    means[:, 1] = (t[:, 1] - c0) * p
    means[:, 2] = torch.randn(N, generator=rng, dtype=F64) * 3
    scales = t[:, 2:] * p
    quats = torch.zeros(N, 4, dtype=F64)
    quats[:, 0] = 1.0
    quats[-3:-1] = torch.randn(2, 4, generator=rng, dtype=F64)  # rotate two thin ones
    amps = 0.5 + torch.rand(N, generator=rng, dtype=F64)
    rot = torch.stack([torch.eye(3, dtype=F64), random_poses(1, rng)[0][0]])
    shifts = torch.tensor([[0.0, 0.0], [1.7, -2.3]], dtype=F64)
    return means, quats, scales, amps, rot, shifts


def test_edge_cases_match_dense(rng):
    D, p = 40, 1.0
    case = make_case(rng, D=D, pixel_size=p, params=_edge_params(rng, D, p), tol=2e-4)
    _check_against_dense(case, rng)


def test_all_gaussians_off_image_give_blank_images_and_zero_gradients(rng):
    means, quats, scales, amps = random_mixture(6, rng, spread=1.0)
    means[:, 0] += 200.0  # far right of a 24 px, 1 Å/px box in every pose
    rot = torch.eye(3, dtype=F64)[None].repeat(2, 1, 1)
    case = {"params": (means, quats, scales, amps, rot, torch.zeros(2, 2, dtype=F64)), "D": 24, "p": 1.0, "k": 3.5}
    img, grads = _run(case, torch.randn(2, 24, 24, generator=rng, dtype=F64))
    assert (img == 0).all()
    assert all((g == 0).all() for g in grads.values())


def test_one_gaussian_larger_than_the_image(rng):
    D = 24
    params = (torch.zeros(1, 3, dtype=F64), torch.tensor([[1.0, 0, 0, 0]], dtype=F64),
              torch.full((1, 3), 3.0 * D, dtype=F64), torch.ones(1, dtype=F64), torch.eye(3, dtype=F64)[None],
              torch.zeros(1, 2, dtype=F64))
    case = {"params": params, "D": D, "p": 1.0, "k": 3.5}
    img, _ = _run(case)
    ref, _ = dense_reference(case)
    assert (img > 0).all() and rel_err(img, ref) <= FWD_TOL


def test_invalid_gaussians_and_poses_cover_nothing_and_get_finite_gradients(rng):
    """A zero, NaN or infinite quaternion, zero or NaN scales, a NaN mean, an infinite amplitude, a NaN
    rotation or shift: the pair covers nothing, and every gradient is finite: zero for the invalid
    entries, and for the valid ones what it is without the invalid ones."""
    means, quats, scales, amps = random_mixture(10, rng, spread=4.0)
    rot, shifts = random_poses(3, rng, max_shift=2.0)
    bad = {0: ("quats", [0.0, 0, 0, 0]), 1: ("quats", [float("nan"), 0, 0, 1]), 2: ("quats", [float("inf"), 0, 0, 0]),
           3: ("scales", [0.0, 0, 0]), 4: ("scales", [float("nan"), 1, 1]), 5: ("means", [float("nan"), 0, 0]),
           6: ("amps", float("inf"))}
    leaves = {"means": means, "quats": quats, "scales": scales, "amps": amps}
    for g, (name, value) in bad.items():
        leaves[name][g] = torch.tensor(value, dtype=F64)
    rot[2, 0, 0], shifts[1, 1] = float("nan"), float("inf")
    weights = torch.randn(3, 24, 24, generator=rng, dtype=F64)
    for dtype in (F32, F64):
        def render(m, q, s, a, r, t):
            return project(m, q, s, a, r, t, box_size=24, pixel_size=1.5, backend="cpu")

        inputs = [t.to(dtype).clone().requires_grad_(True) for t in (*leaves.values(), rot, shifts)]
        img = render(*inputs)
        (img * weights.to(dtype)).sum().backward()
        for name, t in zip(NAMES, inputs):
            assert torch.isfinite(t.grad).all(), name
        assert (img[1:] == 0).all() and torch.isfinite(img).all()  # images 1 and 2 have an invalid pose
        for t in inputs[:4]:
            assert (t.grad[:7] == 0).all()
        for t in inputs[4:]:
            assert (t.grad[1:] == 0).all()
        good = [t[7:].to(dtype).clone().requires_grad_(True) for t in leaves.values()]
        good += [rot[:1].to(dtype).clone().requires_grad_(True), shifts[:1].to(dtype).clone().requires_grad_(True)]
        ref = render(*good)
        (ref * weights[:1].to(dtype)).sum().backward()
        assert torch.equal(img[:1].detach(), ref.detach())
        for t, r in zip(inputs, good):
            torch.testing.assert_close(t.grad[7:] if t.shape[0] == 10 else t.grad[:1], r.grad)


def test_pose_only_backward_with_parameters_detached(rng):
    case = make_case(rng, B=3, N=30, D=32)
    B, D = 3, 32
    v = torch.randn(B, D, D, generator=rng, dtype=F64)
    _, ref = dense_reference(case, v)
    P = [t.float() for t in case["params"]]
    rot, shifts = P[4].requires_grad_(True), P[5].requires_grad_(True)
    img = project(*P[:4], rot, shifts, box_size=D, pixel_size=case["p"], backend="cpu", cutoff=case["k"])
    (img * v.float()).sum().backward()
    assert all(t.grad is None for t in P[:4])
    assert rel_err(rot.grad, ref["rotations"]) <= GRAD_TOL and rel_err(shifts.grad, ref["shifts"]) <= GRAD_TOL
    assert (rot.grad[:, 2] == 0).all()


def test_backward_twice_with_retain_graph(rng):
    case = make_case(rng, B=2, N=20, D=24, tol=0)
    leaves = [t.float().requires_grad_(True) for t in case["params"]]
    img = project(*leaves, box_size=24, pixel_size=case["p"], backend="cpu", cutoff=case["k"])
    loss = img.square().sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # and bitwise deterministic


def test_bitwise_deterministic_across_thread_counts(rng):
    """Every pixel and every gradient is summed in a fixed order, whatever the number of threads."""
    case = make_case(rng, B=3, N=200, D=48, tol=0)
    v = torch.randn(3, 48, 48, generator=rng, dtype=F64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(case, v)
        torch.set_num_threads(2)
        two = _run(case, v)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    for n in NAMES:
        assert torch.equal(one[1][n], two[1][n]), n


@pytest.mark.parametrize("B,N", [(0, 5), (2, 0), (0, 0), (1, 1)])
def test_empty_and_minimal_inputs(B, N):
    D = 16
    means = torch.zeros(N, 3, requires_grad=True)
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(N, 1).requires_grad_(True)
    scales = torch.full((N, 3), 2.0, requires_grad=True)
    amps = torch.ones(N, requires_grad=True)
    rot = torch.eye(3).repeat(B, 1, 1).requires_grad_(True)
    shifts = torch.zeros(B, 2, requires_grad=True)
    img = project(means, quats, scales, amps, rot, shifts, box_size=D, pixel_size=1.0, backend="cpu")
    assert img.shape == (B, D, D) and torch.isfinite(img).all()
    if B * N == 0:
        assert (img == 0).all()
    img.sum().backward()
    for t in (means, quats, scales, amps, rot, shifts):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


def test_shifts_none_and_other_dtypes(rng):
    case = make_case(rng, B=2, N=20, D=24, tol=0)
    P = [t.float() for t in case["params"]]
    kw = {"box_size": 24, "pixel_size": case["p"], "backend": "cpu", "cutoff": case["k"]}
    assert torch.equal(project(*P[:5], None, **kw), project(*P[:5], torch.zeros_like(P[5]), **kw))
    half = project(*[t.to(torch.bfloat16) for t in P], **kw)  # computed in float32, returned in bfloat16
    assert half.dtype == torch.bfloat16


def test_validation_errors(C):
    good = [torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2, 3), torch.ones(2), torch.eye(3)[None], torch.zeros(1, 2)]
    bad = list(good)
    bad[1] = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match=r"quats must have shape \[2, 4\]"):
        C.cpu_project_fwd(*bad, 16, 1.0, 3.0)
    bad = list(good)
    bad[4] = bad[4].double()
    with pytest.raises(RuntimeError, match="rotations must have dtype"):
        C.cpu_project_fwd(*bad, 16, 1.0, 3.0)
    bad = list(good)
    bad[0] = torch.zeros(3, 2).t()
    with pytest.raises(RuntimeError, match="means must be contiguous"):
        C.cpu_project_fwd(*bad, 16, 1.0, 3.0)
    with pytest.raises(RuntimeError, match="pixel_size must be positive"):
        C.cpu_project_fwd(*good, 16, -1.0, 3.0)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        C.cpu_voxelize_fwd(*[t.half() for t in good[:4]], 8, 1.0, 3.0)
    with pytest.raises(CryogsError, match="backend 'cpu' needs CPU tensors"):
        resolve_backend("cpu", torch.device("cuda"))


def test_auto_resolves_to_cpu_for_cpu_tensors():
    from cryogs.commands._options import BACKEND_CHOICES
    from cryogs.render.project import BACKENDS

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("cpu", torch.device("cpu")) == "cpu"
    assert BACKEND_CHOICES == BACKENDS  # the CLI's --backend offers every backend


# ---- voxelize ------------------------------------------------------------------------------------
def test_voxelize_matches_torch(rng):
    """float64: to rounding. float32: the map's largest voxel to 1e-5, after keeping every voxel 2e-5·k²
    away from the cutoff sphere (see test_cuda.py's voxelize test)."""
    D, p, k = 24, 1.3, 3.5
    means, quats, scales, amps = (t.float().double() for t in random_mixture(25, rng, spread=6.0,
                                                                             scale_range=(0.8, 4.0)))
    ref = voxelize_splat(means, covariance_3d(quats, scales), amps, box_size=D, pixel_size=p, cutoff=k)
    got = voxelize(means, quats, scales, amps, box_size=D, pixel_size=p, backend="cpu", cutoff=k)
    assert got.dtype == F64 and rel_err(got, ref) <= 1e-12
    cov = covariance_3d(quats, scales) / p ** 2
    ax = torch.arange(D, dtype=F64)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    d = torch.stack([x, y, z], -1).reshape(1, -1, 3) - (means / p + D // 2)[:, None]
    q = torch.einsum("npi,nij,npj->np", d, torch.linalg.inv(cov), d)
    keep = ((q - k * k).abs() / (k * k)).amin(1) >= 2e-5
    means, quats, scales, amps = means[keep], quats[keep], scales[keep], amps[keep]
    ref = voxelize_splat(means, covariance_3d(quats, scales), amps, box_size=D, pixel_size=p, cutoff=k)
    got = voxelize(*[t.float() for t in (means, quats, scales, amps)], box_size=D, pixel_size=p, backend="auto",
                   cutoff=k)
    assert got.dtype == F32 and rel_err(got, ref) <= FWD_TOL


def test_voxelize_gradient_falls_back_to_torch_and_empty(rng):
    leaves = [t.float().requires_grad_(True) for t in random_mixture(5, rng, spread=4.0)]
    vol = voxelize(*leaves, box_size=16, pixel_size=1.5, backend="cpu")
    vol.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    z = torch.zeros(0, 3)
    empty = voxelize(z, torch.zeros(0, 4), z, torch.zeros(0), box_size=8, pixel_size=1.0, backend="cpu")
    assert empty.shape == (8, 8, 8) and (empty == 0).all()


def test_mass_is_conserved_for_a_centred_gaussian():
    k = 3.5
    img = project(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 2.0), torch.full((1,), 2.0),
                  torch.eye(3)[None], None, box_size=48, pixel_size=1.0, backend="cpu", cutoff=k)
    assert float(img.sum()) == pytest.approx(2.0 * (1 - math.exp(-k * k / 2)), rel=2e-3)
