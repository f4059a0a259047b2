"""``irn``: IRN (Ahn, Cho & Kwak, CVPR 2019, "Weakly Supervised Learning of Instance
Segmentation with Inter-pixel Relations") as a refiner of any method's CAM seeds.

``labelwise train irn --data SPEC --seeds SEED_DIR --out RUN`` learns class boundaries
(and the displacement field) from *IR labels* made from the seeds;
``labelwise infer RUN --data SPEC --split S --out PRED --what masks[,seeds] [--seeds DIR]``
refines the seeds by a random walk over the boundary-derived affinities. Without
``--seeds``, inference on the run's training split reads the seeds the run was trained on.

Paper -> code (equation numbers of the CVPR paper; each symbol's docstring names its content)

=====================================================  ==========================================================
paper                                                  code
=====================================================  ==========================================================
Sec. 3.1 IR labels (confident fg / bg from CAMs +      ``method.ir_label`` (thresholds ``irn.conf_fg`` 0.30 /
dense CRF, ignore in between)                          ``irn.conf_bg`` 0.05, CRF ``irn.ir_crf``);
                                                       ``method.seed_thresholds`` (``irn.thresholds``);
                                                       ``method.ir_label_stats`` (logged every step)
Sec. 3.2 boundary detection branch                     ``modeling.irn.BoundaryBranch``
Sec. 3.2 displacement field branch                     ``modeling.irn.DisplacementBranch`` (+ ``MeanShift``)
frozen backbone, multi-level features                  ``modeling.irn.IRNet`` (``features``: detached, BN eval)
Eq. 2 inter-pixel affinity = 1 - path max of B         ``modeling.irn.path_max_affinity``
Eq. 3 pairs within radius gamma                        ``modeling.irn.path_index`` / ``pair_indices``
                                                       (``loss.radius`` 10 in training, ``infer.radius`` 5)
Eq. 4 P+_fg, P+_bg, P- from IR labels                  ``modeling.irn.pair_labels``
Eq. 5 L_B (pos. fg/bg halves + negatives)              ``losses.affinity_loss``
Eq. 6 delta(i, j) = D(x_i) - D(x_j)                    ``modeling.irn.pair_displacement``
Eqs. 7-8 L_D^fg, L_D^bg                                ``losses.displacement_loss``
Eq. 9 L = L_B + L_D^fg + L_D^bg                        ``losses.irn_losses`` (``loss.aff_weight`` 0.5 /
                                                       ``loss.disp_weight`` 0.25: the release; 1 / 1: Eq. 9)
Eq. 10 T = D^-1 A^beta                                 ``modeling.irn.dense_affinity`` + ``transition_matrix``
                                                       (``infer.beta`` 10)
Eq. 11 vec(M*) = T^t vec(M * (1 - B))                  ``modeling.irn.random_walk`` (t = 2^``infer.exp_times``;
                                                       null: ``method.walk_exp_times``, the release's 2^8 on
                                                       VOC grids scaled to the grid's area; ``infer.rw_mode``
                                                       square = the release)
Sec. 4.1 semantic masks (bg level, argmax)             ``method.IRNMethod.predict`` (``infer.sem_seg_bg`` 0.25)
=====================================================  ==========================================================

Switches: ``irn.ir_crf`` (CRF on the confident maps; training stops without pydensecrf2
unless it is set false), ``irn.thresholds`` (``fixed``: 0.30 / 0.05, the release; ``seeds``:
a seeds file's ``bg_threshold`` sets ``conf_bg`` and ``conf_fg = conf_bg + irn.fg_gap``,
capped at ``irn.max_conf_fg`` -- CoBra supplement Sec. 9.1), ``infer.walk_bg`` (``fixed``:
``infer.sem_seg_bg``; ``seeds``: the seeds file's ``bg_threshold``, measured 0.13-0.21 mIoU
worse), ``infer.exp_times``, ``infer.flip``, ``infer.crf``, ``model.stem``.

Where this follows the release rather than the paper: per-group lr (displacement 10x),
the loss weights 0.5 / 0.25, IR labels sampled at the stride-4 cell centres (PIL's nearest
rescale), SGD with (practically) no momentum (the release's ``PolyOptimizer`` passes the weight
decay where SGD expects the momentum), poly 0.9, rescale 0.5-1.5, the boundary logits of
the flipped input averaged before the sigmoid, the walked maps divided by one maximum
over all classes. The instance-segmentation half of the paper (centroids from the
displacement field, class-agnostic instance maps) is not part of this method: the
displacement branch is trained as in the paper (with the backbone frozen it does not
influence the boundary branch) and semantic masks use only the boundary map.
"""

from labelwise.engine.registry import register_method
from labelwise.methods.irn.config import IRNConfig
from labelwise.methods.irn.method import IRNMethod, ir_label, ir_label_stats, seed_thresholds, walk_exp_times

register_method(IRNMethod)

__all__ = ["IRNConfig", "IRNMethod", "ir_label", "ir_label_stats", "seed_thresholds", "walk_exp_times"]
