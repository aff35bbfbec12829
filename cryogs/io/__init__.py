"""Reading and writing what users bring and take away: particle sets (RELION STAR, cryoSPARC .cs,
cryoDRGN stacks), MRC maps and stacks, atomic models, and the batch loader that streams images.

Entry points: :func:`cryogs.io.load.load_particles`, :class:`cryogs.io.particles.ParticleSet`,
:mod:`cryogs.io.mrc`, :func:`cryogs.io.star.write_star`. Imports only :mod:`cryogs.physics`.
"""
