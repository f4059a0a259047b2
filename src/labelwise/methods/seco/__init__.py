"""SeCo: "Separate and Conquer: Decoupling Co-occurrence via Decomposition and Representation
for Weakly Supervised Semantic Segmentation" (Yang et al., CVPR 2024), single-stage WSSS from
image-level tags. Paper: Yang et al., CVPR 2024, arXiv:2402.18467 (``docs/release-settings.md``).

Read in the paper's order:

=========================================  ====================================================
paper                                      code
=========================================  ====================================================
Sec. 3.3, Eq. 1: CAM_aux from block lambda  ``model.SeCoNet`` (``aux_classifier`` on block
                                           ``model.aux_layer`` = -3), ``method.online_cams``
Sec. 3.3: category tags with phi            ``decompose.roi_mask``, ``decompose.crop_tags``,
                                           ``decompose.global_tags`` (``seco.phi``)
Sec. 3.3: crops, query / key views          ``decompose.sample_crop_boxes`` (centres on uncertain
                                           pixels), ``decompose.extract_crops``,
                                           ``decompose.strong_augment`` (key views)
Eq. 2: q = O_q(g_q(x)), k = O_k(g_k(x))     ``model.PatchEmbedder`` (student) and its EMA copy
                                           (the local teacher, ``seco.teacher_momentum``)
Sec. 3.4, Eq. 3: prototype update           ``losses.update_prototypes`` (``seco.proto_update``)
Eq. 4: L_LiG                                ``losses.lig_loss`` (``seco.lig``, ``loss.lig`` = alpha,
                                           ``loss.tau_lig``, ``seco.lig_negatives``)
Sec. 3.5, Eq. 5: reservoir + tag pool       ``method.SeCoState.queue`` (``seco.reservoir``),
                                           enqueued in ``SeCoMethod.after_optimizer_step``
Eqs. 6-7: tag rectification                 ``losses.rectify_tags`` (``seco.rectify``, ``seco.sigma``)
Eq. 8: L_LiL                                ``losses.lil_loss`` (``seco.lil``, ``loss.lil`` = beta,
                                           ``loss.tau_lil``)
Eq. 9 + gamma L_seg                         ``SeCoMethod.training_step`` (``loss.cls``,
                                           ``loss.cls_aux``, ``loss.seg`` = gamma),
                                           ``losses.seg_loss``
Sec. 3.6 regularisers (ToCo / AFA)          ``losses.ptc_loss`` (patch token contrast guided by
                                           the aux CAM, ``loss.ptc``) and
                                           ``labelwise.blocks.energy.dense_crf_loss`` (``loss.reg``)
segmentation head, online pseudo labels     ``DeepLabV2Classifier`` (four 3x3 convs, rates 6/12/
                                           18/24), ``labelwise.blocks.par`` (PAR refinement)
=========================================  ====================================================

Ablation (Table 2): ``seco.lig``, ``seco.lil``, ``seco.rectify``; all false is the baseline row
(same encoder, heads, PTC and energy regularisers, segmentation branch and budget, without the
decomposition, prototypes, reservoir or rectification). ``recipes/seco-ablation.yaml`` runs the
five rows.

Where the paper is silent or differs from the authors' release (``docs/release-settings.md``):

* staging by step (release): cls + cls_aux + ptc from the start, + LiG/LiL from
  ``loss.stage_contrast``, + seg/reg from ``loss.stage_seg``; prototypes from ``seco.proto_start``;
  crops and tags from the aux CAM until ``seco.roi_switch``, then from the final CAM;
* the tag rule uses the pixel *proportion* of Sec. 3.3 (the release sums class ids); an image
  without a confident class gets the uncertain global tag -1 (the release tags it class 1);
* key views are the same crops as the query views, strongly augmented (the release flips the
  whole key image independently, misaligning half of the crops);
* rectification follows Eqs. 6-7 over the anchor's positives in the reservoir; the paper gives
  no sigma, the release's rule (a 10:1 ratio counted over *all* reservoir entries) almost never
  fires. ``seco.sigma`` = 0.6 flags anchors for which most positives lie below their mean
  similarity (a right-skewed positive similarity distribution), with a margin over the 0.5 of a
  symmetric one. Rectified tags become -1 (Eq. 7; the release sets 0);
* Eq. 3 weights multi-class images by the softmax of their similarity to the prototypes and
  single-class images by 1 (``seco.proto_update=single``: single-class images only, as released);
* Eq. 4's P_s, "the knowledge with the appeared categories", is every category that appears in
  the batch (``seco.lig_negatives=batch``, as released). The narrower reading, the anchor image's
  own categories (``image``), leaves a patch of a single-class image without a negative (its term
  is log 1 = 0): measured, 0-3 of 64 anchors per batch had one. The log's ``lig_with_negative``
  is that share;
* Eq. 8 is normalised as released (``loss.lil_form=release``: 1/(anchors x N+), log-denominator
  once per candidate), the setting with which beta = 0.5 was chosen; Eq. 8 to the letter
  (``paper``: 1/N_l^+) pushes the encoder 7-20x harder at the same beta
  (``bench/seco_loss_strength.py``);
* online CAMs (tags, pseudo labels) and inference CAMs combine an image with its flip by max and
  normalise min-max, as released (``seco.cam_flip`` / ``seco.cam_norm``, ``infer.cam_flip`` /
  ``infer.cam_norm``). ``--what seeds`` is the paper's CAM column (single scale), ``--what masks``
  its Mask column (7 scales, cut at ``infer.bg_threshold``, no PAR; ``infer.mask_refine=par``);
* the CRF energy regulariser is computed exactly (dense Gaussian kernel) at ``loss.reg_scale``
  of the input instead of the release's compiled permutohedral lattice at 0.5;
* classification: global max pooling of the token features, then a bias-free 1x1 conv (release).
"""

from labelwise.engine.registry import register_method
from labelwise.methods.seco.config import SeCoConfig
from labelwise.methods.seco.method import SeCoMethod, SeCoState
from labelwise.methods.seco.model import PatchEmbedder, SeCoNet

register_method(SeCoMethod)

__all__ = ["SeCoConfig", "SeCoMethod", "SeCoNet", "SeCoState", "PatchEmbedder"]
