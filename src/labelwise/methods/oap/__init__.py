"""OAP (Online Agglomerative Pooling): training-free instance/semantic pseudo-masks from SSL keys.

This package holds the pseudo-mask part (``pooling.py``, ``graph.py``); OAP training
(query-wise self-distillation) is added by a later issue.
"""

from labelwise.methods.oap.graph import cc_scipy, cc_torch, connected_components
from labelwise.methods.oap.pooling import MaskSet, OAPConfig, OAPImageResult, OnlineAgglomerativePooling, grid_edges

__all__ = ["OAPConfig", "OnlineAgglomerativePooling", "OAPImageResult", "MaskSet", "grid_edges",
           "connected_components", "cc_torch", "cc_scipy"]
