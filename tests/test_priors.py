"""Priors against closed forms, a brute-force O(N²) pair sum, float64 gradient checks and
bitwise determinism."""
import itertools
import math

import pytest
import torch

from cryogs.model.priors import close_pairs, map_prior, repulsion, scale_bounds, smoothness, total_variation
from cryogs.render.gaussian_math import CUTOFF_SIGMA

F64 = dict(dtype=torch.float64)


def _brute_force_repulsion(x, d_min):
    """Every pair from torch's pdist (i < j), the hinge written out again."""
    d = torch.nn.functional.pdist(x)
    return torch.where(d < d_min, (1 - d / d_min) ** 2, torch.zeros_like(d)).sum() / x.shape[0]


def _crowded_points(rng, d_min):
    """Uniform points at ~6 neighbours within d_min each, near-duplicates, points exactly on cell
    boundaries (multiples of d_min from the minimum corner at 0), and a few far away that force
    the cells to grow beyond d_min."""
    n = 400
    side = (n * 4 / 3 * math.pi / 6) ** (1 / 3) * d_min
    x = torch.rand(n, 3, generator=rng, **F64) * side
    dup = x[:40] + 1e-3 * d_min * torch.randn(40, 3, generator=rng, **F64)
    lattice = torch.floor(x[40:80] / d_min) * d_min
    far = (torch.rand(5, 3, generator=rng, **F64) - 0.5) * 1e4 * d_min
    return torch.cat([torch.zeros(1, 3, **F64), x, dup, lattice, far])


def test_repulsion_of_two_points(rng):
    d_min = 1 + 3 * float(torch.rand(1, generator=rng))
    u = torch.randn(3, generator=rng, **F64)
    u /= u.norm()
    d = d_min * float(torch.rand(1, generator=rng))
    x = torch.stack([torch.zeros(3, **F64), d * u]).requires_grad_()
    value = repulsion(x, d_min)
    assert float(value.detach()) == pytest.approx((1 - d / d_min) ** 2 / 2, rel=1e-12)
    value.backward()
    # ∂/∂x₁ of ½(1 − |x₁ − x₀|/d_min)² = −(1 − d/d_min)/d_min · u; x₀ gets the opposite
    push = -(1 - d / d_min) / d_min * u
    torch.testing.assert_close(x.grad, torch.stack([-push, push]), rtol=1e-10, atol=1e-14)
    assert float(repulsion(torch.stack([torch.zeros(3, **F64), 1.001 * d_min * u]), d_min)) == 0


@pytest.mark.statistical
def test_close_pairs_and_repulsion_match_brute_force(rng):
    """Statistical (seeded: see the ``statistical`` marker). Over 2,000 seeds the fewest close pairs was 1,308
    (bound 1,000)."""
    d_min = 1.5  # binary-exact, so lattice points sit exactly on cell boundaries
    x = _crowded_points(rng, d_min).requires_grad_()
    i, j = close_pairs(x, d_min)
    found = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    assert len(found) == len(i)  # each pair once
    iu, ju = torch.triu_indices(len(x), len(x), 1)
    d = torch.nn.functional.pdist(x.detach())
    assert found == set(zip(iu[d < d_min].tolist(), ju[d < d_min].tolist()))
    assert len(found) > 1000

    value = repulsion(x, d_min)
    (grad,) = torch.autograd.grad(value, x)
    x_ref = x.detach().clone().requires_grad_()
    ref = _brute_force_repulsion(x_ref, d_min)
    (grad_ref,) = torch.autograd.grad(ref, x_ref)
    # the same terms summed in another order: float64 rounding only
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_repulsion_gradcheck(rng):
    d_min = 2.0
    x = (torch.rand(16, 3, generator=rng, **F64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: repulsion(p, d_min), (x,))


def test_repulsion_is_deterministic(rng):
    x = _crowded_points(rng, 1.5)
    values, grads = [], []
    for _ in range(2):
        p = x.clone().float().requires_grad_()
        v = repulsion(p, 1.5)
        v.backward()
        values.append(v.detach())
        grads.append(p.grad)
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])


def test_scale_bounds(rng):
    lo, hi = 0.5 + float(torch.rand(1, generator=rng)), 3 + 2 * float(torch.rand(1, generator=rng))
    inside = (math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(10, 3, generator=rng, **F64))
    inside.requires_grad_()
    value = scale_bounds(inside, lo, hi)
    value.backward()
    assert float(value.detach()) == 0 and torch.equal(inside.grad, torch.zeros_like(inside))
    ls = torch.log(torch.tensor([[lo / 2, lo, hi], [hi * 3, hi, lo]], **F64))
    expected = (math.log(2) ** 2 + math.log(3) ** 2) / 2
    assert float(scale_bounds(ls, lo, hi)) == pytest.approx(expected, rel=1e-12)
    x = (torch.randn(8, 3, generator=rng, **F64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: scale_bounds(t, lo, hi), (x,))


def test_total_variation_and_smoothness_closed_forms(rng):
    D = int(torch.randint(4, 9, (1,), generator=rng))
    a, b = torch.randn(2, generator=rng, **F64).tolist()
    eps = 1e-3
    z, y, x = torch.meshgrid(*(torch.arange(D, **F64),) * 3, indexing="ij")
    # a step between x = k−1 and x = k: one plane of D² voxels with |∇V| = |b − a|
    k = int(torch.randint(1, D, (1,), generator=rng))
    step = torch.where(x < k, torch.tensor(a, **F64), torch.tensor(b, **F64))
    assert float(total_variation(step, eps)) == pytest.approx(D * D * (math.sqrt((b - a) ** 2 + eps ** 2) - eps),
                                                              rel=1e-12)
    assert float(smoothness(step)) == pytest.approx(D * D * (b - a) ** 2, rel=1e-12)
    # a ramp g·(x, y, z): differences are g_i except across the far faces, where they are 0, so a
    # voxel sees the components of the axes on which it is not last: (D−1)^|S| voxels for axes S
    g = torch.randn(3, generator=rng, **F64).tolist()
    ramp = g[0] * x + g[1] * y + g[2] * z
    tv = sum((D - 1) ** len(S) * (math.sqrt(sum(g[i] ** 2 for i in S) + eps ** 2) - eps)
             for r in range(4) for S in itertools.combinations(range(3), r))
    assert float(total_variation(ramp, eps)) == pytest.approx(tv, rel=1e-12)
    assert float(smoothness(ramp)) == pytest.approx(sum(gi ** 2 for gi in g) * (D - 1) * D * D, rel=1e-12)


def test_volume_priors_gradcheck_and_determinism(rng):
    v = torch.randn(5, 5, 5, generator=rng, **F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: total_variation(t, 0.1), (v,))
    assert torch.autograd.gradcheck(smoothness, (v,))
    big = torch.randn(32, 32, 32, generator=rng)
    for f in (total_variation, smoothness):
        assert torch.equal(f(big), f(big))


def _gaussian(centre, sigma, mass=1.0):
    return (centre[None].clone(), torch.tensor([[1.0, 0, 0, 0]], **F64), torch.full((1, 3), sigma, **F64),
            torch.tensor([mass], **F64))


@pytest.mark.parametrize("grid", [None, 24])
def test_map_smoothness_of_one_gaussian(rng, grid):
    """For V(x) ∝ exp(−|x|²/2σ²) sampled at spacing h, per axis Σ(ΔV)²/ΣV² = 2(1 − exp(−h²/4σ²)) (the
    lattice sums are integrals up to exp(−π²σ²/h²) < 1e-9 for σ ≥ 1.5h)."""
    D, p = 48, 1.0 + float(torch.rand(1, generator=rng))
    h = p * D / (grid or D)
    sigma = (1.5 + 1.5 * float(torch.rand(1, generator=rng))) * h
    centre = (torch.rand(3, generator=rng, **F64) - 0.5) * 4 * p
    value = float(map_prior(_gaussian(centre, sigma), box_size=D, pixel_size=p, kind="smooth", grid=grid))
    s = math.sqrt(sigma ** 2 + (h * h - p * p) / 4)  # widened on a coarser grid
    expected = 6 * (1 - math.exp(-h * h / (4 * s * s))) * (p / h) ** 2
    # the voxelizer drops q > k², k = CUTOFF_SIGMA: the jump of height e^{−k²/2} at each of the
    # ~2π(ks/h)² crossings per axis changes Σ(ΔV)² by at most (1 + kh/s)² e^{−k²} each, relative to
    # Σ(ΔV)² ≈ 6(1 − e^{−h²/4s²}) π^{3/2} s³/h³ (in units of the peak²); ΣV² loses < 1e-4
    k = CUTOFF_SIGMA
    rel = (k * k * math.exp(-k * k) * (1 + k * h / s) ** 2 * h / (math.sqrt(math.pi) * s)
           / (1 - math.exp(-h * h / (4 * s * s))))
    assert value == pytest.approx(expected, rel=rel + 1e-4)


@pytest.mark.parametrize("kind", ["tv", "smooth"])
def test_map_prior_is_scale_invariant_and_deterministic(rng, kind):
    means = (torch.rand(20, 3, generator=rng, **F64) - 0.5) * 12
    quats = torch.randn(20, 4, generator=rng, **F64)
    scales = 1 + 2 * torch.rand(20, 3, generator=rng, **F64)
    amps = 0.5 + torch.rand(20, generator=rng, **F64)
    c = 10 ** (4 * float(torch.rand(1, generator=rng)) - 2)
    kw = dict(box_size=24, pixel_size=1.2, kind=kind, grid=16)
    torch.testing.assert_close(map_prior((means, quats, scales, c * amps), **kw),
                               map_prior((means, quats, scales, amps), **kw), rtol=1e-12, atol=0)
    results = []
    for _ in range(2):
        m = [t.clone().float().requires_grad_() for t in (means, quats, scales, amps)]
        v = map_prior(m, **kw)
        v.backward()
        results.append([v.detach()] + [t.grad for t in m])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("kind,grid", [("tv", None), ("smooth", None), ("tv", 7)])
def test_map_prior_gradcheck(rng, kind, grid):
    means = ((torch.rand(3, 3, generator=rng, **F64) - 0.5) * 6).requires_grad_()
    quats = torch.randn(3, 4, generator=rng, **F64).requires_grad_()
    scales = (1.5 + torch.rand(3, 3, generator=rng, **F64)).requires_grad_()
    amps = (0.5 + torch.rand(3, generator=rng, **F64)).requires_grad_()
    # fast mode: checks random projections uᵀJv, so each check costs two evaluations per input tensor.
    # No truncation (cutoff 100σ): a voxel crossing the 3.5σ cutoff within the finite-difference step
    # failed 7 of 3,000 random draws; the truncated map is smooth everywhere else.
    assert torch.autograd.gradcheck(
        lambda *m: map_prior(m, box_size=12, pixel_size=1.0, kind=kind, grid=grid, cutoff=100.0),
        (means, quats, scales, amps), fast_mode=True)
