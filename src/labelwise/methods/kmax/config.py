"""Config of ``kmax`` (kMaX-DeepLab for object parsing: part and object levels) and the base of
``cocal``'s config: ``BaseConfig`` + ``model`` / ``loss`` / ``infer``.

``model.decoder=mask2former`` swaps the kMaX pixel + transformer decoders for Mask2Former's
(multi-scale deformable pixel decoder, masked-attention decoder; ``model.mask2former.*``) and
kMaX's losses for Mask2Former's (``loss.mask2former.*``): CoCal's Table 5.

Defaults follow kMaX-DeepLab's official PyTorch port as used by CoCal
(``docs/release-settings.md``): pixel decoder + k-means transformer decoder with [2, 2, 2]
layers on strides 32 / 16 / 8, loss weights class 3.0, dice 3.0, mask 0.3, instance
discrimination 1.0, auxiliary semantic 1.0, focal alpha 0.75 gamma 0, AdamW wd 0.05, backbone
lr x 0.1. The presets (``partimagenet``, ``pascalpart``, ``cpu``) set the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError


@dataclass
class Mask2FormerNetConfig:
    conv_dim: int = param(256, range=(8, None), help="pixel decoder width (Mask2Former: 256)")
    mask_dim: int = param(256, range=(8, None), help="mask-embedding width (Mask2Former: 256); CoCal's dictionary "
                                                     "components live in this space")
    hidden_dim: int = param(256, range=(8, None), help="query width (Mask2Former: 256)")
    pixel_layers: int = param(6, range=(1, None), help="deformable-attention encoder layers of the pixel decoder (6)")
    pixel_heads: int = param(8, range=(1, None), help="deformable-attention heads of the pixel decoder (8)")
    pixel_ffn: int = param(1024, range=(8, None), help="pixel decoder FFN width (1024)")
    dec_layers: int = param(9, range=(1, None), help="masked-attention decoder layers (Mask2Former: 9)")
    nheads: int = param(8, range=(1, None), help="decoder attention heads (8)")
    dim_feedforward: int = param(2048, range=(8, None), help="decoder FFN width (2048)")


@dataclass
class KMaXModelConfig:
    backbone: str = param("resnet50", help="backbone alias or timm name (ResNet-50 / ConvNeXt-T in the paper; "
                                           "efficientnet_lite0 has shipped weights)")
    pretrained: bool = param(True, help="load the backbone's pretrained weights (the local hub cache, else downloaded as timm does)")
    weights: str | None = param(None, path=True, help="path to a backbone checkpoint (overrides pretrained)")
    drop_path: float = param(0.0, range=(0.0, 1.0), help="stochastic depth of the backbone (CoCal: drop path)")
    timm_kwargs: dict = param(default_factory=dict, help="extra timm constructor arguments")
    decoder: str = param("kmax", choices=("kmax", "mask2former"),
                         help="kmax: kMaX-DeepLab's pixel + k-means decoders and losses; mask2former: Mask2Former's "
                              "decoders (model.mask2former.*) and losses (loss.mask2former.*), CoCal Table 5")
    mask2former: Mask2FormerNetConfig = field(default_factory=Mask2FormerNetConfig)
    pixel_dims: list[int] = param([512, 256, 128, 64], range=(8, None),
                                  help="pixel decoder widths at strides 32 / 16 / 8 / 4 (kMaX: 512, 256, 128, 64)")
    pixel_blocks: list[int] = param([1, 5, 1, 1], range=(0, None),
                                    help="pixel decoder blocks at strides 32 / 16 / 8 / 4 (axial at 32 and 16, "
                                         "bottleneck at 8 and 4; kMaX: 1, 5, 1, 1)")
    axial_heads: int = param(8, range=(1, None), help="axial-attention heads of the pixel decoder (kMaX: 8)")
    hidden_dim: int = param(256, range=(8, None), help="cluster-centre (query) width (kMaX: 256)")
    base_filters: int = param(128, range=(8, None), help="kMaX block width unit (kMaX: 128)")
    mask_dim: int = param(128, range=(8, None), help="pixel-embedding / mask-kernel width (kMaX: 128); CoCal's "
                                                     "dictionary components live in this space")
    pixel_head_dim: int = param(256, range=(8, None), help="hidden width of the pixel head (kMaX: 256)")
    dec_layers: list[int] = param([2, 2, 2], range=(0, None), help="kMaX decoder blocks at strides 32 / 16 / 8")
    nheads: int = param(8, range=(1, None), help="self-attention heads of the transformer decoder")
    dim_feedforward: int = param(2048, range=(8, None), help="transformer decoder FFN width")
    part_queries: int = param(0, range=(0, None),
                              help="kmax only: cluster centres of the part level (0 = 2 x the part classes); "
                                   "cocal's dictionary has exactly one per part class")
    object_queries: int = param(0, range=(0, None),
                                help="kmax only: cluster centres of the object level (0 = 2 x the object classes)")


@dataclass
class Mask2FormerLossConfig:
    class_weight: float = param(2.0, range=(0.0, None), help="class cross-entropy weight, loss and matching (2.0)")
    mask: float = param(5.0, range=(0.0, None), help="sigmoid BCE weight, loss and matching (5.0)")
    dice: float = param(5.0, range=(0.0, None), help="dice weight, loss and matching (5.0)")
    no_object: float = param(0.1, range=(0.0, None), help="cross-entropy weight of the no-object class (0.1)")
    num_points: int = param(12544, range=(1, None), help="sampled points per mask (112 x 112)")
    oversample: float = param(3.0, range=(1.0, None), help="PointRend oversampling ratio (3.0)")
    importance: float = param(0.75, range=(0.0, 1.0), help="share of uncertain points (0.75)")


@dataclass
class KMaXLossConfig:
    pq_class: float = param(3.0, range=(0.0, None), help="PQ-style class loss weight (kMaX: 3.0)")
    pq_dice: float = param(3.0, range=(0.0, None), help="PQ-style dice loss weight (kMaX: 3.0)")
    mask: float = param(0.3, range=(0.0, None), help="pixel-wise mask-ID cross-entropy weight (kMaX: 0.3)")
    instdisc: float = param(1.0, range=(0.0, None), help="pixel-wise instance discrimination weight (kMaX: 1.0)")
    instdisc_samples: int = param(4096, range=(1, None),
                                  help="pixels sampled per image for instance discrimination (kMaX: 4096)")
    instdisc_temperature: float = param(0.3, range=(1e-4, None), help="instance discrimination temperature (0.3)")
    aux_semantic: float = param(1.0, range=(0.0, None), help="auxiliary semantic cross-entropy weight (kMaX: 1.0)")
    focal_alpha: float = param(0.75, range=(0.0, 1.0), help="focal alpha of the mask-ID loss (kMaX: 0.75)")
    focal_gamma: float = param(0.0, range=(0.0, None), help="focal gamma of the mask-ID loss (kMaX: 0)")
    deep_supervision: bool = param(True, help="the losses on every decoder prediction (aux outputs)")
    mask2former: Mask2FormerLossConfig = field(default_factory=Mask2FormerLossConfig)


@dataclass
class KMaXInferConfig(InferConfig):
    max_size: int = param(0, range=(0, None), help="shrink images so the long side is <= this (0 = off)")


@dataclass
class KMaXConfig(BaseConfig):
    model: KMaXModelConfig = field(default_factory=KMaXModelConfig)
    loss: KMaXLossConfig = field(default_factory=KMaXLossConfig)
    infer: KMaXInferConfig = field(default_factory=KMaXInferConfig)

    def validate_levels(self) -> None:
        if len(self.model.pixel_dims) != 4 or len(self.model.pixel_blocks) != 4:
            raise LabelwiseError("config keys 'model.pixel_dims' and 'model.pixel_blocks' list strides 32 / 16 / 8 / 4 "
                                 "(4 values each)")
        if len(self.model.dec_layers) != 3:
            raise LabelwiseError("config key 'model.dec_layers' lists the decoder blocks at strides 32 / 16 / 8 "
                                 "(3 values)")
