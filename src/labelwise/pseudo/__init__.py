"""Training-free pseudo-mask generators: the MaskCut / TokenCut baselines, plus the shared
feature extraction, COCO writer and sharded/resumable runner used by all three methods
(OAP itself lives in :mod:`labelwise.pseudo.oap`)."""

from labelwise.pseudo.maskcut import MaskCut, MaskCutConfig
from labelwise.pseudo.tokencut import TokenCut, TokenCutConfig

__all__ = ["MaskCut", "MaskCutConfig", "TokenCut", "TokenCutConfig"]
