"""OAP's Online Agglomerative Pooling (OAP paper Sec. 3.1, Eqs. 2-6): training-free instance
and semantic pseudo-masks from self-supervised keys.

It lives here, beside MaskCut and TokenCut, because two users share it: ``labelwise
pseudo-masks oap`` (training-free) and OAP training (``labelwise.methods.oap``), which
pools its teacher's keys online with the same module.
"""

from labelwise.pseudo.oap.graph import cc_scipy, cc_torch, connected_components
from labelwise.pseudo.oap.pooling import MaskSet, OAPConfig, OAPImageResult, OnlineAgglomerativePooling, grid_edges

__all__ = ["OAPConfig", "OnlineAgglomerativePooling", "OAPImageResult", "MaskSet", "grid_edges",
           "connected_components", "cc_torch", "cc_scipy"]
