"""Γ, the projection of 3D Gaussians into images (and their voxelization into maps), behind one
entry point, :func:`cryogs.render.project.project`, with four backends: ``dense`` (the float64
specification), ``torch`` (a truncated splat), ``cuda`` (the hand-written kernels in ``csrc/``) and
``cpu`` (C++/OpenMP on the kernels' per-Gaussian maths, also in ``csrc/``).
Imports only :mod:`cryogs.physics`.
"""
