"""The CUDA backend against the float64 dense reference, plus exact binning and edge cases.

Every test is marked ``cuda`` and is skipped without a GPU or the compiled extension (tests/conftest.py,
and the module-level skip below). Inputs are fresh random draws (seed printed on failure); the
reference is ``project(..., backend='dense', cutoff=k)`` on float64 copies of the float32 inputs.
All outputs of the ops are NaN-poisoned before every kernel run (``_C.set_debug_poison``), so an
unwritten element cannot pass. ``scripts/sanitize.sh`` runs this file under compute-sanitizer.
"""
from __future__ import annotations

import math

import pytest
import torch

from cryogs import project, voxelize
from cryogs.render import _extension, binning
from cryogs.render.gaussian_math import covariance_3d
from cryogs.render.reference import voxelize_splat

from cuda_helpers import NAMES, dense_reference, make_case, rel_err
from helpers import random_mixture

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _extension.available(), reason="needs a CUDA GPU and the compiled extension"),
]

F64 = torch.float64
DEV = "cuda"
FWD_TOL = 1e-5
GRAD_TOL = 1e-4


@pytest.fixture(autouse=True)
def poison():
    """NaN-poison every op output before each kernel run, for every test of this file."""
    C = _extension.module()
    before = C.debug_poison()
    C.set_debug_poison(True)
    yield C
    C.set_debug_poison(before)


def _cuda_leaves(case):
    return [t.to(DEV, torch.float32).requires_grad_(True) for t in case["params"]]


def _run_cuda(case, v=None, **kw):
    """CUDA image (float64 on CPU) and gradients of (I·v).sum() through cryogs.render.cuda."""
    from cryogs.render.cuda import project_cuda

    leaves = _cuda_leaves(case)
    img = project_cuda(*leaves, box_size=case["D"], pixel_size=case["p"], cutoff=case["k"], **kw)
    assert img.dtype == torch.float32 and img.device.type == torch.device(DEV).type
    assert torch.isfinite(img).all(), "unwritten (NaN-poisoned) or non-finite pixels"
    if v is None:
        return img.detach().cpu().to(F64), None
    (img * v.to(DEV, torch.float32)).sum().backward()
    return img.detach().cpu().to(F64), {n: t.grad.cpu().to(F64) for n, t in zip(NAMES, leaves)}


def _check_against_dense(case, rng, **kw):
    B, D = case["params"][4].shape[0], case["D"]
    v = torch.randn(B, D, D, generator=rng, dtype=F64)
    ref, ref_grads = dense_reference(case, v)
    img, grads = _run_cuda(case, v, **kw)
    assert rel_err(img, ref) <= FWD_TOL, f"forward {rel_err(img, ref):.2e}"
    for n in NAMES:
        assert torch.isfinite(grads[n]).all(), n
        err = rel_err(grads[n], ref_grads[n])
        assert err <= GRAD_TOL, f"{n} gradient {err:.2e}"
    return img, grads


CASES = {
    "standard": dict(B=3, N=60, D=48),
    "odd_box_single_image": dict(B=1, N=40, D=37),
    "box_16": dict(B=2, N=30, D=16, spread=5.0),
    "large_gaussians": dict(N=20, scale_range=(8.0, 20.0)),
    "tiny": dict(N=30, D=32, pixel_size=1.0, spread=6.0, scale_range=(0.3, 0.8)),
    "anisotropic": dict(D=40, pixel_size=1.0, spread=6.0, scale_range=(0.4, 5.0), tol=2e-4),
    "many_gaussians": dict(B=4, N=400, D=64, spread=14.0, scale_range=(1.0, 3.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_dense(rng, name):
    _check_against_dense(make_case(rng, **CASES[name]), rng)


def _edge_params(rng, D, p):
    """Gaussians placed (in image 0, identity pose) astride tile and image borders, outside, huge,
    tiny and highly anisotropic; image 1 sees them under a random rotation and shift."""
    c0 = D // 2
    px = [  # (u_x, u_y, sigma_x, sigma_y, sigma_z) in pixels
        (16.0, 20.0, 1.5, 1.5, 1.5), (15.5, 15.5, 2.0, 1.0, 1.5), (31.7, 16.2, 1.2, 2.5, 1.0),  # tile borders
        (0.0, 10.0, 2.0, 2.0, 2.0), (-1.5, 22.0, 2.0, 1.5, 2.0), (D - 0.5, D - 1.0, 1.8, 1.8, 1.8),  # image borders
        (D + 0.4, 5.0, 1.0, 1.0, 1.0),  # centre outside, footprint inside
        (-40.0, 12.0, 2.0, 2.0, 2.0), (12.0, D + 30.0, 1.5, 1.5, 1.5),  # wholly outside
        (c0 + 1.3, c0 - 2.1, 2.0 * D, 1.5 * D, 1.0 * D),  # huge: covers every tile
        (10.2, 30.7, 0.3, 0.35, 0.3), (25.5, 8.4, 0.45, 0.3, 0.4),  # tiny (< 1 px)
        (20.3, 24.1, 0.5, 6.0, 1.0), (8.1, 33.3, 5.0, 0.6, 0.8),  # highly anisotropic
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
    quats[-2:] = torch.randn(2, 4, generator=rng, dtype=F64)  # rotate the anisotropic ones
    amps = 0.5 + torch.rand(N, generator=rng, dtype=F64)
    rot = torch.stack([torch.eye(3, dtype=F64), torch.linalg.qr(torch.randn(3, 3, generator=rng, dtype=F64))[0]])
    if torch.det(rot[1]) < 0:
        rot[1, :, 0] *= -1
    shifts = torch.tensor([[0.0, 0.0], [1.7, -2.3]], dtype=F64)
    return means, quats, scales, amps, rot, shifts


@pytest.mark.parametrize("D", [40, 48])
def test_edge_cases_match_dense(rng, D):
    p = 1.0
    case = make_case(rng, D=D, pixel_size=p, params=_edge_params(rng, D, p), tol=2e-4)
    _check_against_dense(case, rng)


def test_huge_gaussian_covers_all_tiles(poison):
    C = poison
    D, p = 40, 1.0
    means = torch.zeros(1, 3, device=DEV)
    quats = torch.tensor([[1.0, 0, 0, 0]], device=DEV)
    scales = torch.full((1, 3), 3.0 * D, device=DEV)
    amps = torch.ones(1, device=DEV)
    rot = torch.eye(3, device=DEV)[None]
    shifts = torch.zeros(1, 2, device=DEV)
    m2, cn, w, r, counts = C.preprocess_fwd(means, quats, scales, amps, rot, shifts, D, p, 3.5)
    T = binning.tiles_per_side(D) ** 2
    assert int(counts.item()) == T


def test_binning_matches_reference_exactly(poison, rng):
    """Counts, sorted keys, values and tile ranges equal cryogs.render.binning on the CUDA preprocess outputs."""
    C = poison
    D, p, k = 45, 1.2, 3.5
    case = make_case(rng, B=5, N=150, D=D, pixel_size=p, spread=25.0, scale_range=(0.2, 12.0), tol=0)
    P = [t.to(DEV, torch.float32) for t in case["params"]]
    m2, cn, w, r, counts = C.preprocess_fwd(*P, D, p, k)
    ref_counts = binning.tile_counts(m2.cpu(), r.cpu(), D, valid=binning.valid_pairs(cn.cpu()))
    assert torch.equal(counts.cpu(), ref_counts)
    ranges, keys, gids = C.bin_instances(m2, r, counts, D, int(counts.sum()))
    ref_ranges, ref_keys, ref_gids = binning.bin_reference(m2.cpu(), r.cpu(), D, valid=binning.valid_pairs(cn.cpu()))
    assert torch.equal(keys.cpu().to(torch.int64) & 0xFFFFFFFF, ref_keys)
    assert torch.equal(gids.cpu().to(torch.int64), ref_gids)
    assert torch.equal(ranges.cpu(), ref_ranges)
    # A sub-batch of images bins with image-local keys.
    ranges2, keys2, gids2 = C.bin_instances(m2[2:4], r[2:4], counts[2:4], D, int(counts[2:4].sum()))
    ref2 = binning.bin_reference(m2[2:4].cpu(), r[2:4].cpu(), D, valid=binning.valid_pairs(cn[2:4].cpu()))
    assert torch.equal(ranges2.cpu(), ref2[0]) and torch.equal(gids2.cpu().to(torch.int64), ref2[2])


def test_preprocess_matches_python(poison, rng):
    from cryogs.render.gaussian_math import preprocess

    C = poison
    case = make_case(rng, B=3, N=50, D=40, tol=0)
    P = [t.to(DEV, torch.float32) for t in case["params"]]
    got = C.preprocess_fwd(*P, case["D"], case["p"], case["k"])
    ref = preprocess(*case["params"], box_size=case["D"], pixel_size=case["p"], cutoff=case["k"])
    for name, g, rr in zip(("means2d", "conics", "weights", "radii"), got, ref):
        assert rel_err(g, rr) < 1e-5, name


def test_batch_splitting_is_exact(rng):
    """A tiny instance budget forces one sub-batch per image: the forward is bitwise identical and the
    gradients agree to float32 rounding (atomics order)."""
    from cryogs.render import cuda as cuda_backend

    case = make_case(rng, B=5, N=80, D=40, tol=0)
    B, D = 5, case["D"]
    v = torch.randn(B, D, D, generator=rng, dtype=F64)
    img_a, g_a = _run_cuda(case, v)
    assert cuda_backend.last_stats["batches"] == 1
    img_b, g_b = _run_cuda(case, v, max_instances=1)
    assert cuda_backend.last_stats["batches"] == B
    assert cuda_backend.last_stats["instances"] > B
    assert torch.equal(img_a, img_b)
    for n in NAMES:
        assert rel_err(g_b[n], g_a[n]) < 1e-5, n
    img_c, _ = _run_cuda(case, None, max_instances=cuda_backend.last_stats["instances"] // 2)
    assert torch.equal(img_a, img_c)


def test_plan_batches():
    from cryogs.render.cuda import plan_batches

    assert plan_batches([], 10, 100) == []
    assert plan_batches([3, 3, 3], 10, 100) == [(0, 3)]
    assert plan_batches([3, 8, 3, 20, 1], 10, 100) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert plan_batches([3, 7, 3, 2, 1], 10, 100) == [(0, 2), (2, 5)]
    assert plan_batches([1, 1, 1, 1, 1], 10, 2) == [(0, 2), (2, 4), (4, 5)]


def test_forward_is_bitwise_deterministic(rng):
    case = make_case(rng, B=3, N=300, D=48, tol=0)
    first, _ = _run_cuda(case)
    for _ in range(3):
        again, _ = _run_cuda(case)
        assert torch.equal(first, again)


@pytest.mark.parametrize("B,N", [(0, 5), (2, 0), (0, 0), (1, 1)])
def test_empty_and_minimal_inputs(B, N):
    D, p = 24, 1.0
    means = torch.zeros(N, 3, device=DEV, requires_grad=True)
    quats = torch.tensor([[1.0, 0, 0, 0]], device=DEV).repeat(N, 1).requires_grad_(True)
    scales = torch.full((N, 3), 2.0, device=DEV, requires_grad=True)
    amps = torch.ones(N, device=DEV, requires_grad=True)
    rot = torch.eye(3, device=DEV).repeat(B, 1, 1).requires_grad_(True)
    shifts = torch.zeros(B, 2, device=DEV, requires_grad=True)
    img = project(means, quats, scales, amps, rot, shifts, box_size=D, pixel_size=p, backend="cuda")
    assert img.shape == (B, D, D) and torch.isfinite(img).all()
    if B * N == 0:
        assert (img == 0).all()
    img.sum().backward()
    for t in (means, quats, scales, amps, rot, shifts):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


def test_shifts_none_equals_zero_shifts(rng):
    case = make_case(rng, B=2, N=20, D=32, tol=0)
    P = [t.to(DEV, torch.float32) for t in case["params"]]
    a = project(*P[:5], None, box_size=32, pixel_size=case["p"], backend="cuda", cutoff=case["k"])
    b = project(*P[:5], torch.zeros_like(P[5]), box_size=32, pixel_size=case["p"], backend="cuda", cutoff=case["k"])
    assert torch.equal(a, b)


def test_float64_inputs_are_computed_in_float32(rng):
    case = make_case(rng, B=2, N=30, D=32)
    P = [t.to(DEV) for t in case["params"]]
    img = project(*P, box_size=32, pixel_size=case["p"], backend="cuda", cutoff=case["k"])
    assert img.dtype == F64
    ref, _ = dense_reference(case)
    assert rel_err(img.cpu(), ref) <= FWD_TOL


def test_invalid_gaussians_cover_nothing(poison):
    """Zero quaternion, zero scales, NaN mean, infinite amplitude: weight 0, radii 0, no tiles, finite
    gradients for the others."""
    C = poison
    D = 24
    means = torch.tensor([[0.0, 0, 0], [1.0, 2, 0], [float("nan"), 0, 0], [0.0, 0, 0], [2.0, -1, 1]], device=DEV)
    quats = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0.2, 0, 0]],
                         device=DEV)
    scales = torch.tensor([[2.0, 2, 2], [0.0, 0, 2], [2.0, 2, 2], [2.0, 2, 2], [2.0, 1.5, 1]], device=DEV)
    amps = torch.tensor([1.0, 1.0, 1.0, float("inf"), 1.0], device=DEV)
    rot = torch.eye(3, device=DEV)[None]
    shifts = torch.zeros(1, 2, device=DEV)
    m2, cn, w, r, counts = C.preprocess_fwd(means, quats, scales, amps, rot, shifts, D, 1.0, 3.5)
    assert (w[0, :4] == 0).all() and (r[0, :4] == 0).all() and (counts[0, :4] == 0).all()
    assert (counts[0, 4] > 0)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, amps, rot, shifts)]
    img = project(*leaves, box_size=D, pixel_size=1.0, backend="cuda")
    assert torch.isfinite(img).all()
    img.sum().backward()
    assert torch.isfinite(leaves[0].grad[4]).all() and torch.isfinite(leaves[4].grad).all()
    assert (leaves[3].grad[:4] == 0).all()


def test_validation_errors(poison):
    C = poison
    good = [torch.zeros(2, 3, device=DEV), torch.ones(2, 4, device=DEV), torch.ones(2, 3, device=DEV),
            torch.ones(2, device=DEV), torch.eye(3, device=DEV)[None], torch.zeros(1, 2, device=DEV)]
    bad = list(good)
    bad[0] = bad[0].double()
    with pytest.raises(RuntimeError, match="means must have dtype"):
        C.preprocess_fwd(*bad, 16, 1.0, 3.0)
    bad = list(good)
    bad[4] = torch.eye(3)[None]
    with pytest.raises(RuntimeError, match="rotations must be a CUDA tensor"):
        C.preprocess_fwd(*bad, 16, 1.0, 3.0)
    bad = list(good)
    bad[5] = torch.zeros(2, 2, device=DEV)
    with pytest.raises(RuntimeError, match=r"shifts must have shape \[1, 2\]"):
        C.preprocess_fwd(*bad, 16, 1.0, 3.0)


# ---- voxelize ------------------------------------------------------------------------------------
def _voxel_margins(means, quats, scales, D, p, k):
    """``[N]`` smallest ``|q − k²| / k²`` over all voxels, per Gaussian (float64)."""
    cov = covariance_3d(quats, scales) / p ** 2
    inv = torch.linalg.inv(cov)
    centre = means / p + D // 2
    ax = torch.arange(D, dtype=F64)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    grid = torch.stack([x, y, z], -1).reshape(-1, 3)
    out = []
    for g in range(means.shape[0]):
        d = grid - centre[g]
        q = torch.einsum("pi,ij,pj->p", d, inv[g], d)
        out.append(((q - k * k).abs() / (k * k)).min())
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


def test_voxelize_matches_torch(rng):
    """Same guard as the 2D tests: no voxel within float32 rounding of the cutoff sphere."""
    D, p, k = 36, 1.3, 3.5
    means, quats, scales, amps = (t.float().double() for t in random_mixture(40, rng, spread=8.0,
                                                                             scale_range=(0.8, 5.0)))
    for _ in range(60):
        bad = _voxel_margins(means, quats, scales, D, p, k) < 2e-5
        if not bad.any():
            break
        jitter = 1 + 0.05 * (2 * torch.rand(int(bad.sum()), 1, generator=rng, dtype=F64) - 1)
        scales[bad] = (scales[bad] * jitter).float().double()
    keep = _voxel_margins(means, quats, scales, D, p, k) >= 2e-5
    means, quats, scales, amps = means[keep], quats[keep], scales[keep], amps[keep]
    ref = voxelize_splat(means, covariance_3d(quats, scales), amps, box_size=D, pixel_size=p, cutoff=k)
    with torch.no_grad():
        got = voxelize(*[t.to(DEV, torch.float32) for t in (means, quats, scales, amps)], box_size=D, pixel_size=p,
                       backend="cuda", cutoff=k)
    assert got.shape == (D, D, D) and got.dtype == torch.float32
    assert rel_err(got.cpu(), ref) <= FWD_TOL


def test_voxelize_gradient_falls_back_to_torch(rng):
    means, quats, scales, amps = random_mixture(5, rng, spread=4.0)
    leaves = [t.to(DEV, torch.float32).requires_grad_(True) for t in (means, quats, scales, amps)]
    vol = voxelize(*leaves, box_size=20, pixel_size=1.5, backend="cuda")
    vol.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    with torch.no_grad():
        direct = voxelize(*leaves, box_size=20, pixel_size=1.5, backend="cuda")
    assert rel_err(direct.cpu(), vol.detach().cpu()) <= 5e-3


def test_voxelize_empty():
    z = torch.zeros(0, 3, device=DEV)
    with torch.no_grad():
        vol = voxelize(z, torch.zeros(0, 4, device=DEV), z, torch.zeros(0, device=DEV), box_size=8, pixel_size=1.0,
                       backend="cuda")
    assert vol.shape == (8, 8, 8) and (vol == 0).all()


def test_mass_is_conserved_for_a_centred_gaussian():
    """Sanity: a Gaussian well inside the image keeps its mass up to the dropped exp(-k²/2) tail."""
    k = 3.5
    means = torch.zeros(1, 3, device=DEV)
    quats = torch.tensor([[1.0, 0, 0, 0]], device=DEV)
    scales = torch.full((1, 3), 2.0, device=DEV)
    amps = torch.full((1,), 2.0, device=DEV)
    img = project(means, quats, scales, amps, torch.eye(3, device=DEV)[None], None, box_size=48, pixel_size=1.0,
                  backend="cuda", cutoff=k)
    assert float(img.sum()) == pytest.approx(2.0 * (1 - math.exp(-k * k / 2)), rel=2e-3)
