"""Judging a map: Fourier shell correlation (:mod:`~cryogs.analysis.fsc`), comparison with a
reference (:mod:`~cryogs.analysis.evaluate`) and figures (:mod:`~cryogs.analysis.figures`).
Imports :mod:`cryogs.io`, :mod:`cryogs.physics` and :mod:`cryogs.render`, never :mod:`cryogs.reconstruct`.
"""
