"""Config of the ``cam`` baseline (``BaseConfig`` + ``model`` / ``loss`` / ``infer``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError


@dataclass
class CAMModelConfig:
    backbone: str = param("efficientnet_lite0", help="backbone alias or timm name (CNN or ViT)")
    pretrained: bool = param(True, help="load the backbone's pretrained weights (the local hub cache, else downloaded as timm does)")
    weights: str | None = param(None, path=True, help="path to a backbone checkpoint (overrides pretrained)")
    feature_strides: list[int] = param([16, 32], choices=(4, 8, 16, 32),
                                       help="CNN: feature levels concatenated (upsampled to the finest) for the CAM; "
                                            "ViT: ignored (the patch-token grid is used)")
    pooling: str = param("gap", choices=("gap", "gmp", "gwrp"), help="image logits from the maps")
    freeze_backbone: bool = param(False, help="train only the CAM head (backbone frozen, BN in eval mode)")
    size_divisor: int = param(32, range=(1, None), help="inference inputs are resized to a multiple of this")

    def validate(self) -> None:
        if not self.feature_strides:
            raise LabelwiseError("config key 'model.feature_strides' is empty; give the CNN strides the CAM uses, "
                                 "e.g. [16, 32]")


@dataclass
class CAMLossConfig:
    cls_weight: float = param(1.0, range=(0.0, None), help="weight of the multilabel soft-margin loss on tags")


@dataclass
class CAMInferConfig(InferConfig):
    scales: list[float] = param([1.0, 0.5, 1.5, 2.0], range=(0.05, 8.0), help="multi-scale CAM scales")
    flip: bool = param(True, help="add horizontally flipped inputs")
    bg_threshold: float = param(0.3, range=(0.0, 1.0), help="pixels whose best present CAM <= this are background")
    tags: str = param("auto", choices=("auto", "gt", "pred"),
                      help="classes a CAM is kept for: auto = the split's image tags when the dataset has them, "
                           "else predicted classes; gt = require tags; pred = always predicted")
    pred_threshold: float = param(0.5, range=(0.0, 1.0), help="sigmoid probability above which a class is predicted")
    crf: bool = param(False, help="refine pseudo-masks with a dense CRF (label unary, needs pydensecrf2)")
    crf_gt_prob: float = param(0.7, range=(0.01, 0.99), help="CRF unary confidence of the CAM label")
    max_size: int = param(0, range=(0, None), help="resize images so the long side is <= this for CAM (0 = off)")

    def validate(self) -> None:
        if not self.scales:
            raise LabelwiseError("config key 'infer.scales' is empty; give at least one scale, e.g. [1.0]")


@dataclass
class CAMConfig(BaseConfig):
    model: CAMModelConfig = field(default_factory=CAMModelConfig)
    loss: CAMLossConfig = field(default_factory=CAMLossConfig)
    infer: CAMInferConfig = field(default_factory=CAMInferConfig)
