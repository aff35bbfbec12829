"""From particles to a map: the known-pose fit (:mod:`~cryogs.reconstruct.fit`, configured by
:mod:`~cryogs.reconstruct.config`, checkpointed by :mod:`~cryogs.reconstruct.checkpoint`, writing
:mod:`~cryogs.reconstruct.outputs`), gold-standard half maps, pose refinement, several processes,
and the voxel baseline (:mod:`~cryogs.reconstruct.backproject`). Uses every package above it.
"""
