"""Γ, the projection of 3D Gaussians into images (and their voxelization into maps), behind one
entry point, :func:`cryogs.render.project.project`, with three backends: ``dense`` (the float64
specification), ``torch`` (a truncated splat) and ``cuda`` (the hand-written kernels in ``csrc/``).
Imports only :mod:`cryogs.physics`.
"""
