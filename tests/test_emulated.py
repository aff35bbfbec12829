"""The CUDA kernels run on the CPU (marker ``emulated``): csrc/*.cu through the emulator of csrc/emu/,
driven by the project's real host code, against the float64 dense reference (and the torch
backend), under AddressSanitizer + UBSan and ThreadSanitizer; and mutants of the kernels, which
the emulator must catch (test_mutants_are_caught).

What runs is ``cryogs.render.cuda`` itself (``project_cuda``, ``_ProjectCUDA`` with its sub-batching,
``voxelize_cuda``) on ``cryogs_emu``, a build of the extension's own host wrappers, bindings and
kernels in which only the launches are emulated (tests/emu_build.py); the backend's ``ops`` injection
point switches it over. The sanitizer runtimes must be the first libraries of their process, so each
variant runs in a child Python started with them preloaded (tests/emu_worker.py), which this module
calls into; the references are computed here, outside the sanitizers. (Loading both sanitizers into
Python this way works, TSan included, so no separate C++ driver with a copy of the host logic is
needed.) Every op output is NaN-poisoned before the kernels write it, so an unwritten element fails.

Inputs are drawn from fixed seeds, one per case, so every run checks the same inputs. Accuracy is
relative to ``max |reference|``: 1e-5 for images and 1e-4 for gradients, as on the GPU
(tests/test_cuda.py); the worst errors observed are 2.4e-6 and 3.8e-6. The emulator's schedule is
deterministic, so its outputs are too, atomics included.

``CRYOGS_EMU_VARIANTS`` (default ``asan,tsan``) picks the variants; ``cov`` measures line coverage
(see tests/emu_build.py).
"""
from __future__ import annotations

import functools
import os

import emu_build
import pytest
import torch
from emu_worker import Emulator, SanitizerError, counters, ops

from cuda_helpers import NAMES, dense_reference, make_case, rel_err
from helpers import random_mixture, random_poses

pytestmark = pytest.mark.emulated

VARIANTS = tuple(v for v in os.environ.get("CRYOGS_EMU_VARIANTS", "asan,tsan").split(",") if v)
F64 = torch.float64
FWD_TOL = 1e-5
GRAD_TOL = 1e-4
RASTER_FWD = "rasterize_fwd_kernel<TILE_SIZE>"
RASTER_BWD = "rasterize_bwd_kernel<TILE_SIZE>"


@pytest.fixture(scope="session")
def emulators():
    """One child per variant, all built at once (two cores compile them in parallel)."""
    ems = {v: Emulator(v, d) for v, d in emu_build.build(VARIANTS).items()}
    yield ems
    problems = [f"{v}: {msg}" for v, e in ems.items() if (msg := e.close())]
    assert not problems, "\n".join(problems)


def pytest_generate_tests(metafunc):
    if "emu" in metafunc.fixturenames:
        metafunc.parametrize("emu", VARIANTS, indirect=True)


@pytest.fixture
def emu(request, emulators):
    return emulators[request.param]


# ---- run in the child -----------------------------------------------------------------------------
def _project(params, v, D, p, k, requires=(True,) * 6, max_instances=None, backward=1):
    """Image, leaf gradients of (I·v).sum() after `backward` backward calls (retain_graph between
    them), the backend's last_stats and the emulator's counters."""
    from cryogs.render import cuda as cuda_backend

    counters(reset=True)
    leaves = [t.float().clone().requires_grad_(r) for t, r in zip(params, requires)]
    img = cuda_backend.project_cuda(*leaves, box_size=D, pixel_size=p, cutoff=k, max_instances=max_instances)
    if v is not None and any(requires):
        loss = (img * v.float()).sum()
        for i in range(backward):
            loss.backward(retain_graph=i + 1 < backward)
    return {"image": img.detach(), "grads": {n: t.grad for n, t in zip(NAMES, leaves)},
            "stats": dict(cuda_backend.last_stats), "counters": counters()}


def _tile_load(params, D, p, k):
    """Largest number of instances in one tile, through the emulated preprocess and binning."""
    C = ops()
    m2, cn, w, r, counts = C.preprocess_fwd(*[t.float() for t in params], D, p, k)
    ranges = C.bin_instances(m2, r, counts, D, int(counts.sum()))[0]
    return int((ranges[..., 1] - ranges[..., 0]).max())


# ---- cases ----------------------------------------------------------------------------------------
# name: (seed, make_case arguments)
CASES = {
    "standard": (1, dict(B=3, N=60, D=48)),
    "box_1": (2, dict(B=2, N=5, D=1, spread=1.0, scale_range=(1.0, 2.0))),
    "box_8": (3, dict(B=2, N=10, D=8, spread=3.0, scale_range=(1.0, 2.0))),
    "box_16": (4, dict(B=2, N=30, D=16, spread=5.0)),
    "box_37_single_image": (5, dict(B=1, N=40, D=37)),
    "box_97": (6, dict(B=2, N=150, D=97, pixel_size=1.0, spread=25.0)),
    "single_gaussian": (7, dict(B=3, N=1, D=24, scale_range=(1.0, 4.0))),
    # 3000 Gaussians in 9 tiles: tiles of more than 512 instances (three staging batches), and more
    # than 4864 instances in all, so the sort takes CUB's onesweep path with one pass (8 key bits).
    "crowded_3000": (8, dict(B=2, N=3000, D=48, spread=6.0, scale_range=(1.0, 3.0))),
    # 32 images x 9 tiles need 9 key bits: two onesweep passes, result back in the first buffer.
    "two_pass_sort": (9, dict(B=32, N=120, D=48)),
    "tiny": (10, dict(N=30, D=32, pixel_size=1.0, spread=6.0, scale_range=(0.3, 0.8))),
    "anisotropic": (11, dict(D=40, pixel_size=1.0, spread=6.0, scale_range=(0.4, 5.0), tol=2e-4)),
}


@functools.lru_cache(maxsize=None)
def _reference(name):
    """(case, upstream gradient v, dense image, dense gradients) of a named case."""
    seed, kw = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    case = make_case(gen, **kw)
    B, D = case["params"][4].shape[0], case["D"]
    v = torch.randn(B, D, D, generator=gen, dtype=F64)
    ref, grads = dense_reference(case, v)
    return case, v, ref, grads


def _assert_matches(out, ref, ref_grads, names=NAMES):
    assert rel_err(out["image"], ref) <= FWD_TOL, f"image {rel_err(out['image'], ref):.2e}"
    for n in names:
        g = out["grads"][n]
        assert g is not None and torch.isfinite(g).all(), n
        err = rel_err(g, ref_grads[n])
        assert err <= GRAD_TOL, f"{n} gradient {err:.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense(emu, name):
    """Every kernel of the projection (preprocess, duplicate, sort, tile ranges, rasterize forward
    and backward, both stage-B reductions) against float64 dense, image and every gradient."""
    case, v, ref, grads = _reference(name)
    out = emu.run(_project, case["params"], v, case["D"], case["p"], case["k"])
    _assert_matches(out, ref, grads)
    launched = out["counters"]["launches"]
    assert launched[RASTER_FWD] == launched[RASTER_BWD] == 1
    assert launched["preprocess_bwd_gauss_kernel"] == launched["preprocess_bwd_pose_kernel"] == 1
    sorts = out["counters"]["sorts"]
    if name == "crowded_3000":
        assert sorts[1] == 1 and out["stats"]["instances"] > 4864
        assert emu.run(_tile_load, case["params"], case["D"], case["p"], case["k"]) > 512
    elif name == "two_pass_sort":
        assert sorts[2] == 1
    else:
        assert sorts[0] == 1, "CUB's single-tile path"


@pytest.mark.parametrize("name", ["standard", "box_37_single_image", "anisotropic"])
def test_matches_torch_backend(emulators, name):
    """The same projections through the ``torch`` backend (float32 splat, same cutoff): image and
    gradients agree at the tolerances of dense."""
    from cryogs import project

    case, v, _, _ = _reference(name)
    leaves = [t.float().requires_grad_(True) for t in case["params"]]
    img = project(*leaves, box_size=case["D"], pixel_size=case["p"], backend="torch", cutoff=case["k"])
    (img * v.float()).sum().backward()
    out = emulators[VARIANTS[0]].run(_project, case["params"], v, case["D"], case["p"], case["k"])
    _assert_matches(out, img.detach(), {n: t.grad for n, t in zip(NAMES, leaves)})


# ---- edge cases -----------------------------------------------------------------------------------
def _case(seed, params_fn=None, **kw):
    """make_case on a fixed seed; params_fn(gen) may supply the float64 parameters."""
    gen = torch.Generator().manual_seed(seed)
    return make_case(gen, params=None if params_fn is None else params_fn(gen), **kw), gen


def _upstream(case, gen):
    B, D = case["params"][4].shape[0], case["D"]
    return torch.randn(B, D, D, generator=gen, dtype=F64)


def _off_image(gen):
    """Every pair off-image (centres 600 Å away) or invalid (two zero scales): M = 0, B·N > 0."""
    means, quats, scales, amps = random_mixture(20, gen, spread=4.0, scale_range=(1.0, 2.0))
    rot, shifts = random_poses(3, gen)
    means = means + torch.tensor([600.0, -600.0, 0.0], dtype=F64)
    scales[:5, :2] = 0.0
    return means, quats, scales, amps, rot, shifts


def test_every_pair_off_image_or_invalid(emu):
    """No instance at all (M = 0 with B·N > 0): a zero image, every gradient exactly zero, no sort."""
    case, gen = _case(20, _off_image, D=32, pixel_size=1.0, tol=0)
    v = _upstream(case, gen)
    out = emu.run(_project, case["params"], v, case["D"], case["p"], case["k"])
    assert out["stats"]["instances"] == 0 and out["counters"]["sorts"] == {k: 0 for k in range(8)}
    assert torch.count_nonzero(out["image"]) == 0
    for n in NAMES:
        assert out["grads"][n] is not None and torch.count_nonzero(out["grads"][n]) == 0, n


def _huge(gen):
    """One Gaussian three times larger than the image (it covers every tile), among 29 others."""
    means, quats, scales, amps = random_mixture(30, gen, spread=10.0)
    scales[0] = 120.0
    rot, shifts = random_poses(2, gen)
    return means, quats, scales, amps, rot, shifts


def test_gaussian_larger_than_the_image(emu):
    """A pair in every tile of both images, among ordinary ones, as dense."""
    case, gen = _case(21, _huge, D=40, pixel_size=1.0, tol=2e-4)
    v = _upstream(case, gen)
    ref, grads = dense_reference(case, v)
    out = emu.run(_project, case["params"], v, case["D"], case["p"], case["k"])
    _assert_matches(out, ref, grads)


def _thin(gen):
    """Six disks and six needles whose smallest scales are 1/3162 of the largest (3D covariances of
    condition number 1e7), among twelve ordinary Gaussians."""
    means, quats, scales, amps = random_mixture(24, gen, spread=16.0, scale_range=(2.0, 4.0))
    scales[:6, 2] = scales[:6, 0] / 3162.0
    scales[6:12, 1:] = scales[6:12, :1] / 3162.0
    rot, shifts = random_poses(3, gen)
    return means, quats, scales, amps, rot, shifts


def test_very_thin_gaussians(emu):
    """Condition number 1e7 is beyond float32: a needle seen side-on has conic entries ~1e6 whose
    terms cancel in q, so the pixels of the thin pairs are far from dense (0.64 of the image maximum
    here), exactly as in the float32 CPU twins (the float64 twins match dense to 1e-15: the limit is
    the arithmetic, not the kernels). What must hold: every output is finite; the image is that of
    dense outside the thin pairs' boxes (plus 1 px); the gradients of the ordinary Gaussians are
    those of dense (the loss is linear in the image, so they do not depend on the thin ones); and
    the image is that of the build's float32 twins, the same arithmetic in plain loops, to 1e-3
    (3.5e-8 observed when both are contracted alike, 2.2e-5 between contracted and uncontracted
    arithmetic), so the tiling and staging lose nothing on such pairs. (The thin Gaussians'
    gradients are rounding noise: contracting or not changes them by up to 30%.)"""
    from cryogs.render.gaussian_math import preprocess

    case, gen = _case(22, _thin, D=64, pixel_size=1.0)
    v = _upstream(case, gen)
    ref, grads = dense_reference(case, v)
    args = (case["params"], v, case["D"], case["p"], case["k"])
    out = emu.run(_project, *args)
    assert torch.isfinite(out["image"]).all()
    assert all(torch.isfinite(out["grads"][n]).all() for n in NAMES)
    scales = case["params"][2]
    thin = scales.amax(1) / scales.amin(1) > 1000
    assert int(thin.sum()) >= 8 and int((~thin).sum()) >= 8
    D = case["D"]
    m2, _, _, r = preprocess(*case["params"], box_size=D, pixel_size=case["p"], cutoff=case["k"])
    c = torch.arange(D, dtype=F64)
    inside = (c >= (m2 - r - 1)[..., None]) & (c <= (m2 + r + 1)[..., None])  # [B, N, 2 (x, y), D]
    covered = (inside[:, thin, 1, :, None] & inside[:, thin, 0, None, :]).any(1)  # [B, D (y), D (x)]
    assert (~covered).float().mean() > 0.3
    err = ((out["image"].double() - ref).abs() * ~covered).amax() / ref.abs().amax()
    assert err <= FWD_TOL, f"image outside the thin pairs {err:.2e}"
    for n in NAMES[:4]:
        e = rel_err(out["grads"][n][~thin], grads[n][~thin])
        assert e <= GRAD_TOL, f"{n} gradient of the ordinary Gaussians {e:.2e}"
    assert rel_err(out["image"], emu.run(_twin_project, *args)["image"]) <= 1e-3


# ---- gradient subsets, sub-batches, retain_graph ------------------------------------------------
def test_pose_gradients_off(emu):
    """Rotations and shifts without requires_grad: no pose kernel, the rest as dense."""
    case, v, ref, grads = _reference("standard")
    out = emu.run(_project, case["params"], v, case["D"], case["p"], case["k"], requires=(True,) * 4 + (False,) * 2)
    _assert_matches(out, ref, grads, names=NAMES[:4])
    assert out["grads"]["rotations"] is None and out["grads"]["shifts"] is None
    assert out["counters"]["launches"]["preprocess_bwd_pose_kernel"] == 0


def test_pose_only(emu):
    """Gaussian parameters detached (pose refinement): the per-Gaussian stage-B kernel is skipped, and
    the pose gradients are those of dense."""
    case, v, ref, grads = _reference("standard")
    out = emu.run(_project, case["params"], v, case["D"], case["p"], case["k"], requires=(False,) * 4 + (True,) * 2)
    _assert_matches(out, ref, grads, names=NAMES[4:])
    assert all(out["grads"][n] is None for n in NAMES[:4])
    assert out["counters"]["launches"]["preprocess_bwd_gauss_kernel"] == 0


@pytest.mark.parametrize("budget", ["one_image", "two_images"])
def test_sub_batches(emu, budget):
    """A small instance budget splits the images into sub-batches (of one image each, or of images
    0-1 and 2, with image-local keys), binned again in the backward: the image is bitwise that of one
    batch, the gradients are those of dense."""
    case, v, ref, grads = _reference("standard")
    args = (case["params"], v, case["D"], case["p"], case["k"])
    whole = emu.run(_project, *args)
    limit = 1 if budget == "one_image" else whole["stats"]["instances"] - 1
    out = emu.run(_project, *args, max_instances=limit)
    assert out["stats"]["batches"] == (3 if budget == "one_image" else 2)
    assert torch.equal(out["image"], whole["image"])
    _assert_matches(out, ref, grads)
    assert out["counters"]["launches"]["duplicate_kernel"] == 2 * out["stats"]["batches"]


@pytest.mark.parametrize("max_instances", [None, 1])
def test_retain_graph_twice(emu, max_instances):
    """Two backward calls through a retained graph (the second bins again) add the same gradients."""
    case, v, _, _ = _reference("standard")
    args = (case["params"], v, case["D"], case["p"], case["k"])
    once = emu.run(_project, *args, max_instances=max_instances)
    twice = emu.run(_project, *args, max_instances=max_instances, backward=2)
    for n in NAMES:
        assert torch.equal(twice["grads"][n], 2 * once["grads"][n]), n


# ---- review fixes --------------------------------------------------------------------------------
def _with_degenerate(gen):
    """Twelve ordinary Gaussians followed by four whose quaternion is zero, NaN, infinite or 1e-30
    (its square underflows): R(q) is NaN, so they cover nothing."""
    means, quats, scales, amps = random_mixture(16, gen, spread=8.0)
    quats[12] = 0.0
    quats[13] = torch.tensor([float("nan"), 1.0, 0.0, 0.0])
    quats[14] = torch.tensor([float("inf"), 0.0, 1.0, 0.0])
    quats[15] = 1e-30
    rot, shifts = random_poses(3, gen)
    return means, quats, scales, amps, rot, shifts


def _check_degenerate(emu, fn):
    case, gen = _case(23, _with_degenerate, D=40, tol=0)
    v = _upstream(case, gen)
    ordinary = tuple(t[:12] for t in case["params"][:4]) + case["params"][4:]
    ref, grads = dense_reference(dict(case, params=ordinary), v)
    out = emu.run(fn, case["params"], v, case["D"], case["p"], case["k"])
    assert rel_err(out["image"], ref) <= FWD_TOL
    for n in NAMES:
        g = out["grads"][n]
        assert torch.isfinite(g).all(), n
        if n in NAMES[:4]:
            assert torch.count_nonzero(g[12:]) == 0, n
            g = g[:12]
        assert rel_err(g, grads[n]) <= GRAD_TOL, n


def test_degenerate_quaternions_get_zero_gradients(emu):
    """A Gaussian with a zero or non-finite quaternion covers nothing: its gradients are zero (they
    were NaN: stage B applied the quaternion chain rule to R(q) = NaN), the others are those of dense."""
    _check_degenerate(emu, _project)


def test_degenerate_quaternions_twins(emulators):
    """The same for the CPU twins, which had the same chain rule."""
    _check_degenerate(emulators[VARIANTS[0]], _twin_project)


def _count_host_reads(params, v, D, p, k, max_instances):
    """Device-to-host reads (aten::_local_scalar_dense, i.e. Tensor.item()) and .tolist() calls of
    one forward and backward, debug poisoning off (its checks read back on purpose)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cryogs.render import cuda as cuda_backend

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads["item"] += 1
            return func(*args, **(kwargs or {}))

    reads = {"item": 0, "tolist": 0}
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        reads["tolist"] += 1
        return tolist(self)

    leaves = [t.float().clone().requires_grad_(True) for t in params]
    ops().set_debug_poison(False)
    torch.Tensor.tolist = counted_tolist
    try:
        with Count():
            img = cuda_backend.project_cuda(*leaves, box_size=D, pixel_size=p, cutoff=k, max_instances=max_instances)
            (img * v.float()).sum().backward()
    finally:
        torch.Tensor.tolist = tolist
        ops().set_debug_poison(True)
    return reads, cuda_backend.last_stats["batches"]


@pytest.mark.parametrize("max_instances", [None, 1])
def test_one_host_read_per_forward(emulators, max_instances):
    """The per-image instance totals are read back once per forward (they size the binning buffers
    and plan the sub-batches); bin_instances takes the count instead of reading it again, so nothing
    else reads back, in the forward or in a backward that bins again per sub-batch."""
    emu = emulators[VARIANTS[0]]
    case, v, _, _ = _reference("standard")
    reads, batches = emu.run(_count_host_reads, case["params"], v, case["D"], case["p"], case["k"], max_instances)
    assert batches == (1 if max_instances is None else 3)
    assert reads == {"item": 0, "tolist": 1}




def _bin_with_count(params, D, p, k, extra):
    C = ops()
    m2, cn, w, r, counts = C.preprocess_fwd(*[t.float() for t in params], D, p, k)
    return C.bin_instances(m2, r, counts, D, int(counts.sum()) + extra)[0]


def test_instance_count_is_checked_in_debug_mode(emulators):
    """bin_instances trusts the instance count it is given, except in the debug (poisoning) mode."""
    emu = emulators[VARIANTS[0]]
    case, _, _, _ = _reference("standard")
    args = (case["params"], case["D"], case["p"], case["k"])
    emu.run(_bin_with_count, *args, 0)
    with pytest.raises(RuntimeError, match="but the tile counts sum to"):
        emu.run(_bin_with_count, *args, -1)


# ---- voxelize ------------------------------------------------------------------------------------
def _voxelize(means, quats, scales, amps, D, p, k):
    from cryogs.render import cuda as cuda_backend

    counters(reset=True)
    vol = cuda_backend.voxelize_cuda(means.float(), quats.float(), scales.float(), amps.float(), box_size=D,
                                     pixel_size=p, cutoff=k)
    return vol, counters()


def _voxel_case(seed, D, *, p=1.0, k=3.5, N=12, tol=1e-5):
    """Random Gaussians (float32 values) plus one centred on the box edge (partly outside) and one
    three times larger than the box; each resized until every voxel's float64 q is at least `tol`
    (relative) away from the cutoff, where float32 rounding could flip it (as guard_cutoff does for
    pixels)."""
    from cryogs.render.gaussian_math import covariance_3d

    gen = torch.Generator().manual_seed(seed)
    means, quats, scales, amps = random_mixture(N, gen, spread=D * p / 5, scale_range=(0.3 * p, D * p / 8 + 0.5))
    means[0] = torch.tensor([D * p / 2, 0.3 * p, -0.2 * p], dtype=F64)
    scales[1] = 3 * D * p
    means, quats, scales, amps = (t.float().double() for t in (means, quats, scales, amps))
    c = torch.arange(D, dtype=F64)
    vox = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)[:, [2, 1, 0]]  # (x, y, z)
    bad = torch.arange(N)  # only resized Gaussians need checking again
    for _ in range(60):
        inv = torch.linalg.inv(covariance_3d(quats[bad], scales[bad]) / p**2)
        d = vox[None] - (means[bad] / p + D // 2)[:, None]
        q = ((d @ inv) * d).sum(-1)
        bad = bad[((q - k * k).abs() / (k * k)).amin(1) < tol]
        if not bad.numel():
            return (means, quats, scales, amps), D, p, k
        jitter = 1 + 0.05 * (2 * torch.rand(bad.numel(), 1, generator=gen, dtype=F64) - 1)
        scales[bad] = (scales[bad] * jitter).float().double()
    raise AssertionError("could not keep the voxels away from the cutoff")


@pytest.mark.parametrize("D", [1, 8, 16, 37])
def test_voxelize_matches_reference(emu, D):
    """voxelize_cuda against cryogs.render.reference.voxelize_splat in float64, with a Gaussian partly
    outside the box and one larger than it."""
    from cryogs.render.gaussian_math import covariance_3d
    from cryogs.render.reference import voxelize_splat

    (means, quats, scales, amps), D, p, k = _voxel_case(30 + D, D)
    ref = voxelize_splat(means, covariance_3d(quats, scales), amps, box_size=D, pixel_size=p, cutoff=k)
    vol, _ = emu.run(_voxelize, means, quats, scales, amps, D, p, k)
    assert rel_err(vol, ref) <= FWD_TOL


def test_voxelize_spreads_a_large_gaussian_over_blocks(emu):
    """A Gaussian filling a 64³ box is split over blocks of z-slabs, so that no thread evaluates more
    than 128 of its voxels (one block looped 1024 times per thread here, ~65k at 256³)."""
    from cryogs.render.gaussian_math import covariance_3d
    from cryogs.render.reference import voxelize_splat

    D, p, k = 64, 1.0, 3.5
    means = torch.tensor([[0.4, -0.3, 0.2]], dtype=F64)
    quats = torch.tensor([[0.9, 0.1, -0.3, 0.2]], dtype=F64)
    scales = torch.tensor([[40.0, 45.0, 50.0]], dtype=F64)
    amps = torch.tensor([2.0], dtype=F64)
    ref = voxelize_splat(means, covariance_3d(quats, scales), amps, box_size=D, pixel_size=p, cutoff=k)
    vol, cnt = emu.run(_voxelize, means, quats, scales, amps, D, p, k)
    assert rel_err(vol, ref) <= FWD_TOL
    assert D**3 / (cnt["blocks"]["voxelize_fwd_kernel"] * 256) <= 128


# ---- the CPU twins, with FMA contraction ---------------------------------------------------------
def _twin_project(params, v, D, p, k):
    """Image and gradients through the float32 CPU twins of the emulated build (tiled as the kernels)."""
    C = ops()
    P = [t.float() for t in params]
    m2, cn, w, r, counts = C.preprocess_fwd_cpu(*P, D, p, k)
    img = C.rasterize_fwd_cpu(m2, cn, w, r, counts, D, k)
    v_m2, v_cn, v_w = C.rasterize_bwd_cpu(m2, cn, w, r, counts, v.float(), D, k)
    grads = C.preprocess_bwd_cpu(*P[:5], v_m2, v_cn, v_w, p, True)
    return {"image": img, "grads": dict(zip(NAMES, grads)), "tile_counts": counts, "means2d": m2, "radii": r,
            "conics": cn}


TWIN_CASES = ("standard", "box_37_single_image", "tiny", "anisotropic", "crowded_3000")


@pytest.mark.parametrize("name", TWIN_CASES)
def test_contracted_twins_meet_gpu_tolerances(emulators, name):
    """The twins compiled with FMA contraction (as nvcc compiles the kernels) meet the tolerances of
    the uncontracted ones (tests/test_cuda_host_math.py): 1e-5 for images, 1e-4 for gradients,
    relative to max |dense|, which covers both builds. Measured once on the configurations of
    test_cuda_host_math.F32_CASES over 25 seeds each, the worst errors are 2.2e-6 (images) and
    1.0e-5 (gradients) uncontracted, 2.3e-6 and 1.1e-5 contracted. Their tile counts still equal
    cryogs.render.binning's exactly: the tile rectangle is computed with contraction-proof operations."""
    from cryogs.render import binning

    emu = emulators[VARIANTS[0]]
    case, v, ref, grads = _reference(name)
    out = emu.run(_twin_project, case["params"], v, case["D"], case["p"], case["k"])
    _assert_matches(out, ref, grads)
    valid = binning.valid_pairs(out["conics"])
    assert torch.equal(out["tile_counts"], binning.tile_counts(out["means2d"], out["radii"], case["D"], valid=valid))


# A pair whose cutoff box ends a few ulps short of pixel 16, the first of tile 1, with x-radius r:
# fused into an FMA, r (1 + 2^-10) + 2^-10 is rounded once and the box stops at pixel 15; rounded
# after each operation, as cryogs.render.binning and the GPU (__fmul_rn, __fadd_rn) do, it reaches pixel 16.
FMA_EDGE = {"centre_x": 7.9997382164001465, "radius_x": 7.991479873657227}


def _bin_at_fma_edge(m2, r, cn, counts, D):
    """The twin's tiled forward (which checks its tile rectangles against `counts`) and the kernels'
    binning of a pair at FMA_EDGE."""
    C = ops()
    C.rasterize_fwd_cpu(m2, cn, torch.ones(1, 1), r, counts, D, 3.5)
    return C.bin_instances(m2, r, counts, D, int(counts.sum()))


def test_tile_rectangles_are_contraction_proof(emulators):
    """With FMA contraction on, as in this build (and nvcc's default), the twins and the kernels
    still compute the tile rectangle of cryogs.render.binning exactly (they did not: the host versions of
    add_rn/mul_rn were plain expressions, fused into an FMA)."""
    from cryogs.render import binning

    emu = emulators[VARIANTS[0]]
    D = 48
    m2 = torch.tensor([[[FMA_EDGE["centre_x"], 24.0]]])
    r = torch.tensor([[[FMA_EDGE["radius_x"], 2.0]]])
    cn = torch.tensor([[[0.2, 0.0, 3.0]]])
    counts = binning.tile_counts(m2, r, D, valid=binning.valid_pairs(cn))
    assert int(counts) == 2  # tiles (0, 1) and (1, 1)
    ranges, keys, gids = emu.run(_bin_at_fma_edge, m2, r, cn, counts, D)
    ref_ranges, ref_keys, ref_gids = binning.bin_reference(m2, r, D, valid=binning.valid_pairs(cn))
    assert torch.equal(ranges, ref_ranges) and torch.equal(keys.long(), ref_keys) and torch.equal(gids.long(), ref_gids)


def test_twins_are_contracted(emulators):
    """The emulated build's twins really contain fused multiply-adds (on a CPU with FMA)."""
    import shutil
    import subprocess

    if not emu_build.cpu_has_fma() or shutil.which("objdump") is None:
        pytest.skip("no FMA on this CPU, or no objdump")
    objs = (emulators[VARIANTS[0]].module_dir / "objects.txt").read_text().split()
    twins = next(o for o in objs if os.path.basename(o).startswith("cpu_twins-"))
    asm = subprocess.run(["objdump", "-d", twins], capture_output=True, text=True, check=True).stdout
    assert "vfmadd" in asm or "vfmsub" in asm or "vfnmadd" in asm


# ---- mutation checks -----------------------------------------------------------------------------
def _mutate(name: str, old: str, new: str) -> str:
    """csrc/`name` with its one occurrence of `old` replaced by `new`."""
    text = (emu_build.CSRC / name).read_text()
    assert text.count(old) == 1, f"the mutation no longer applies to {name}"
    return text.replace(old, new)


def _stage_a(params, v, D, p, k):
    """Preprocess, binning and rasterize_bwd alone (no rasterize_fwd)."""
    C = ops()
    m2, cn, w, r, counts = C.preprocess_fwd(*[t.float() for t in params], D, p, k)
    ranges, _, gids = C.bin_instances(m2, r, counts, D, int(counts.sum()))
    C.rasterize_bwd(m2, cn, w, r, ranges, gids, v.float(), D, k, torch.zeros_like(m2), torch.zeros_like(cn),
                    torch.zeros_like(w))


def _pose_backward(params, D, p, k):
    """Stage B's per-image (pose) reduction alone, on random 2D gradients."""
    C = ops()
    P = [t.float() for t in params]
    m2, cn, w, _, _ = C.preprocess_fwd(*P, D, p, k)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(t.shape, generator=gen) for t in (m2, cn, w)]
    return C.preprocess_bwd(*P[:5], *v, p, True, False)


def test_mutants_are_caught():
    """The suite fails when a thread returns before a barrier, a warp shuffle is divergent or a
    barrier is deleted. One TSan build of three mutants, checked in one child:

    - rasterize_bwd whose pixels outside a 37-pixel image return before the staging barrier: its
      launch check raises (the threads of a block passed different numbers of barriers,
      compute-sanitizer synccheck's rule);
    - preprocess_bwd_pose whose lanes 16-31 skip the warp reduction: half of each warp waits at the
      shuffle, the rest at the barrier; the launch check reports the deadlock (a hang on a GPU), the
      fibers are unwound, and the next launch runs normally;
    - rasterize_fwd without the barrier between staging a batch in shared memory and reading it: a
      data race (the sanitized child dies with the report).

    Proven once by hand for every barrier as well, deleting each __syncthreads of csrc/*.cu in turn
    and running the projection tests (``-k "matches_dense or pose or sub_batches"``): without
    rasterize_fwd's first, rasterize_bwd's, preprocess_bwd_gauss's or preprocess_bwd_pose's, every
    test that runs that kernel fails under TSan (a data race on the staged or reduced shared array)
    and nearly all under ASan (stale values, as the fixed schedule runs each thread as far as it can;
    those that pass stage a single thread's data, e.g. N = 1); without rasterize_fwd's second,
    crowded_3000 fails under both: the one case whose tiles need more than one staging batch, the
    only one where that barrier matters.
    """
    mutants = {
        "rasterize_bwd_kernel.cu": _mutate(
            "rasterize_bwd_kernel.cu", "    s_G[tid] = (px < D && py < D) ? v_image[(b * D + py) * D + px] : 0.f;\n",
            "    if (px >= D || py >= D) return;\n    s_G[tid] = v_image[(b * D + py) * D + px];\n"),
        "preprocess_kernel.cu": _mutate(
            "preprocess_kernel.cu", "    for (int off = 16; off > 0; off >>= 1) v +=",
            "    for (int off = 16; off > 0 && tid % 32 < 16; off >>= 1) v +="),
        "rasterize_fwd_kernel.cu": _mutate("rasterize_fwd_kernel.cu", "    __syncthreads();\n    const int n =",
                                           "    const int n ="),
    }
    emu = Emulator("tsan", emu_build.build(("tsan",), overrides=mutants, tag="-mutants")["tsan"])
    case, v, _, _ = _reference("box_37_single_image")
    with pytest.raises(RuntimeError, match=r"rasterize_bwd_kernel.*passed \d+ __syncthreads, thread \(0, 0, 0\) "
                                           r"passed \d+ \(a thread returned before a barrier"):
        emu.run(_stage_a, case["params"], v, case["D"], case["p"], case["k"])
    with pytest.raises(RuntimeError, match=r"preprocess_bwd_pose_kernel, block \(0, 0, 0\): deadlock, 128 thread\(s\) "
                                           r"wait at __syncthreads and 128 at __shfl_down_sync"):
        emu.run(_pose_backward, case["params"], case["D"], case["p"], case["k"])
    emu.run(_stage_a, case["params"], v[:, :16, :16].contiguous(), 16, case["p"], case["k"])  # whole tiles
    with pytest.raises(SanitizerError, match=r"(?s)ThreadSanitizer: data race.*rasterize_fwd_kernel"):
        emu.run(_project, case["params"], None, case["D"], case["p"], case["k"])
