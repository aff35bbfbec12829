"""The benchmark's evaluation accounting: useful evaluations are the pixel centres inside the image
and inside each pair's cutoff ellipse, whatever the backend evaluates besides."""
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "bench_project", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_project.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_useful_evaluations_count_lattice_points_in_the_ellipse():
    # an isotropic σ = 2 px Gaussian with cutoff 3σ: the 113 lattice points within radius 6 (Gauss's
    # circle problem), all of them when centred, fewer when the image edge cuts the disc
    conic = torch.tensor([[[0.25, 0.0, 0.25]]], dtype=torch.float64)
    radii = torch.tensor([[[6.0, 6.0]]], dtype=torch.float64)
    centred = torch.tensor([[[16.0, 16.0]]], dtype=torch.float64)
    assert bench._useful_evaluations(centred, conic, radii, 32, 3.0) == 113
    corner = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)  # a quarter disc plus its two half-axes
    assert bench._useful_evaluations(corner, conic, radii, 32, 3.0) == (113 - 1 - 4 * 6) // 4 + 2 * 6 + 1
    invalid = torch.zeros(1, 1, 2, dtype=torch.float64)
    assert bench._useful_evaluations(centred, conic, invalid, 32, 3.0) == 0
