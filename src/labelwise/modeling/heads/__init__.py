"""Projection / prediction heads shared by the methods.

``dino.py``: the DINO projection head (MLP -> L2 norm -> weight-normalised prototypes) and its
last-layer gradient freezing; :class:`ProjectionMLP` (the MLP + L2 norm alone: SeCo's O_q / O_k).
"""

from labelwise.modeling.heads.dino import (
    DINOHead,
    ProjectionMLP,
    WeightNormLinear,
    build_mlp,
    cancel_last_layer_gradients,
)

__all__ = ["DINOHead", "ProjectionMLP", "WeightNormLinear", "build_mlp", "cancel_last_layer_gradients"]
