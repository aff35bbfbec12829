"""The Gaussian model: its parameters and files (:mod:`~cryogs.model.gaussians`), adaptive density
control (:mod:`~cryogs.model.densify`) and priors (:mod:`~cryogs.model.priors`).
Imports :mod:`cryogs.io`, :mod:`cryogs.physics` and :mod:`cryogs.render`.
"""
