"""The CUDA kernels run on the CPU (marker ``emulated``): csrc/*.cu through the emulator of csrc/emu/,
driven by the project's real host code, against the float64 dense reference, under
AddressSanitizer + UBSan and ThreadSanitizer.

What runs is ``cryogs.cuda_backend`` itself (``project_cuda``, ``_ProjectCUDA`` with its sub-batching,
``voxelize_cuda``) on ``cryogs_emu``, a build of the extension's own host wrappers, bindings and
kernels in which only the launches are emulated (tests/emu_build.py); the backend's ``ops`` injection
point switches it over. The sanitizer runtimes must be the first libraries of their process, so each
variant runs in a child Python started with them preloaded (tests/emu_worker.py), which this module
calls into; the references are computed here, outside the sanitizers. (Loading both sanitizers into
Python this way works, TSan included, so no separate C++ driver with a copy of the host logic is
needed.) Every op output is NaN-poisoned before the kernels write it, so an unwritten element fails.

Inputs are drawn from fixed seeds, one per case, so every run checks the same inputs. Accuracy is
relative to ``max |reference|``: 1e-5 for images and 1e-4 for gradients, as on the GPU
(tests/test_cuda.py); the worst errors observed are ~2e-6 and ~1.5e-5. The emulator's schedule is
deterministic, so its outputs are too, atomics included.

``CRYOGS_EMU_VARIANTS`` (default ``asan,tsan``) picks the variants; ``cov`` measures line coverage
(see tests/emu_build.py).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import emu_build
from cuda_helpers import NAMES, dense_reference, make_case, rel_err
from emu_worker import Emulator, SanitizerError, counters, ops

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
    from cryogs import cuda_backend

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
    ranges = C.bin_instances(m2, r, counts, D)[0]
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
