"""Config of the ``irn`` refiner: ``model`` / ``irn`` (IR labels) / ``loss`` / ``infer``.

Defaults are the authors' release (``jiwoon-ahn/irn``: ``run_sample.py``, ``step/train_irn.py``,
``step/cam_to_ir_label.py``, ``step/make_sem_seg_labels.py``); the ``voc`` / ``coco``
presets repeat them with the schedule, the ``cpu`` preset scales them down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError


@dataclass
class IRNModelConfig:
    backbone: str = param("resnet50", help="CNN backbone alias or timm name (frozen: only the branches train)")
    pretrained: bool = param(True, help="load the backbone's pretrained weights (the local hub cache, else downloaded as timm does)")
    weights: str | None = param(None, path=True, help="path to a backbone checkpoint (overrides pretrained)")
    feature_strides: list[int] = param([4, 8, 16], choices=(4, 8, 16, 32),
                                       help="backbone levels the branches read (with output_stride 16 a ResNet "
                                            "gives layer1..layer4 at 4, 8, 16, 16)")
    output_stride: int = param(16, choices=(0, 8, 16, 32),
                               help="backbone output stride (16 = the release's ResNet strides (2,2,2,1); "
                                    "0 = the backbone's own)")
    stem: bool = param(True, help="add the first stage (stride 2) max-pooled to stride 4 as a level "
                                  "(the release's stage1 = conv1+bn+relu+maxpool)")
    edge_channels: int = param(32, range=(1, None), help="boundary branch: channels per level (release 32)")
    disp_fine_channels: list[int] = param([64, 128], range=(1, None),
                                          help="displacement branch: widths of the stride-4 levels (release 64, 128)")
    disp_channels: int = param(256, range=(1, None), help="displacement branch: width of the coarse levels (256)")
    disp_lr_mult: float = param(10.0, range=(0.0, None),
                                help="lr multiplier of the displacement branch (release: 10x, lr 1.0)")

    def validate(self) -> None:
        if 4 not in self.feature_strides or 8 not in self.feature_strides:
            raise LabelwiseError("config key 'model.feature_strides' must include 4 and 8 (the branches work at "
                                 f"stride 4 and fuse the coarse levels at 8), got {list(self.feature_strides)}")


@dataclass
class IRLabelConfig:
    """IR labels (IRN Sec. 3.1 / ``cam_to_ir_label.py``): what the branches learn from."""

    thresholds: str = param("fixed", choices=("fixed", "seeds"),
                            help="fixed: conf_fg / conf_bg for every image (the release); seeds: a seeds file "
                                 "holding 'bg_threshold' (CoBra's attention-derived value per image) sets "
                                 "conf_bg = bg_threshold, conf_fg = bg_threshold + fg_gap (CoBra supplement "
                                 "Sec. 9.1), files without one use conf_fg / conf_bg")
    conf_fg: float = param(0.30, range=(0.0, 1.0), help="confident foreground: CAM above this (release 0.30)")
    conf_bg: float = param(0.05, range=(0.0, 1.0), help="confident background: every CAM below this (release 0.05)")
    fg_gap: float = param(0.5, range=(0.0, 1.0),
                          help="thresholds seeds: conf_fg = bg_threshold + this (CoBra supplement Sec. 9.1: "
                               "'an approximate gap of 0.5')")
    max_conf_fg: float = param(0.9, range=(0.0, 1.0),
                               help="thresholds seeds: conf_fg is capped here (and conf_bg below it by fg_gap) so a "
                                    "max-normalised CAM always keeps confident foreground: with conf_fg >= 1 no "
                                    "pixel could be foreground and the object would be labelled background")
    ir_crf: bool = param(True, help="refine both confident maps with a label dense CRF over the image's classes "
                                    "(the release; needs pydensecrf2 -- training stops without it: without the "
                                    "CRF the labels keep 0.7-70 %% of the boundary pairs, set false only knowingly)")
    crf_gt_prob: float = param(0.7, range=(0.01, 0.99), help="CRF unary confidence of the CAM label (release 0.7)")

    def validate(self) -> None:
        if self.conf_bg > self.conf_fg:
            raise LabelwiseError(f"config keys 'irn.conf_bg' ({self.conf_bg}) > 'irn.conf_fg' ({self.conf_fg}); "
                                 "the background threshold must not exceed the foreground one")


@dataclass
class IRNLossConfig:
    radius: int = param(10, range=(2, 64), help="training pairs: |x_i - x_j| < radius on the stride-4 grid "
                                                "(IRN Eq. 3; release 10 at 512 px crops)")
    aff_weight: float = param(0.5, range=(0.0, None),
                              help="weight of L_B (boundary/affinity loss): the release's total is "
                                   "0.5 L_B + 0.25 (L_D^fg + L_D^bg); the paper's Eq. 9 sum is aff 1, disp 1")
    disp_weight: float = param(0.25, range=(0.0, None),
                               help="weight of L_D^fg + L_D^bg (release 0.25: it halves the sum and averages the "
                                    "L1 over the two coordinates; see aff_weight)")


@dataclass
class IRNInferConfig(InferConfig):
    beta: float = param(10.0, range=(0.0, None), help="affinity power of the transition matrix (IRN Eq. 11)")
    exp_times: int | None = param(None, range=(0, 16),
                                  help="random walk of 2^exp_times steps (IRN Eq. 12); null = the release's reach "
                                       "relative to the image: 2^8 steps on VOC's mean 125 x 94 stride-4 grid, scaled "
                                       "with the grid's area (a walk's reach grows with the square root of its "
                                       "steps): round(log2(256 h w / walk_reference_cells)) -- 5 on a 40 x 40 grid")
    walk_reference_cells: int = param(11750, range=(1, None),
                                      help="exp_times null: the stride-4 grid area at which the walk takes the "
                                           "release's 2^8 steps (VOC 2012's mean image, 500 x 375 px -> 125 x 94)")
    radius: int = param(5, range=(2, 32), help="pair radius of the random walk's affinities (release 5)")
    sem_seg_bg: float = param(0.25, range=(0.0, 1.0),
                              help="background level padded before the argmax of the walked maps (release 0.25)")
    walk_bg: str = param("fixed", choices=("fixed", "seeds"),
                         help="fixed: infer.sem_seg_bg (the release); seeds: a seeds file's bg_threshold (a CAM-scale "
                              "threshold on the walked maps' scale: measured 0.13-0.21 mIoU below fixed with CoBra's "
                              "0.05-0.95 attention thresholds)")
    flip: bool = param(True, help="average the boundary logits of the horizontally flipped input (release)")
    rw_mode: str = param("square", choices=("square", "iterate"),
                         help="square: T^(2^t) by repeated squaring of the dense matrix (the release); iterate: "
                              "2^t products of the CAMs with T (same result, K N^2 per step instead of N^3)")
    rw_memory_gib: float = param(4.0, range=(0.01, None),
                                 help="images of one batch whose dense walks fit in this are walked together")
    crf: bool = param(False, help="refine the final masks with a label dense CRF over the image's classes")
    crf_gt_prob: float = param(0.7, range=(0.01, 0.99), help="CRF unary confidence of the mask label")


@dataclass
class IRNConfig(BaseConfig):
    model: IRNModelConfig = field(default_factory=IRNModelConfig)
    irn: IRLabelConfig = field(default_factory=IRLabelConfig)
    loss: IRNLossConfig = field(default_factory=IRNLossConfig)
    infer: IRNInferConfig = field(default_factory=IRNInferConfig)
