"""CoBra: "Complementary Branch Fusing Class and Semantic Knowledge for Robust Weakly Supervised
Semantic Segmentation" (Han et al.), WSSS from image-level tags with a CNN and a ViT branch.
Paper: Han et al., arXiv:2403.08801 (``docs/release-settings.md``).

Read in the paper's order:

==========================================  ====================================================
paper                                       code
==========================================  ====================================================
Sec. 3.2 CAK branch: CNN CAMs M_cnn, GAP    ``model.ClassAwareBranch`` (``cam_head``; ResNet-50 at
                                            output stride 16, frozen BN: ``model.cnn*``)
Sec. 3.2 CAK 2: pseudo labels (class-wise   ``losses.cnn_pseudo_labels``
softmax, argmax)
Sec. 3.2 CAK 3 / SAK 2: f_proj -> v^c, v^s  ``ClassAwareBranch.proj`` / ``SemanticAwareBranch.proj``
                                            (linear 1x1, L2-normalised, ``model.embed_dim`` = 256)
Sec. 3.2 SAK: ViT CAMs (TS-CAM conv head)   ``model.SemanticAwareBranch`` (``cam_head``, DeiT-S/16)
Sec. 3.2 SAK 3: patch affinity P            ``SemanticAwareBranch.forward`` ``affinity``: attention
                                            averaged over heads, summed over layers, A[1:, 1:]
Sec. 3.3.1: L_cls = L_cls-cnn + L_cls-tran  ``losses.cls_loss`` (multi-label soft margin, as released)
Sec. 3.3.1: L_cam (L1 + positive classes)   ``losses.cam_loss`` (``cobra.l_cam``, from
                                            ``loss.cam_start_epoch``; ``loss.cam_form``)
Eq. 1: L_cap (positives / negatives: top /  ``losses.cap_loss`` (``cobra.l_cap``, ``loss.k_cap_pos``,
bottom ViT patch affinity)                  ``loss.k_cap_neg``, ``loss.tau``)
Eq. 2: L_sap (positives / negatives: top /  ``losses.sap_loss`` (``cobra.l_sap``, ``loss.k_sap_pos``,
bottom CNN pseudo-label patches)            ``loss.k_sap_neg``)
Eq. 3 / 4: L_total, lambda_1, lambda_2      ``method.CoBraMethod.training_step`` (``loss.lambda1``,
                                            ``loss.lambda2``; CAP / SAP from
                                            ``loss.contrast_start_epoch``)
Sec. 3.4: A_obj, M_tran (x) A_obj           ``method.seed_maps`` (TS-CAM coupling per scale)
Sec. 3.4 / Table 5: M_fuse and the other    ``losses.fuse_seeds`` (``infer.source``: cnn, vit, fuse,
sources                                     mean, max)
Supp. Sec. 10: 7 scales 0.5..2.0 + flip     ``infer.scales``, ``infer.flip``
Supp. Secs. 9.1 / 11: background threshold  ``losses.attention_bg_threshold`` (``infer.bg_quantile``,
from the semantic-agnostic attention        ``infer.bg_attention_norm``, ``infer.bg_snap``); written
                                            into each seeds npz as ``bg_threshold`` for IRN's IR labels
                                            (``irn.thresholds=seeds``: conf_bg, conf_fg = + 0.5)
Sec. 3.4: denseCRF masks                    ``--what masks`` (``infer.crf``, ``infer.crf_gt_prob``)
Sec. 4.1 / Supp. 9: IRN masks               the ``irn`` method (``labelwise train irn --seeds
                                            --set irn.thresholds=seeds``: IR-label thresholds from the
                                            seeds' ``bg_threshold``)
Sec. 4 / Table 2: DeepLabV3+ on the masks   the ``segmenter`` method (``labelwise train segmenter
                                            --labels``)
==========================================  ====================================================

Ablation switches: Table 3 = ``cobra.cnn``, ``cobra.vit`` (single-branch rows set the three
losses off), ``cobra.l_cam``, ``cobra.l_cap``, ``cobra.l_sap``; Table 4 / 10 = the four k's;
Table 5 = ``infer.source``; Table 11 = ``model.embed_dim``; Table 12 = ``loss.lambda2``.
``recipes/cobra-ablation.yaml`` runs Table 3 and Table 5; ``recipes/cobra.yaml`` the pipeline.

Where the paper is loose and what was chosen (each is config):

* Eq. 3 sums L_cap^i / L_sap^i over target patches; ``loss.patch_reduction`` = ``mean`` (default)
  averages them so lambda_2 = 0.1 does not depend on the token count; ``sum`` is the literal form
  (per image).
* L_cam (``loss.cam_form``): both L1 terms are mean absolute differences on the ViT grid (the CNN
  map resized to it when the grids differ), the first averaged over all K classes, the second
  over the image's positive classes. The default, ``localisation``, compares the maps the seeds
  are made of: each CAM ReLU'd and max-normalised per image and class, the absent classes' maps
  set to zero in both branches -- so the first term is the positive classes' differences summed
  and divided by K, and the loss ties the two branches' shapes, not their scales. ``raw``
  compares the raw CAMs (no ReLU, no normalisation, every class in the first term): the paper's
  reading, a plain L1 of M_cnn - M_tran plus the positive-class term. The release
  (``step/train_cam.py``) is neither: it adds only the first term, the mean absolute difference
  of the raw CAMs (its background channel included, at 224 x 224), with the positive-class term
  commented out, from epoch 5.
* L_sap's P^+ of class c: the k_sap^+ patches whose pseudo label is c with the highest probability
  of c; P^- : the k_sap^- other patches with the lowest probability of c (the pseudo labels have
  no background, so in a single-class image no patch is labelled otherwise). L_cap's
  P_i^+ / P_i^-: top / bottom of row i of the patch affinity, i itself excluded.
* k defaults: k_sap^+ = 20, k_sap^- = 5, k_cap^+ = 5, k_cap^- = 20, the best cell of Tables 4 / 10
  as the text states it. The release ranks the contrast it calls CAP by the CNN CAM and SAP by the
  ViT affinity (docs/release-settings.md): the same two one-way flows under swapped names.
* The attention-derived background (supplement Secs. 9.1 / 11). Sec. 9.1 uses it for one thing:
  the thresholds of IRN's IR labels ("we utilized this approach to set the background and
  foreground thresholds for training IRNet"), background from the semantic-agnostic attention
  map with "a certain weight", foreground about 0.5 above. The weight is "determined similarly to
  conventional threshold-setting methods", i.e. searched; the release takes the 93rd percentile of
  the raw summed attention, found on VOC train ground truth. Here: a quantile of the map
  (``infer.bg_quantile``) on a chosen scale (``infer.bg_attention_norm``: raw = the release, used
  by the voc / coco presets), snapped to 0.05, written into the seeds as ``bg_threshold``; IRN
  reads it with ``irn.thresholds=seeds``. Raw attention has no fixed scale on another ViT, so
  the cpu preset reads the max-normalised map, its quantile chosen on a development testbed seed
  that is never reported (``bench/cobra_bg_rule.py``). The seeds' *masks* (the seed mIoU of Tables
  3 / 5) are thresholded at the fixed ``infer.bg_threshold`` (``infer.bg_source=attention`` uses
  each image's attention threshold instead: on the development testbed it cost 0.2 mIoU, the
  per-image values carry noise, not the object's extent). A CNN-only run has no attention map and
  writes no ``bg_threshold``.
* The CoBra step (Sec. 3.3.1) says "softmax losses" for L_cls; the release (and this code) uses the
  multi-label soft margin.
"""

from labelwise.engine.registry import register_method
from labelwise.methods.cobra.config import CoBraConfig
from labelwise.methods.cobra.method import CoBraMethod
from labelwise.methods.cobra.model import ClassAwareBranch, CoBraNet, SemanticAwareBranch

register_method(CoBraMethod)

__all__ = ["CoBraConfig", "CoBraMethod", "CoBraNet", "ClassAwareBranch", "SemanticAwareBranch"]
