"""Random Gaussian mixtures and poses shared by the tests."""
import torch

from cryogs.physics.conventions import random_rotations


def random_mixture(n, gen, *, spread=8.0, scale_range=(1.5, 4.0), dtype=torch.float64):
    means = torch.randn(n, 3, generator=gen, dtype=dtype) * spread
    quats = torch.randn(n, 4, generator=gen, dtype=dtype)
    lo, hi = scale_range
    scales = lo + (hi - lo) * torch.rand(n, 3, generator=gen, dtype=dtype)
    amps = 0.5 + torch.rand(n, generator=gen, dtype=dtype)
    return means, quats, scales, amps


def random_poses(b, gen, *, max_shift=4.0, dtype=torch.float64):
    rot = random_rotations(b, generator=gen, dtype=dtype)
    shifts = (torch.rand(b, 2, generator=gen, dtype=dtype) * 2 - 1) * max_shift
    return rot, shifts


def mark_unfinished(run_folder):
    """Make a finished run's record say it was stopped, as a killed run leaves it (tests that fake an
    interruption by deleting files need it: a finished run is not resumed)."""
    import json

    record = run_folder / "run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running"}))
