"""Config of the ``segmenter`` method (``BaseConfig`` + ``model`` / ``loss`` / ``infer``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError


@dataclass
class SegmenterModelConfig:
    backbone: str = param("resnet101", help="backbone alias or timm name (CNN or ViT)")
    pretrained: bool = param(True, help="load the backbone's pretrained weights (the local hub cache, else downloaded as timm does)")
    weights: str | None = param(None, path=True, help="path to a backbone checkpoint (overrides pretrained)")
    output_stride: int = param(16, choices=(8, 16, 32),
                               help="encoder output stride (CNN: timm dilation; DeepLabV3+ Table 3 'train OS')")
    decoder: bool = param(True, help="DeepLabV3+ decoder (false = DeepLabV3: ASPP -> 1x1 classifier; "
                                     "DeepLabV3+ Table 3 'Decoder')")
    aspp_rates: list[int] = param([6, 12, 18], range=(1, None),
                                  help="ASPP atrous rates: (6, 12, 18) at output stride 16, (12, 24, 36) at 8 "
                                       "(DeepLabV3 Sec. 3.3)")
    aspp_channels: int = param(256, range=(1, None), help="ASPP filters per branch and projection (256)")
    low_channels: int = param(48, range=(1, None), help="low-level skip reduced to this (48; DeepLabV3+ Table 1)")
    decoder_channels: int = param(256, range=(1, None), help="filters of the two 3x3 decoder convs "
                                                             "(256; DeepLabV3+ Table 2)")
    dropout: float = param(0.1, range=(0.0, 1.0), help="dropout after the ASPP projection")

    def validate(self) -> None:
        if not self.aspp_rates:
            raise LabelwiseError("config key 'model.aspp_rates' is empty; give the atrous rates, e.g. [6, 12, 18]")


@dataclass
class SegmenterLossConfig:
    label_smoothing: float = param(0.0, range=(0.0, 0.99),
                                   help="label smoothing of the pixel cross-entropy (0 = the paper's plain CE)")


@dataclass
class SegmenterInferConfig(InferConfig):
    scales: list[float] = param([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], range=(0.05, 8.0),
                                help="multi-scale inference: softmax probabilities averaged over these scales "
                                     "(DeepLabV3+ Sec. 4, 'MS')")
    flip: bool = param(True, help="add horizontally flipped inputs (DeepLabV3+ Sec. 4, 'Flip')")
    crf: bool = param(False, help="refine the averaged probabilities with a dense CRF (pydensecrf2)")
    crf_iters: int = param(10, range=(1, None), help="dense CRF mean-field iterations")
    crf_pos_xy: float = param(1.0, range=(0.0, None), help="dense CRF Gaussian kernel std (px)")
    crf_pos_w: float = param(1.0, range=(0.0, None), help="dense CRF Gaussian kernel weight")
    crf_bi_xy: float = param(121.0, range=(0.0, None), help="dense CRF bilateral kernel spatial std (px)")
    crf_bi_rgb: float = param(5.0, range=(0.0, None), help="dense CRF bilateral kernel colour std")
    crf_bi_w: float = param(4.0, range=(0.0, None), help="dense CRF bilateral kernel weight")
    max_size: int = param(0, range=(0, None), help="shrink images so the long side is <= this before the network "
                                                   "(predictions are resized back; 0 = off)")

    def validate(self) -> None:
        if not self.scales:
            raise LabelwiseError("config key 'infer.scales' is empty; give at least one scale, e.g. [1.0]")


@dataclass
class SegmenterConfig(BaseConfig):
    model: SegmenterModelConfig = field(default_factory=SegmenterModelConfig)
    loss: SegmenterLossConfig = field(default_factory=SegmenterLossConfig)
    infer: SegmenterInferConfig = field(default_factory=SegmenterInferConfig)
