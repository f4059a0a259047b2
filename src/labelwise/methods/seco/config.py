"""Config of ``seco`` (``BaseConfig`` + ``model`` / ``loss`` / ``seco`` / ``infer``).

Defaults are the paper's VOC settings and, where the paper is silent, the authors' release
(``docs/release-settings.md``); the ``voc``, ``coco`` and ``cpu`` presets override them.
The three ablation switches of Table 2 are ``seco.lig``, ``seco.lil`` and ``seco.rectify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError


@dataclass
class SeCoModelConfig:
    backbone: str = param("vit_base_patch16", help="ViT with a class token (alias or timm name)")
    pretrained: bool = param(True, help="load the backbone's pretrained weights (the local hub cache, else downloaded as timm does)")
    weights: str | None = param(None, path=True, help="path to a backbone checkpoint (overrides pretrained)")
    timm_kwargs: dict = param(default_factory=dict,
                              help="extra timm constructor arguments, e.g. {depth: 6, embed_dim: 192, num_heads: 3, "
                                   "patch_size: 8} for a small from-scratch ViT")
    aux_layer: int = param(-3, help="block whose output feeds the auxiliary classifier (SeCo Eq. 1: lambda)")
    proj_hidden: int = param(2048, range=(1, None), help="projection MLP hidden width (DINO-style)")
    proj_layers: int = param(3, range=(1, None), help="projection MLP layers")
    decoder_rates: list[int] = param([6, 12, 18, 24], range=(1, None),
                                     help="dilations of the four parallel 3x3 convs of the segmentation head "
                                          "(summed, DeepLab-v2 classifier as released)")
    freeze_pos_embed: bool = param(False, help="keep the position embedding fixed (the release freezes it)")


@dataclass
class SeCoLossConfig:
    cls: float = param(1.0, range=(0.0, None), help="L_cls weight (SeCo Eq. 9)")
    cls_aux: float = param(1.0, range=(0.0, None), help="L_cls^aux weight (SeCo Eq. 9)")
    ptc: float = param(0.3, range=(0.0, None), help="ToCo patch token contrast weight (Sec. 3.6 regulariser)")
    lig: float = param(0.5, range=(0.0, None), help="alpha: L_LiG weight (SeCo Eq. 9)")
    lil: float = param(0.5, range=(0.0, None), help="beta: L_LiL weight (SeCo Eq. 9)")
    seg: float = param(0.12, range=(0.0, None), help="gamma: L_seg weight (Sec. 3.6)")
    reg: float = param(2.66, range=(0.0, None),
                       help="dense CRF energy regulariser weight (Sec. 3.6), on the energy divided by "
                            "pixels x spatial kernel mass; 2.66 = the release's 0.05 x 1e-7 at its 224 x 224 grid")
    tau_lig: float = param(0.1, range=(1e-4, None), help="tau_g of Eq. 4")
    tau_lil: float = param(0.08, range=(1e-4, None), help="tau_l of Eq. 8")
    lil_form: str = param("release", choices=("paper", "release"),
                          help="normalisation of L_LiL: the release's (1/(anchors x N+), log-denominator once per "
                               "candidate), with which beta 0.5 was chosen and the published numbers made, or Eq. 8 "
                               "to the letter (1/N_l^+ over positive pairs: 7-20x stronger at equal beta; "
                               "bench/seco_loss_strength.md)")
    reg_sigma_rgb: float = param(15.0, range=(1e-3, None), help="energy kernel colour sigma (0..255 units)")
    reg_sigma_xy: float = param(100.0, range=(1e-3, None), help="energy kernel spatial sigma (input pixels)")
    reg_scale: float = param(0.25, range=(0.01, 1.0),
                             help="resolution of the energy (exact dense kernel; the release uses 0.5 with a "
                                  "permutohedral-lattice approximation)")
    stage_contrast: int = param(1000, range=(0, None), help="step from which LiG and LiL are on (release: 1000)")
    stage_seg: int = param(2000, range=(0, None), help="step from which the segmentation and energy losses are on")


@dataclass
class SeCoMethodConfig:
    """The method's own components and their switches (Table 2 rows)."""

    lig: bool = param(True, help="Table 2 'LiG': global teacher prototypes and L_LiG (Sec. 3.4)")
    lil: bool = param(True, help="Table 2 'LiL': local teacher reservoir with tags and L_LiL (Sec. 3.5)")
    rectify: bool = param(True, help="Table 2 'Tag Rec.': similarity-based tag rectification (Eqs. 6-7)")
    n_local: int = param(10, range=(1, None), help="local crops per image (paper: 12 patches = 2 global + 10 local)")
    local_size: int = param(64, range=(8, None), help="local crop side in pixels")
    global_size: int = param(0, range=(0, None), help="side the two global views are resized to (0 = crop size)")
    phi: float = param(0.2, range=(0.0, 1.0), help="proportion threshold phi of the tag rule (Sec. 3.3)")
    fill_single_class: bool = param(True, help="uncertain pixels of a single-class image count as that class when "
                                               "tagging crops (as released)")
    reservoir: int = param(4608, range=(1, None), help="reservoir capacity N (Eq. 5)")
    sigma: float = param(0.6, range=(0.0, 1.0),
                         help="sigma of Eq. 7: rectify an anchor when more than this fraction of its positives "
                              "lie below their mean similarity (the paper gives no value; see the package doc)")
    teacher_momentum: float = param(0.999, range=(0.0, 1.0), help="EMA momentum of the local teacher")
    proto_momentum: float = param(0.9, range=(0.0, 1.0), help="eta of Eq. 3")
    proto_start: int = param(600, range=(0, None), help="step from which prototypes are updated (release: 600)")
    proto_update: str = param("adaptive", choices=("adaptive", "single"),
                              help="Eq. 3: adaptive = multi-class images with softmax-similarity weights W_l and "
                                   "single-class images with W = 1; single = single-class images only (release)")
    lig_negatives: str = param("batch", choices=("image", "batch"),
                               help="prototypes P_s in the denominator of Eq. 4: every category that appears in the "
                                    "batch (release) or only the anchor image's own categories, which leaves an "
                                    "anchor of a single-class image no negative (loss log 1 = 0)")
    cam_scales: list[float] = param([1.0, 0.5, 0.75, 1.5], range=(0.05, 8.0),
                                    help="scales of the online CAMs that give pseudo labels and tags (+ flip)")
    cam_flip: str = param("max", choices=("sum", "max"),
                          help="how the online CAMs combine an image with its flip (release: max)")
    cam_norm: str = param("minmax", choices=("max", "minmax"),
                          help="normalisation of the online CAMs per class (release: min-max)")
    roi_switch: int = param(10000, range=(0, None), help="step from which crops and tags come from the final CAM "
                                                         "instead of the auxiliary one (release: 10000)")
    bg_threshold: float = param(0.5, range=(0.0, 1.0), help="background threshold of the CAM")
    high: float = param(0.7, range=(0.0, 1.0), help="above: confident foreground (pseudo labels, tags)")
    low: float = param(0.25, range=(0.0, 1.0), help="at or below: confident background; between: uncertain")
    par_iters: int = param(10, range=(0, None), help="PAR refinement iterations of the pseudo labels")
    par_size: int = param(224, range=(8, None), help="side of the image PAR refines the pseudo labels at")

    def validate(self) -> None:
        if not self.low < self.high:
            raise LabelwiseError(f"config keys 'seco.low' ({self.low}) and 'seco.high' ({self.high}) must satisfy "
                                 "low < high")
        if not self.cam_scales:
            raise LabelwiseError("config key 'seco.cam_scales' is empty; give at least one scale, e.g. [1.0]")


@dataclass
class SeCoInferConfig(InferConfig):
    """Defaults are the paper's columns as the release computes them (``tools/infer_cam.py``):
    ``seeds`` = the CAM column (single scale, flip-max, min-max normalised), ``masks`` = the Mask
    column (the same CAM over 7 scales, no PAR), both cut at ``bg_threshold``."""

    cam_scales: list[float] = param([1.0], range=(0.05, 8.0),
                                    help="scales of the CAM seeds (+ flip); the paper's CAM column is single-scale")
    mask_scales: list[float] = param([1.0, 0.5, 0.75, 1.25, 1.5, 1.75, 2.0], range=(0.05, 8.0),
                                     help="scales of the CAM behind the masks (+ flip); the paper's Mask column is "
                                          "this 7-scale CAM")
    cam_flip: str = param("max", choices=("sum", "max"), help="how seeds and masks combine an image with its flip")
    cam_norm: str = param("minmax", choices=("max", "minmax"), help="per-class normalisation of seeds and masks")
    mask_refine: str = param("none", choices=("none", "par"),
                             help="masks: the multi-scale CAM cut at bg_threshold (none, the paper's Mask column) "
                                  "or refined by PAR against it (par)")
    seg_scales: list[float] = param([1.0, 1.25, 1.5], range=(0.05, 8.0), help="segmentation scales (+ flip)")
    size: int = param(0, range=(0, None), help="resize inputs to size x size first (0 = the training crop size)")
    bg_threshold: float = param(0.5, range=(0.0, 1.0), help="background threshold of seeds and masks")
    crf: bool = param(False, help="dense CRF on the segmentation (the paper's val numbers use it)")

    def validate(self) -> None:
        for key in ("cam_scales", "mask_scales", "seg_scales"):
            if not getattr(self, key):
                raise LabelwiseError(f"config key 'infer.{key}' is empty; give at least one scale, e.g. [1.0]")


@dataclass
class SeCoConfig(BaseConfig):
    model: SeCoModelConfig = field(default_factory=SeCoModelConfig)
    loss: SeCoLossConfig = field(default_factory=SeCoLossConfig)
    seco: SeCoMethodConfig = field(default_factory=SeCoMethodConfig)
    infer: SeCoInferConfig = field(default_factory=SeCoInferConfig)
