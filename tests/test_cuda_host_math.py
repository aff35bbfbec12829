"""CPU tests of the CUDA maths, no GPU needed: the extension's CPU twins run the very same
``csrc/gaussian_math.cuh`` functions as the kernels, in plain host loops. In float64 they must match
PyTorch (forward) and float64 ``torch.autograd`` (hand-derived gradients) to ~1e-10; in float32 they
are a proxy of the kernels' numerics and must meet the accuracy asked of the GPU. The tile
rectangles are checked exactly against :mod:`cryogs.render.binning`.

Skipped when the extension is not built, except with ``CRYOGS_REQUIRE_EXTENSION=1`` (set by
scripts/test.sh when a CUDA toolkit is present), where a missing extension fails.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cryogs import project
from cryogs.render import _extension, binning
from cryogs.render.gaussian_math import covariance_3d, preprocess
from cryogs.render.reference import rasterize_dense, voxelize_splat

from cuda_helpers import NAMES, dense_reference, make_case, rel_err
from helpers import random_mixture, random_poses

F64 = torch.float64
REQUIRED = os.environ.get("CRYOGS_REQUIRE_EXTENSION", "") == "1"


def _module_or_skip():
    if _extension.built():
        return _extension.module()
    msg = f"cryogs CUDA extension {_extension.status()}"
    if REQUIRED:
        pytest.fail(f"CRYOGS_REQUIRE_EXTENSION=1 but the {msg}")
    pytest.skip(msg)


@pytest.fixture
def C():
    return _module_or_skip()


def test_extension_is_built_when_required():
    """Fails (does not skip) under CRYOGS_REQUIRE_EXTENSION=1 if the build is missing or broken."""
    mod = _module_or_skip()
    assert mod.TILE_SIZE == binning.TILE_SIZE
    assert mod.RECT_PAD_REL == binning.RECT_PAD_REL and mod.RECT_PAD_ABS == binning.RECT_PAD_ABS


def _case64(rng, B=3, N=25, D=40, p=1.3, k=3.0, **kw):
    means, quats, scales, amps = random_mixture(N, rng, **kw)
    rot, shifts = random_poses(B, rng)
    return (means, quats, scales, amps, rot, shifts), D, p, k


def _with_invalid(params):
    """Appends Gaussians whose pairs are all invalid: zero quaternion (NaN rotation), two zero scales
    (det = 0), infinite amplitude."""
    means, quats, scales, amps, rot, shifts = params
    extra_q = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [0.3, 0.1, -0.2, 0.9]], dtype=F64)
    extra_s = torch.tensor([[2.0, 2, 2], [0.0, 0, 3], [2.0, 1, 3]], dtype=F64)
    extra_a = torch.tensor([1.0, 1.0, math.inf], dtype=F64)
    extra_m = torch.zeros(3, 3, dtype=F64)
    return (torch.cat([means, extra_m]), torch.cat([quats, extra_q]), torch.cat([scales, extra_s]),
            torch.cat([amps, extra_a]), rot, shifts)


# ---- preprocess ----------------------------------------------------------------------------------
def test_preprocess_fwd_matches_python_float64(C, rng):
    params, D, p, k = _case64(rng)
    params = _with_invalid(params)
    ref = preprocess(*params, box_size=D, pixel_size=p, cutoff=k)
    got = C.preprocess_fwd_cpu(*params, D, p, k)
    for name, r, g in zip(("means2d", "conics", "weights", "radii"), ref, got[:4]):
        assert g.dtype == F64 and g.shape == r.shape, name
        assert rel_err(g, r) < 1e-12, name
    N = params[0].shape[0]
    invalid = got[2][:, N - 3:]
    assert (invalid == 0).all() and (got[4][:, N - 3:] == 0).all()
    assert (got[1][:, N - 3:] == 0).all() and (got[3][:, N - 3:] == 0).all()


def test_preprocess_bwd_matches_autograd_float64(C, rng):
    params, D, p, k = _case64(rng, B=4, N=20)
    leaves = [t.clone().requires_grad_(True) for t in params]
    outs = preprocess(*leaves, box_size=D, pixel_size=p, cutoff=k)
    v = [torch.randn(o.shape, generator=rng, dtype=F64) for o in outs[:3]]
    sum((o * vv).sum() for o, vv in zip(outs[:3], v)).backward()
    for pose in (True, False):
        got = C.preprocess_bwd_cpu(*params[:5], v[0], v[1], v[2], p, pose)
        for name, leaf, g in zip(NAMES[:4], leaves[:4], got[:4]):
            assert rel_err(g, leaf.grad) < 1e-10, name
        if pose:
            assert rel_err(got[4], leaves[4].grad) < 1e-10
            assert rel_err(got[5], leaves[5].grad) < 1e-10
            assert (got[4][:, 2] == 0).all()
        else:
            assert got[4] is None and got[5] is None


def test_preprocess_bwd_off_diagonal_conic_gradient(C, rng):
    """dL/db of the stored off-diagonal b (q = a dx² + 2b dx dy + c dy²): only v_conics[..., 1] set."""
    params, D, p, k = _case64(rng, B=2, N=6)
    leaves = [t.clone().requires_grad_(True) for t in params]
    _, conics, _, _ = preprocess(*leaves, box_size=D, pixel_size=p, cutoff=k)
    v_c = torch.zeros_like(conics)
    v_c[..., 1] = torch.randn(conics.shape[:2], generator=rng, dtype=F64)
    (conics * v_c).sum().backward()
    z2 = torch.zeros(conics.shape[0], conics.shape[1], 2, dtype=F64)
    z1 = torch.zeros(conics.shape[:2], dtype=F64)
    got = C.preprocess_bwd_cpu(*params[:5], z2, v_c, z1, p, True)
    for name, leaf, g in zip(NAMES[:5], leaves[:5], got[:5]):
        ref = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)  # conics ignore means, m
        assert rel_err(g, ref) < 1e-10, name
    assert rel_err(got[1], leaves[1].grad) < 1e-10 and float(got[1].abs().max()) > 0


# ---- rasterize -----------------------------------------------------------------------------------
def _pairs64(rng, **kw):
    params, D, p, k = _case64(rng, **kw)
    pairs = preprocess(*params, box_size=D, pixel_size=p, cutoff=k)
    return tuple(t.contiguous() for t in pairs), D, k


@pytest.mark.parametrize("tiles", [False, True])
def test_rasterize_fwd_twin_matches_dense(C, rng, tiles):
    (m2, cn, w, r), D, k = _pairs64(rng, D=37)
    counts = binning.tile_counts(m2, r, D, valid=binning.valid_pairs(cn)) if tiles else None
    got = C.rasterize_fwd_cpu(m2, cn, w, r, counts, D, k)
    ref = rasterize_dense(m2, cn, w, r, box_size=D, cutoff=k)
    assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("tiles", [False, True])
def test_rasterize_bwd_twin_matches_autograd(C, rng, tiles):
    (m2, cn, w, r), D, k = _pairs64(rng, D=37)
    leaves = [t.clone().requires_grad_(True) for t in (m2, cn, w)]
    img = rasterize_dense(*leaves, r, box_size=D, cutoff=k)
    v = torch.randn(img.shape, generator=rng, dtype=F64)
    (img * v).sum().backward()
    counts = binning.tile_counts(m2, r, D, valid=binning.valid_pairs(cn)) if tiles else None
    got = C.rasterize_bwd_cpu(m2, cn, w, r, counts, v, D, k)
    for name, leaf, g in zip(("means2d", "conics", "weights"), leaves, got):
        assert rel_err(g, leaf.grad) < 1e-10, name


def _twin_project(C, params, D, p, k, v=None, dtype=F64):
    """Image and (if v) gradients of (I·v).sum() through the CPU twins, tiled like the kernels."""
    P = [t.to(dtype) for t in params]
    m2, cn, w, r, counts = C.preprocess_fwd_cpu(*P, D, p, k)
    img = C.rasterize_fwd_cpu(m2, cn, w, r, counts, D, k)
    if v is None:
        return img, None
    v_m2, v_cn, v_w = C.rasterize_bwd_cpu(m2, cn, w, r, counts, v.to(dtype), D, k)
    grads = C.preprocess_bwd_cpu(*P[:5], v_m2, v_cn, v_w, p, True)
    return img, dict(zip(NAMES, grads))


def test_full_chain_float64_matches_dense_autograd(C, rng):
    case = make_case(rng, B=3, N=30, D=40, tol=0)
    B, D = case["params"][4].shape[0], case["D"]
    v = torch.randn(B, D, D, generator=rng, dtype=F64)
    ref, grads = dense_reference(case, v)
    img, got = _twin_project(C, case["params"], D, case["p"], case["k"], v)
    assert rel_err(img, ref) < 1e-12
    for name in NAMES:
        assert rel_err(got[name], grads[name]) < 1e-10, name


# float32 twins = the kernels' arithmetic on the CPU: they must meet the GPU's tolerances.
F32_CASES = {
    "standard": dict(B=3, N=60, D=48),
    "odd_box_single_image": dict(B=1, N=40, D=37),
    "large_gaussians": dict(N=20, scale_range=(8.0, 20.0)),
    "tiny": dict(N=30, D=32, pixel_size=1.0, spread=6.0, scale_range=(0.3, 0.8)),
    "anisotropic": dict(D=40, pixel_size=1.0, spread=6.0, scale_range=(0.4, 5.0), tol=2e-4),
}


@pytest.mark.parametrize("name", sorted(F32_CASES))
def test_float32_twins_meet_gpu_tolerances(C, rng, name):
    case = make_case(rng, **F32_CASES[name])
    B, D = case["params"][4].shape[0], case["D"]
    v = torch.randn(B, D, D, generator=rng, dtype=F64)
    ref, grads = dense_reference(case, v)
    img, got = _twin_project(C, case["params"], D, case["p"], case["k"], v, dtype=torch.float32)
    assert rel_err(img, ref) <= 1e-5
    for n in NAMES:
        assert rel_err(got[n], grads[n]) <= 1e-4, n


# ---- binning -------------------------------------------------------------------------------------
def test_tile_counts_match_binning_reference_exactly_float32(C, rng):
    """The header's tile rectangle (in float32, as on the GPU) equals cryogs.render.binning bit for bit,
    including Gaussians astride tile/image borders, outside, huge and invalid."""
    params, D, p, k = _case64(rng, B=4, N=200, D=45, spread=25.0, scale_range=(0.2, 12.0))
    params = _with_invalid(params)
    P = [t.float() for t in params]
    m2, cn, w, r, counts = C.preprocess_fwd_cpu(*P, D, p, k)
    ref = binning.tile_counts(m2, r, D, valid=binning.valid_pairs(cn))
    assert torch.equal(counts, ref)
    assert (counts == 0).any() and (counts > 1).any()
    T = binning.tiles_per_side(D) ** 2
    assert counts.max() <= T


def test_tile_rect_covers_every_pixel_within_cutoff(rng):
    """Every pixel with q ≤ k² (float64) lies inside the pair's pixel box."""
    (m2, cn, w, r), D, k = _pairs64(rng, B=3, N=40, D=33, spread=20.0, scale_range=(0.3, 9.0))
    lo, hi, nonempty = binning.pixel_spans(m2, r, D)
    c = torch.arange(D, dtype=F64)
    dx = c[None, None, None, :] - m2[..., 0, None, None]
    dy = c[None, None, :, None] - m2[..., 1, None, None]
    q = cn[..., 0, None, None] * dx * dx + 2 * cn[..., 1, None, None] * dx * dy + cn[..., 2, None, None] * dy * dy
    inside = q <= k * k
    xs = c.long()[None, None, None, :].expand_as(inside)
    ys = c.long()[None, None, :, None].expand_as(inside)
    in_box = ((xs >= lo[..., 0, None, None]) & (xs <= hi[..., 0, None, None]) & (ys >= lo[..., 1, None, None])
              & (ys <= hi[..., 1, None, None]) & nonempty[..., None, None])
    assert inside.any()
    assert not (inside & ~in_box).any()


def test_bin_reference_ranges_are_consistent(rng):
    (m2, cn, w, r), D, k = _pairs64(rng, B=2, N=30, D=50, spread=20.0)
    ranges, keys, gids = binning.bin_reference(m2, r, D, valid=binning.valid_pairs(cn))
    counts = binning.tile_counts(m2, r, D, valid=binning.valid_pairs(cn))
    assert keys.numel() == int(counts.sum())
    T = binning.tiles_per_side(D) ** 2
    flat = ranges.view(-1, 2)
    for key in range(flat.shape[0]):
        s, e = flat[key].tolist()
        assert (keys[s:e] == key).all()
        assert torch.equal(gids[s:e], torch.sort(gids[s:e]).values)  # ascending g within a tile
    assert int((flat[:, 1] - flat[:, 0]).sum()) == keys.numel()
    assert keys.max() < 2 * T


# ---- voxelize ------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_box", [False, True])
def test_voxelize_twin_matches_torch(C, rng, use_box):
    means, quats, scales, amps = random_mixture(12, rng, spread=6.0, scale_range=(1.0, 4.0))
    D, p, k = 20, 1.5, 3.0
    ref = voxelize_splat(means, covariance_3d(quats, scales), amps, box_size=D, pixel_size=p, cutoff=k)
    got = C.voxelize_cpu(means, quats, scales, amps, D, p, k, use_box)
    assert rel_err(got, ref) < 1e-10


# ---- shapes and validation -----------------------------------------------------------------------
def test_empty_inputs(C):
    D, p, k = 20, 1.0, 3.0
    z = lambda *s: torch.zeros(*s, dtype=F64)  # noqa: E731
    for B, N in ((0, 5), (3, 0), (0, 0)):
        params = (z(N, 3), torch.ones(N, 4, dtype=F64), torch.ones(N, 3, dtype=F64), z(N),
                  torch.eye(3, dtype=F64).expand(B, 3, 3).contiguous(), z(B, 2))
        m2, cn, w, r, counts = C.preprocess_fwd_cpu(*params, D, p, k)
        assert m2.shape == (B, N, 2) and counts.shape == (B, N)
        img = C.rasterize_fwd_cpu(m2, cn, w, r, counts, D, k)
        assert img.shape == (B, D, D) and (img == 0).all()
        v_m2, v_cn, v_w = C.rasterize_bwd_cpu(m2, cn, w, r, counts, img, D, k)
        grads = C.preprocess_bwd_cpu(*params[:5], v_m2, v_cn, v_w, p, True)
        assert [tuple(g.shape) for g in grads] == [(N, 3), (N, 4), (N, 3), (N,), (B, 3, 3), (B, 2)]
        assert all((g == 0).all() for g in grads)


def test_validation_messages(C):
    D, p, k = 20, 1.0, 3.0
    params = [torch.zeros(2, 3, dtype=F64), torch.ones(2, 4, dtype=F64), torch.ones(2, 3, dtype=F64),
              torch.ones(2, dtype=F64), torch.eye(3, dtype=F64)[None], torch.zeros(1, 2, dtype=F64)]
    bad = list(params)
    bad[1] = torch.ones(2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"quats must have shape \[2, 4\]"):
        C.preprocess_fwd_cpu(*bad, D, p, k)
    bad = list(params)
    bad[2] = bad[2].float()
    with pytest.raises(RuntimeError, match="scales must have dtype"):
        C.preprocess_fwd_cpu(*bad, D, p, k)
    bad = list(params)
    bad[0] = torch.zeros(3, 2, dtype=F64).t()
    with pytest.raises(RuntimeError, match="means must be contiguous"):
        C.preprocess_fwd_cpu(*bad, D, p, k)
    with pytest.raises(RuntimeError, match="pixel_size must be positive"):
        C.preprocess_fwd_cpu(*params, D, -1.0, k)
    with pytest.raises(RuntimeError, match="box_size"):
        C.preprocess_fwd_cpu(*params, 0, p, k)


def test_debug_poison_flag_roundtrip(C):
    before = C.debug_poison()
    try:
        C.set_debug_poison(True)
        assert C.debug_poison()
        # Poisoned outputs are fully overwritten by the twins as well.
        params, D, p, k = _case64(torch.Generator().manual_seed(1), B=2, N=5)
        out = C.preprocess_fwd_cpu(*params, D, p, k)
        assert all(torch.isfinite(t.double()).all() for t in out)
    finally:
        C.set_debug_poison(before)


def test_dense_project_is_the_reference_used(rng):
    """Guard for the test setup: project(backend='dense', cutoff=k) equals preprocess + rasterize_dense."""
    params, D, p, k = _case64(rng, B=2, N=10)
    a = project(*params, box_size=D, pixel_size=p, backend="dense", cutoff=k)
    b = rasterize_dense(*preprocess(*params, box_size=D, pixel_size=p, cutoff=k), box_size=D, cutoff=k)
    assert torch.equal(a, b)
