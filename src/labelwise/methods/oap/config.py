"""Config of ``oap`` (``BaseConfig`` + ``model`` / ``loss`` / ``oap`` / ``pooling`` / ``infer``).

Defaults are the paper's COCO settings (``docs/release-settings.md``: ViT-B/8 DINO, 448 px,
50 semantic + 150 instance queries, K = 512, Mask2Former decoder with 9 layers, teacher momentum
cosine 0.996 -> 1); the ``coco`` and ``cpu`` presets override them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labelwise.config import param
from labelwise.engine.config import BaseConfig, InferConfig
from labelwise.errors import LabelwiseError
from labelwise.pseudo.oap.pooling import OAPConfig


@dataclass
class OAPModelConfig:
    backbone: str = param("dino_vitb8", help="encoder: a ViT (wrapped in ViT-Adapter, OAP Sec. 4.3) or a CNN "
                                             "(its feature map at model.key_stride replaces the keys)")
    pretrained: bool = param(True, help="load the backbone's pretrained weights (the local hub cache, else downloaded as timm does)")
    weights: str | None = param(None, path=True, help="path to a backbone checkpoint (overrides pretrained)")
    timm_kwargs: dict = param(default_factory=dict, help="extra timm constructor arguments (e.g. a small ViT)")
    adapter: bool = param(True, help="ViT only: ViT-Adapter multi-scale branch with zero-initialised injectors "
                                     "(OAP Sec. 4.3); false = the ViT's parameter-free pyramid (its last tokens resampled to "
                                     "strides 4-32), keys of the last block")
    adapter_heads: int = param(6, range=(1, None), help="ViT-Adapter deformable attention heads")
    key_stride: int = param(8, range=(1, None), help="CNN only: stride of the feature map OAP pools as keys")
    conv_dim: int = param(256, range=(8, None), help="pixel decoder width (Mask2Former: 256)")
    mask_dim: int = param(256, range=(8, None), help="mask embedding width (Mask2Former: 256)")
    hidden_dim: int = param(256, range=(8, None), help="transformer decoder width (Mask2Former: 256)")
    pixel_layers: int = param(6, range=(1, None), help="deformable encoder layers of the pixel decoder (6)")
    pixel_heads: int = param(8, range=(1, None), help="pixel decoder deformable attention heads (8)")
    pixel_ffn: int = param(1024, range=(8, None), help="pixel decoder FFN width (1024)")
    dec_layers: int = param(9, range=(1, None), help="masked-attention decoder layers (OAP / Mask2Former: 9)")
    nheads: int = param(8, range=(1, None), help="decoder attention heads (8)")
    dim_feedforward: int = param(2048, range=(8, None), help="decoder FFN width (2048)")
    num_semantic_queries: int = param(50, range=(0, None), help="[SEM] queries (OAP: 50)")
    num_instance_queries: int = param(150, range=(0, None), help="[INS] queries (OAP: 150)")
    out_dim: int = param(512, range=(2, None), help="K of the DINO head = number of clusters (OAP: 512)")
    head_hidden: int = param(2048, range=(8, None), help="DINO head MLP hidden width (2048)")
    head_bottleneck: int = param(256, range=(8, None), help="DINO head bottleneck (input of the weight-normed layer)")
    teacher_features: str = param("mask", choices=("mask",),
                                  help="per-token features voted by Eq. 6 into teacher query embeddings: the "
                                       "teacher's own mask features (pixel decoder output, mask_dim) pooled to the "
                                       "key grid (design decision, see the package doc)")
    teacher_embed_norm: bool = param(True, help="pass the voted teacher embeddings through the teacher decoder's "
                                                "final LayerNorm, as the student's queries are (design decision)")

    def validate(self) -> None:
        if self.mask_dim != self.hidden_dim:
            raise LabelwiseError(f"config keys 'model.mask_dim' ({self.mask_dim}) and 'model.hidden_dim' "
                                 f"({self.hidden_dim}) must be equal: the teacher's query embeddings are voted "
                                 "from the mask features and go through the DINO head of the queries")
        if self.num_semantic_queries + self.num_instance_queries < 1:
            raise LabelwiseError("config keys 'model.num_semantic_queries' + 'model.num_instance_queries' must be >= 1")


@dataclass
class OAPLossConfig:
    mask: float = param(5.0, range=(0.0, None), help="BCE weight of the mask loss (Mask2Former: 5.0)")
    dice: float = param(5.0, range=(0.0, None), help="Dice weight of the mask loss (Mask2Former: 5.0)")
    distill: float = param(1.0, range=(0.0, None), help="query-wise self-distillation weight (Eq. 7)")
    objectness: float = param(2.0, range=(0.0, None),
                              help="weight of Mask2Former's class loss, here one 'object' class + no-object: a "
                                   "query matched to a teacher mask is an object, an unmatched one is not "
                                   "(Mask2Former: 2.0; the paper keeps Mask2Former's official setting, and the "
                                   "categories come from the DINO codes). Its probability ranks the masks at "
                                   "inference; 0 = no class head (masks ranked by mask score alone)")
    no_object: float = param(0.1, range=(0.0, 1.0), help="class weight of no-object (Mask2Former eos_coef 0.1)")
    num_points: int = param(12544, range=(1, None), help="importance-sampled points per mask (Mask2Former 12544)")
    oversample: float = param(3.0, range=(1.0, None), help="point oversampling ratio (3.0)")
    importance: float = param(0.75, range=(0.0, 1.0), help="importance sample ratio (0.75)")
    match_points: int = param(12544, range=(1, None), help="shared random points of the Dice matching cost")
    deep_supervision: bool = param(True, help="match and apply the mask losses at every decoder layer "
                                              "(Mask2Former's aux outputs)")
    teacher_temp: float = param(0.04, range=(1e-4, None), help="teacher sharpening temperature (DINO)")
    student_temp: float = param(0.1, range=(1e-4, None), help="student temperature (DINO)")
    center_momentum: float = param(0.9, range=(0.0, 1.0), help="centre EMA momentum (DINO)")
    freeze_last_layer_epochs: int = param(1, range=(0, None), help="DINO head last layer frozen this many epochs")
    distill_reduction: str = param("mean", choices=("mean", "sum"),
                                   help="Eq. 7 over matched pairs: mean (scale-free) or sum (literal)")


@dataclass
class OAPMethodConfig:
    global_size: int = param(448, range=(16, None), help="side of the teacher's global view (OAP: 448)")
    global_scale: list[float] = param([0.4, 1.0], range=(0.01, 1.0), help="area range of the global crop")
    local_size: int = param(224, range=(16, None), help="side of each student local view")
    local_scale: list[float] = param([0.05, 0.4], range=(0.01, 1.0),
                                     help="area range of the local crops, relative to the global view (OAP: 0.05-0.4)")
    n_local: int = param(2, range=(1, None), help="local views per image")
    student_global: bool = param(False, help="the student also sees the teacher's global view (DINO's multi-crop, "
                                             "whose student sees global and local views) and matches its uncropped "
                                             "masks; the paper's student sees the local views only")
    teacher_momentum: float = param(0.996, range=(0.0, 1.0), help="EMA momentum at step 0 (cosine to 1.0)")
    momentum_schedule: str = param("cosine", choices=("cosine", "constant"), help="teacher momentum schedule")
    levels: list[str] = param(["semantic", "instance"], choices=("semantic", "instance"),
                              help="pseudo-mask levels used as targets")
    targets: str = param("oap", choices=("oap", "ground_truth"),
                         help="where the teacher's masks come from: 'oap' (the method: OAP on the teacher's keys) "
                              "or 'ground_truth' -- a diagnostic control, not the method: the dataset's instance "
                              "masks (instance level) and class regions (semantic level) of the global view replace "
                              "OAP's, everything else unchanged (Eq. 6 teacher codes, cropped matching, losses), to "
                              "tell whether the student side learns when its targets are good (needs coco: data)")
    max_targets: int = param(0, range=(0, None), help="keep at most this many teacher masks per image and level, "
                                                      "best score first (0 = all)")

    def validate(self) -> None:
        if len(self.global_scale) != 2 or len(self.local_scale) != 2:
            raise LabelwiseError("config keys 'oap.global_scale' and 'oap.local_scale' are [min, max] pairs")
        if not self.levels:
            raise LabelwiseError("config key 'oap.levels' needs at least one level")


@dataclass
class OAPInferConfig(InferConfig):
    size: int = param(0, range=(0, None), help="resize inputs to size x size (0 = oap.global_size)")
    score_threshold: float = param(0.0, range=(0.0, 1.0), help="drop predicted masks below this score")
    model: str = param("teacher", choices=("teacher", "student"),
                       help="--what universal: the network that predicts -- the final EMA teacher with its decoder "
                            "(the paper) or the student's own weights (the checkpoint's model)")
    teacher: str = param("final", choices=("final", "initial"),
                         help="--what pseudo: whose OAP pseudo-masks -- the run's final EMA teacher, or the "
                              "initial one (the pretrained encoder before any training: the raw pseudo-masks the "
                              "run started from; needs the backbone's pretrained weights)")


@dataclass
class OAPTrainConfig(BaseConfig):
    model: OAPModelConfig = field(default_factory=OAPModelConfig)
    loss: OAPLossConfig = field(default_factory=OAPLossConfig)
    oap: OAPMethodConfig = field(default_factory=OAPMethodConfig)
    pooling: OAPConfig = field(default_factory=OAPConfig)
    infer: OAPInferConfig = field(default_factory=OAPInferConfig)
