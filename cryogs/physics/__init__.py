"""The physics and conventions every other package relies on: RELION rotations and shifts
(:mod:`~cryogs.physics.conventions`), the CTF (:mod:`~cryogs.physics.ctf`), Fourier cropping
(:mod:`~cryogs.physics.fourier`) and the noise model (:mod:`~cryogs.physics.noise`).
Imports no other cryogs package.
"""
