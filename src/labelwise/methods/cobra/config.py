"""Config of ``cobra`` (``BaseConfig`` + ``model`` / ``loss`` / ``cobra`` / ``infer``).

Defaults are the paper's VOC settings and, where the paper is silent, the authors' release
(``docs/release-settings.md``); the ``voc``, ``coco`` and ``cpu`` presets override them.
The switches of Table 3 are ``cobra.cnn``, ``cobra.vit``, ``cobra.l_cam``, ``cobra.l_cap`` and
``cobra.l_sap``; Table 5's seed sources are ``infer.source``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError

SOURCES = ("auto", "cnn", "vit", "fuse", "mean", "max")


@dataclass
class CoBraModelConfig:
    cnn: str = param("resnet50", help="CAK branch: CNN backbone (alias or timm name)")
    cnn_pretrained: bool = param(True, help="load the CNN's pretrained weights (the local hub cache, else downloaded as timm does)")
    cnn_weights: str | None = param(None, path=True, help="path to a CNN checkpoint (overrides cnn_pretrained)")
    cnn_timm_kwargs: dict = param(default_factory=lambda: {"output_stride": 16},
                                  help="extra timm arguments of the CNN; output_stride 16 = ResNet strides (2,2,2,1) "
                                       "as IRN / CoBra (the last downsampling removed)")
    cnn_strides: list[int] = param(default_factory=list, choices=(4, 8, 16, 32),
                                   help="CNN feature levels concatenated (upsampled to the finest) for the CAM and "
                                        "CAP; empty = the CNN's final map (ResNet layer4)")
    cnn_frozen_bn: bool = param(True, help="CNN BatchNorm in eval mode with frozen affine (as IRN / the release)")
    vit: str = param("deit_small_patch16", help="SAK branch: ViT with a class token (alias or timm name)")
    vit_pretrained: bool = param(True, help="load the ViT's pretrained weights (the local hub cache, else downloaded as timm does)")
    vit_weights: str | None = param(None, path=True, help="path to a ViT checkpoint in timm / DeiT layout")
    vit_timm_kwargs: dict = param(default_factory=dict,
                                  help="extra timm arguments of the ViT, e.g. {patch_size: 8, embed_dim: 192, "
                                       "depth: 6, num_heads: 3} for a small from-scratch ViT")
    vit_lr_mult: float | None = param(None, range=(0.0, None),
                                      help="lr of the whole SAK branch (ViT and its heads) = optim.lr x this (None: "
                                           "the ViT at optim.backbone_lr_mult and its heads at the full lr, as the CNN)")
    vit_head_kernel: int = param(3, choices=(1, 3), help="kernel of the ViT CAM conv head (TS-CAM: 3)")
    vit_pooling: str = param("gap", choices=("gap", "gmp"),
                             help="ViT image logits from its maps: gap (TS-CAM, the paper) or gmp (global max, as "
                                  "SeCo/ToCo; localises better for a ViT trained from scratch)")
    embed_dim: int = param(256, range=(1, None), help="CAP / SAP embedding size (supplement Table 11: 256)")


@dataclass
class CoBraLossConfig:
    cls: float = param(1.0, range=(0.0, None), help="weight of L_cls = L_cls-cnn + L_cls-tran")
    lambda1: float = param(0.1, range=(0.0, None), help="lambda_1 of Eq. 3/4: weight of L_cam")
    lambda2: float = param(0.1, range=(0.0, None), help="lambda_2 of Eq. 3/4: weight of L_cap + L_sap")
    cam_form: str = param("localisation", choices=("localisation", "raw"),
                          help="what L_cam compares: the localisation maps (ReLU, max-normalised per class, absent "
                               "classes zero: shape, not scale) or the raw CAMs (see the package docstring)")
    tau: float = param(0.1, range=(1e-4, None), help="temperature of Eqs. 1 and 2")
    k_cap_pos: int = param(5, range=(1, None), help="k_cap^+: positives of Eq. 1 (top of the ViT patch affinity)")
    k_cap_neg: int = param(20, range=(1, None), help="k_cap^-: negatives of Eq. 1 (bottom of the ViT patch affinity)")
    k_sap_pos: int = param(20, range=(1, None), help="k_sap^+: positives of Eq. 2 (top CNN pseudo-label patches)")
    k_sap_neg: int = param(5, range=(1, None), help="k_sap^-: negatives of Eq. 2 (bottom-scoring CNN patches)")
    patch_reduction: str = param("mean", choices=("mean", "sum"),
                                 help="L_cap / L_sap over target patches: the paper writes a sum over i; mean keeps "
                                      "lambda_2 independent of the token count (see the package docstring)")
    cam_start_epoch: float = param(1.0, range=(0.0, None), help="L_cam is on from this epoch (paper: after one)")
    contrast_start_epoch: float = param(5.0, range=(0.0, None),
                                        help="L_cap and L_sap are on from this epoch (paper silent; release: 5)")


@dataclass
class CoBraMethodConfig:
    """The components the paper ablates (Table 3 rows)."""

    cnn: bool = param(True, help="Table 3: the Class-Aware Knowledge (CNN) branch")
    vit: bool = param(True, help="Table 3: the Semantic-Aware Knowledge (ViT) branch")
    l_cam: bool = param(True, help="Table 3: L_cam, L1 consistency of the two branches' CAMs (Sec. 3.3.1)")
    l_cap: bool = param(True, help="Table 3: L_cap, Eq. 1 (ViT patch affinity -> CNN projection)")
    l_sap: bool = param(True, help="Table 3: L_sap, Eq. 2 (CNN pseudo labels -> ViT projection)")

    def validate(self) -> None:
        if not (self.cnn or self.vit):
            raise LabelwiseError("config keys 'cobra.cnn' and 'cobra.vit' are both false; keep at least one branch")


@dataclass
class CoBraInferConfig(InferConfig):
    source: str = param("auto", choices=SOURCES,
                        help="seed (Table 5): cnn = M_cnn, vit = M_tran, fuse = max((M_cnn+M_tran)/2, M_tran), "
                             "mean = (M_cnn+M_tran)/2, max = max(M_cnn, M_tran); auto = fuse with both branches, "
                             "else the one trained")
    scales: list[float] = param([0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], range=(0.05, 8.0),
                                help="multi-scale CAM scales (+ flip; supplement Sec. 10)")
    flip: bool = param(True, help="add horizontally flipped inputs")
    size: int = param(0, range=(0, None), help="resize the long side to this first (0 = keep the image size)")
    bg_source: str = param("fixed", choices=("fixed", "attention"),
                           help="background of --what masks (the seed mIoU protocol): fixed = infer.bg_threshold; "
                                "attention = each image's attention-derived threshold (the one written for IRN's "
                                "IR labels; measured 0.2 mIoU below fixed on the development testbed)")
    bg_threshold: float = param(0.3, range=(0.0, 1.0),
                                help="fixed background threshold of the seeds' masks (chosen on the development "
                                     "testbed, cooc seed 5: the best mean seed mIoU of M_cnn, M_tran and M_fuse)")
    bg_attention_norm: str = param("raw", choices=("raw", "max", "minmax"),
                                   help="IR-label threshold (supplement Sec. 9.1): the scale the attention map's "
                                        "quantile is read on: raw summed attention (the release), max-normalised, "
                                        "or min-max stretched")
    bg_quantile: float = param(0.93, range=(0.0, 1.0),
                               help="IR-label threshold: the quantile of the semantic-agnostic attention map taken "
                                    "as each image's background threshold (the release's 93rd percentile, searched "
                                    "on VOC; the cpu preset's was chosen on the development testbed)")
    bg_snap: float = param(0.05, range=(0.0, 1.0), help="attention: threshold snapped to this grid (0 = off)")
    bg_range: tuple[float, float] = param((0.05, 0.95), range=(0.0, 1.0),
                                          help="attention: the threshold is clamped to this range")
    crf: bool = param(True, help="dense CRF of --what masks (Sec. 3.4); without pydensecrf2 installed the masks are "
                                 "the thresholded seeds, with a warning")
    crf_gt_prob: float = param(0.7, range=(0.01, 0.99), help="CRF unary confidence of the seed label (release 0.7)")
    tags: str = param("auto", choices=("auto", "gt", "pred"),
                      help="classes a seed is kept for: the split's image tags (auto, when it has them) or "
                           "predicted classes (sigmoid > infer.pred_threshold)")
    pred_threshold: float = param(0.5, range=(0.0, 1.0), help="sigmoid probability above which a class is predicted")

    def validate(self) -> None:
        if not self.scales:
            raise LabelwiseError("config key 'infer.scales' is empty; give at least one scale, e.g. [1.0]")
        lo, hi = self.bg_range
        if lo > hi:
            raise LabelwiseError(f"config key 'infer.bg_range' must be [low, high] with low <= high, got "
                                 f"{list(self.bg_range)}")


@dataclass
class CoBraConfig(BaseConfig):
    model: CoBraModelConfig = field(default_factory=CoBraModelConfig)
    loss: CoBraLossConfig = field(default_factory=CoBraLossConfig)
    cobra: CoBraMethodConfig = field(default_factory=CoBraMethodConfig)
    infer: CoBraInferConfig = field(default_factory=CoBraInferConfig)
