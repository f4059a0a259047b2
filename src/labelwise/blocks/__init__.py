"""Building blocks shared by several methods (see ``docs/architecture.md``).

CAM head and multi-scale CAM inference (:mod:`.cam`), dense CRF (:mod:`.crf`, optional
``pydensecrf2``), EMA teacher (:mod:`.ema`), FIFO memory bank (:mod:`.memory_bank`),
contrastive losses (:mod:`.contrastive`), prototype EMA bank (:mod:`.prototypes`),
Hungarian matching and cropped per-level matching (:mod:`.matching`, imported on first use),
Mask2Former's point-sampled mask losses and matching costs (:mod:`.mask_losses`) and DINO-style
self-distillation with a centre (:mod:`.self_distill`).
"""

from __future__ import annotations

from labelwise.blocks.cam import (
    CAMHead,
    cam_from_features,
    cam_seeds,
    cam_to_label,
    max_norm,
    multiscale_cam,
    pool_maps,
)
from labelwise.blocks.contrastive import info_nce, masked_info_nce, select_hard_negatives, supcon_loss, topk_mask
from labelwise.blocks.crf import crf_available, crf_refine_label, dense_crf, label_unary
from labelwise.blocks.ema import EMATeacher, momentum_schedule, unwrap_model
from labelwise.blocks.memory_bank import FIFOQueue
from labelwise.blocks.prototypes import PrototypeBank

__all__ = [
    "CAMHead", "cam_from_features", "cam_seeds", "cam_to_label", "max_norm", "multiscale_cam", "pool_maps",
    "info_nce", "masked_info_nce", "select_hard_negatives", "supcon_loss", "topk_mask",
    "crf_available", "crf_refine_label", "dense_crf", "label_unary",
    "EMATeacher", "momentum_schedule", "unwrap_model",
    "FIFOQueue", "PrototypeBank",
    "hungarian_match",
]


def __getattr__(name: str):
    # blocks.matching is written separately; import it only when asked for.
    if name == "hungarian_match":
        from labelwise.blocks import matching

        return matching.hungarian_match
    raise AttributeError(f"module 'labelwise.blocks' has no attribute {name!r}")
