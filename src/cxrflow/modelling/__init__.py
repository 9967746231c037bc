"""Models and their training: the model registry, the typed training config, two-stage training
(local, torchrun or Spark), inference over a split, calibration, ensembles and heatmaps.
"""
