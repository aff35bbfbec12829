"""The forward model Γ against closed forms, an independent voxel projector, and float64 gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from cryogs import CryogsError, project, voxelize
from cryogs.physics.conventions import axis_angle_to_matrix, euler_to_matrix
from cryogs.render.gaussian_math import CUTOFF_SIGMA, preprocess

from cuda_helpers import cpu_ops_or_skip, guard_cutoff
from helpers import random_mixture, random_poses

F64 = torch.float64


def _one(mean, scales, amp=2.5, quat=(1.0, 0.0, 0.0, 0.0)):
    return (torch.tensor([mean], dtype=F64), torch.tensor([quat], dtype=F64),
            torch.tensor([scales], dtype=F64), torch.tensor([amp], dtype=F64))


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_single_gaussian_integral_peak_and_centre(rng, backend):
    from cryogs.render.gaussian_math import covariance_3d

    p, D, amp = 1.7, 64, 2.5
    R, sh = random_poses(1, rng, max_shift=6.0)
    sx, sy, sz = (2.0 + 3 * torch.rand(3, generator=rng, dtype=F64)).tolist()
    quat = torch.randn(4, generator=rng, dtype=F64).tolist()
    # |μ| ≤ 8√3 Å and |origin| ≤ 6√2 Å keep the centre within 13.2 px of the middle, ≥ 18.8 px = 6.4σ (σ ≤ 5 Å)
    # from every edge: the box holds all but 4·P(Z > 6.4) < 1e-9 of the mass
    mean = ((2 * torch.rand(3, generator=rng, dtype=F64) - 1) * 8).tolist()
    g = _one(mean, [sx, sy, sz], amp, quat=quat)
    img = project(*g, R, sh, box_size=D, pixel_size=p, backend=backend)[0]
    # closed form: a 2D Gaussian centred on (A μ)_xy / p + D//2 − origin / p, covariance the top-left block of
    # A Σ Aᵀ (px²), sampled at pixel centres; the torch backend keeps the pixels with q ≤ cutoff²
    centre = (R[0] @ torch.tensor(mean, dtype=F64))[:2] / p + D // 2 - sh[0] / p
    S = (R[0] @ covariance_3d(g[1], g[2])[0] @ R[0].T)[:2, :2] / p ** 2
    ys, xs = torch.meshgrid(torch.arange(D, dtype=F64), torch.arange(D, dtype=F64), indexing="ij")
    d = torch.stack([xs - centre[0], ys - centre[1]], -1)
    q = ((d @ torch.linalg.inv(S)) * d).sum(-1)
    closed = amp / (2 * math.pi * torch.linalg.det(S).sqrt()) * torch.exp(-q / 2)
    if backend == "torch":
        closed = closed * (q <= CUTOFF_SIGMA ** 2)  # a pixel within rounding (1e-15) of the cutoff: P < 1e-10
    assert torch.allclose(img, closed, rtol=1e-10, atol=1e-14)
    if backend == "torch":
        return
    # the dense image's moments are the Gaussian's: the unit-lattice sampling error of a Gaussian of σ ≥ 1.18 px
    # is ~exp(−2π²σ²) < 1e-11 (Poisson summation), the box loses < 1e-9
    assert float(img.sum()) == pytest.approx(amp, rel=1e-8)
    centroid = torch.stack([(img * xs).sum(), (img * ys).sum()]) / img.sum()
    assert torch.allclose(centroid, centre, rtol=0, atol=1e-6)
    dx, dy = xs - centroid[0], ys - centroid[1]
    cov = torch.stack([(img * dx * dx).sum(), (img * dx * dy).sum(), (img * dy * dy).sum()]) / img.sum()
    assert torch.allclose(cov, torch.stack([S[0, 0], S[0, 1], S[1, 1]]), rtol=0, atol=1e-6)


def test_peak_value_of_axis_aligned_gaussian():
    p, D, amp = 2.0, 33, 3.0
    img = project(*_one([4.0, -6.0, 1.0], [3.0, 5.0, 7.0], amp), torch.eye(3, dtype=F64)[None], None,
                  box_size=D, pixel_size=p, backend="dense")[0]
    # mean lands exactly on pixel (x, y) = (16 + 2, 16 − 3); peak = m / (2π σx σy) in px units
    assert float(img[13, 18]) == pytest.approx(amp / (2 * math.pi * (3 / p) * (5 / p)), rel=1e-12)
    assert float(img.max()) == float(img[13, 18])


def test_shift_translates_by_minus_origin():
    p, D = 1.5, 40
    g = _one([0.0, 0.0, 0.0], [3.0, 3.0, 3.0])
    R = torch.eye(3, dtype=F64)[None]
    centred = project(*g, R, None, box_size=D, pixel_size=p, backend="dense")[0]
    origin = torch.tensor([[3 * p, -5 * p]], dtype=F64)  # whole pixels: (+3, −5)
    shifted = project(*g, R, origin, box_size=D, pixel_size=p, backend="dense")[0]
    assert torch.allclose(shifted, torch.roll(centred, shifts=(5, -3), dims=(0, 1)), atol=1e-12)


def test_backends_agree_within_cutoff_bound(rng):
    D, p = 40, 1.2
    g = random_mixture(25, rng)
    R, sh = random_poses(3, rng)
    exact = project(*g, R, sh, box_size=D, pixel_size=p, backend="dense")
    splat = project(*g, R, sh, box_size=D, pixel_size=p, backend="torch")
    truncated = project(*g, R, sh, box_size=D, pixel_size=p, backend="dense", cutoff=CUTOFF_SIGMA)
    assert torch.allclose(splat, truncated, atol=1e-13, rtol=0)
    _, _, w, _ = preprocess(*g, R, sh, box_size=D, pixel_size=p)
    bound = (w.sum(1) * math.exp(-CUTOFF_SIGMA ** 2 / 2))[:, None, None]
    diff = exact - splat
    assert (diff >= -1e-13).all() and (diff <= bound).all()
    assert diff.abs().max() > 0  # the bound is not vacuous: the cutoff does drop something


def _trilinear_projection(vol, A, D):
    """Independent projector: sample V(Aᵀ r) with trilinear interpolation and sum over z."""
    c = torch.arange(D, dtype=vol.dtype) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 3)  # image coordinates (px)
    m = r @ A  # rows are Aᵀ r: map coordinates
    grid = (2 * (m + D // 2) / (D - 1) - 1).reshape(1, D, D, D, 3)  # grid_sample wants (x, y, z)
    s = F.grid_sample(vol[None, None], grid, mode="bilinear", align_corners=True, padding_mode="zeros")
    return s[0, 0].sum(0)  # sum over the z axis of the image frame


@pytest.mark.statistical
def test_rotation_convention_against_voxel_projector(rng):
    """Statistical (seeded: see the ``statistical`` marker). Over 300 seeds none failed; the lowest correct-pose
    correlation was 0.99979."""
    D, p = 40, 2.0
    means, *rest = random_mixture(12, rng, spread=9.0, scale_range=(3.0, 7.0))
    # centres pulled inside 15 Å: with the 3.5σ (σ ≤ 7 Å) voxelize cutoff all mass lies within the 40 Å
    # that both the map box and every rotated sampling box contain
    g = (means * (15 / means.norm(dim=1, keepdim=True)).clamp(max=1), *rest)
    vol = voxelize(*g, box_size=D, pixel_size=p)
    # the last pose is a quarter-turn about a random axis, for the transposed-convention check below
    axis = torch.randn(3, generator=rng, dtype=F64)
    quarter = axis_angle_to_matrix(axis / axis.norm() * math.pi / 2)[None]
    R = torch.cat([random_poses(4, rng)[0], quarter])
    gamma = project(*g, R, None, box_size=D, pixel_size=p, backend="dense")
    for b in range(len(R)):
        ref = _trilinear_projection(vol, R[b], D)
        corr = torch.corrcoef(torch.stack([ref.flatten(), gamma[b].flatten()]))[0, 1]
        assert corr >= 0.999, f"pose {b}: correlation {corr:.4f}"
    # the test can fail: the transposed convention misses the same threshold. A turn by θ and its transpose
    # differ by a turn of 2θ, so a random pose near 0° or 180° cannot tell them apart (~5% of uniform
    # rotations lie within 4° of 180°). For a quarter-turn they differ by a half-turn, which a mixture
    # without two-fold symmetry always shows (highest correlation 0.96 over 300 seeds).
    wrong = _trilinear_projection(vol, R[-1].T, D)
    assert torch.corrcoef(torch.stack([wrong.flatten(), gamma[-1].flatten()]))[0, 1] < 0.999


def test_rotation_convention_with_relion_euler_angles():
    """A Gaussian at +x in the map, seen at tilt 90°: RELION's A maps it to −z, so it lands at the centre."""
    D, p = 32, 1.0
    g = _one([6.0, 0.0, 0.0], [1.5, 1.5, 1.5])
    A = euler_to_matrix(torch.tensor([[0.0, 90.0, 0.0]], dtype=F64))
    img = project(*g, A, None, box_size=D, pixel_size=p, backend="dense")[0]
    assert divmod(int(img.argmax()), D) == (D // 2, D // 2)
    A = euler_to_matrix(torch.tensor([[90.0, 0.0, 0.0]], dtype=F64))  # rot 90°: +x goes to −y
    img = project(*g, A, None, box_size=D, pixel_size=p, backend="dense")[0]
    assert divmod(int(img.argmax()), D) == (D // 2 - 6, D // 2)


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_gradcheck_every_parameter_including_pose(rng, backend):
    D, p = 14, 1.3
    g = random_mixture(3, rng, spread=3.0, scale_range=(1.2, 2.5))
    R, sh = random_poses(2, rng, max_shift=2.0)
    params = (*g, R, sh)
    if backend == "torch":
        # The hard cutoff is a jump of w·exp(-k²/2) at q = k²: a pixel that the eps = 1e-6 step carries
        # across it breaks the finite difference (seed 645 did). The step moves q by at most ~1e-5·k²
        # (2k/σ_px per px of motion, under 10 px per unit change of any input; scale and covariance
        # terms the same order), so Gaussians are kept 1e-3·k² away from the cutoff at every pixel.
        params = guard_cutoff(params, D, p, CUTOFF_SIGMA, tol=1e-3, gen=rng)
    inputs = [t.clone().requires_grad_(True) for t in params]
    v = torch.randn(2, D, D, generator=rng, dtype=F64)

    def f(means, quats, scales, amps, rot, shifts):
        return (project(means, quats, scales, amps, rot, shifts, box_size=D, pixel_size=p, backend=backend)
                * v).sum()

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_chunked_paths_match_unchunked(rng):
    """Forcing tiny chunks (and checkpointing) changes neither values nor gradients."""
    from cryogs.render import reference

    D, p = 20, 1.5
    g = [t.clone().requires_grad_(True) for t in random_mixture(7, rng)]
    R, sh = random_poses(3, rng)
    m2, cn, w, r = preprocess(*g, R, sh, box_size=D, pixel_size=p)
    for fn, kw in [(reference.rasterize_dense, {"cutoff": None}), (reference.rasterize_splat, {"cutoff": 3.5})]:
        big = fn(m2, cn, w, r, box_size=D, **kw)
        small = fn(m2, cn, w, r, box_size=D, max_elements=500, **kw)
        assert torch.allclose(big, small, atol=1e-12)
        gb = torch.autograd.grad(big.square().sum(), g, retain_graph=True)
        gs = torch.autograd.grad(small.square().sum(), g, retain_graph=True)
        for a, b in zip(gb, gs):
            assert torch.allclose(a, b, atol=1e-10)


def test_voxelize_closed_forms(rng):
    D, p, amp, s = 32, 1.5, 4.0, 3.0
    g = _one([3.0, -1.5, 4.5], [s, s, s], amp)
    vol = voxelize(*g, box_size=D, pixel_size=p)
    k = CUTOFF_SIGMA
    # mass inside the 3D cutoff sphere: P(χ²₃ ≤ k²)
    inside = math.erf(k / math.sqrt(2)) - math.sqrt(2 / math.pi) * k * math.exp(-k * k / 2)
    assert float(vol.sum()) == pytest.approx(amp * inside, rel=2e-3)
    # V[z, y, x]: the mean (x, y, z) = (2, −1, 3) voxels from the centre
    assert float(vol[D // 2 + 3, D // 2 - 1, D // 2 + 2]) == pytest.approx(amp / ((2 * math.pi) ** 1.5 * (s / p) ** 3),
                                                                         rel=1e-12)
    # summing the volume along z is the tilt-0 projection, less what the cutoff drops: a z-line loses at
    # most exp(-c²/2) of its Gaussian's projected peak (the line through the rim of the cutoff ellipsoid
    # loses everything). The box holds every Gaussian to 6σ, so nothing else is lost.
    D = 48
    g2 = random_mixture(6, rng, spread=4.0, scale_range=(2.0, 4.0))
    eye = torch.eye(3, dtype=F64)[None]
    img = project(*g2, eye, None, box_size=D, pixel_size=p, backend="dense")[0]
    peaks = preprocess(*g2, eye, None, box_size=D, pixel_size=p)[2][0]
    for c in (6.0, k):
        loss = img - voxelize(*g2, box_size=D, pixel_size=p, cutoff=c).sum(0)
        assert float(loss.min()) > -1e-12
        assert float(loss.max()) <= math.exp(-c * c / 2) * float(peaks.sum())


@pytest.mark.parametrize("bad, match", [
    (dict(pixel_size=0.0), "pixel_size must be positive"),
    (dict(pixel_size=-1.0), "pixel_size must be positive"),
    (dict(box_size=0), "box_size"),
    (dict(backend="gpu"), "unknown backend"),
    (dict(backend="cuda"), "backend 'cuda'"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
    g = _one([0.0, 0.0, 0.0], [2.0, 2.0, 2.0])
    kw = dict(box_size=16, pixel_size=1.0, backend="torch") | bad
    with pytest.raises(CryogsError, match=match):
        project(*g, torch.eye(3, dtype=F64)[None], None, **kw)


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_no_gaussians_gives_blank_images(backend):
    e = torch.zeros(0, 3, dtype=F64)
    img = project(e, torch.zeros(0, 4, dtype=F64), e, torch.zeros(0, dtype=F64), torch.eye(3, dtype=F64)[None],
                  None, box_size=8, pixel_size=1.0, backend=backend)
    assert img.shape == (1, 8, 8) and (img == 0).all()


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_invalid_gaussians_and_poses_cover_nothing_and_get_finite_gradients(rng, backend):
    """A zero, NaN or infinite quaternion, zero or NaN scales, a NaN mean, an infinite amplitude, a NaN
    rotation or shift: the pair covers nothing, and every leaf's gradient is finite (zero for the
    invalid entries, and for the valid ones what it is without the invalid ones)."""
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

    def render(m, q, s, a, r, t):
        return project(m, q, s, a, r, t, box_size=24, pixel_size=1.5, backend=backend)

    inputs = [t.clone().requires_grad_(True) for t in (*leaves.values(), rot, shifts)]
    img = render(*inputs)
    (img * weights).sum().backward()
    for name, t in zip(("means", "quats", "scales", "amps", "rotations", "shifts"), inputs):
        assert torch.isfinite(t.grad).all(), name
    assert (img[1:] == 0).all() and torch.isfinite(img).all()  # images 1 and 2 have an invalid pose
    for t in inputs[:4]:
        assert (t.grad[:7] == 0).all()
    for t in inputs[4:]:
        assert (t.grad[1:] == 0).all()
    good = [t[7:].clone().requires_grad_(True) for t in leaves.values()] + [rot[:1].clone().requires_grad_(True),
                                                                            shifts[:1].clone().requires_grad_(True)]
    ref = render(*good)
    (ref * weights[:1]).sum().backward()
    torch.testing.assert_close(img[:1].detach(), ref.detach())
    for t, r in zip(inputs, good):
        torch.testing.assert_close(t.grad[7:] if t.shape[0] == 10 else t.grad[:1], r.grad)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_zero_amplitude_gets_its_gradient(rng, backend):
    """A Gaussian of amplitude exactly 0 still has ∂I/∂m = its unit-mass image, as in the dense backend."""
    if backend == "cpu":
        cpu_ops_or_skip()
    means, quats, scales, amps = random_mixture(4, rng, spread=3.0)
    amps[1] = 0.0
    rot, shifts = random_poses(2, rng, max_shift=2.0)
    weights = torch.randn(2, 20, 20, generator=rng, dtype=F64)
    grads = {}
    for name in ("dense", backend):
        a = amps.clone().requires_grad_(True)
        img = project(means, quats, scales, a, rot, shifts, box_size=20, pixel_size=1.5, backend=name,
                      cutoff=CUTOFF_SIGMA)
        (img * weights).sum().backward()
        grads[name] = a.grad
    assert grads[backend][1] != 0
    torch.testing.assert_close(grads[backend], grads["dense"])
