"""Projection / prediction heads shared by the methods.

Now: the DINO projection head and its last-layer gradient freezing (``dino.py``).
"""

from labelwise.modeling.heads.dino import (
    DINOHead,
    WeightNormLinear,
    cancel_last_layer_gradients,
)

__all__ = ["DINOHead", "WeightNormLinear", "cancel_last_layer_gradients"]
