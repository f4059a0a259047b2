"""OAP: "Online Agglomerative Pooling for Scalable Self-Supervised Universal Segmentation" —
online training: ``labelwise train oap``. Paper: *Online Agglomerative Pooling for Scalable Self-Supervised Universal Segmentation* (``docs/release-settings.md``)
(Sec. 4.1-4.3, 5.1; settings read from the release in ``docs/release-settings.md``).

=========================================  ====================================================
paper                                      code
=========================================  ====================================================
Sec. 4.1 teacher-student, multi-crop       ``method._TrainTransform`` (global view -> teacher,
                                           local views inside it -> student), EMA teacher of
                                           the whole ``model.OAPNet`` (``ema_momentum``: cosine
                                           0.996 -> 1)
Sec. 4.2 / Alg. 1: OAP pseudo-masks        ``labelwise.pseudo.oap.pooling`` via
                                           ``model.teacher_targets`` (every step, batched)
Eq. 6 teacher embeddings                   ``pooling.vote_embeddings`` on the teacher's mask
                                           features (design decision, ``model`` doc)
Sec. 4.3 multi-scale encoder, zero init    ``modeling.backbones.vit_adapter.ViTAdapter``
Sec. 4.3 Mask2Former decoder, [SEM]/[INS]  ``modeling.decoders`` (pixel decoder, masked decoder)
Sec. 4.3 cropped bipartite matching        ``losses.crop_targets`` + ``losses.match_views``
mask losses (Mask2Former)                  ``losses.oap_mask_loss`` (BCE + Dice on importance-
                                           sampled points, every decoder layer)
Mask2Former's class loss ("official       ``losses.objectness_loss``: one "object" class +
setting"; categories = DINO codes)         no-object (weight 0.1), matched queries = object;
                                           ranks masks at inference (``loss.objectness``, 0 = off)
Eq. 1 / Eq. 7 query-wise distillation      ``losses.query_distillation``; centre in ``OAPState``
DINO head, last layer frozen 1st epoch     ``model.OAPNet.head``, ``OAPMethod.after_backward``
=========================================  ====================================================

Inference (Sec. 5.1: "the final teacher network with the mask decoder"): ``OAPMethod.predict``
-- ``--what universal`` writes every query's mask (sigmoid > 0.5 at image size) scored by
p(object) x mean mask probability (Mask2Former's instance score), ``level`` from the query group and
``category_id`` = argmax of the query's K-dim DINO code + 1, plus cluster maps of the semantic
masks; ``--what pseudo`` writes the teacher's own OAP pseudo-masks (``infer.teacher=initial``: the
pretrained encoder before training, the raw pseudo-masks ``recipes/oap.yaml`` compares with),
clustered by k-means of their key-space Eq. 6 features.

Decisions where the paper is silent (each a config key):

* teacher query embeddings: Eq. 6 votes of the teacher's own mask features (pixel-decoder output)
  pooled to the key grid, through the teacher decoder's final LayerNorm and the teacher's DINO
  head (``model.teacher_features``, ``model.teacher_embed_norm``; ``model`` module doc);
* local views are cut *inside* the global view (their area range ``oap.local_scale`` is relative
  to it), so that every local view overlaps the teacher's masks (``method._TrainTransform``);
* CNN encoders (the ``cpu`` preset): the feature map at ``model.key_stride`` is pooled as the keys;
* Eq. 7 is averaged over matched pairs (``loss.distill_reduction: mean``; ``sum`` is literal);
  self-distillation on the last decoder layer, mask losses on every layer (``loss.deep_supervision``);
* ``oap.max_targets`` caps the teacher masks per image and level (0 = all, the paper);
* the ViT's final norm is frozen under ViT-Adapter (the adapter reads the last block before it).
"""

from labelwise.engine.registry import register_method
from labelwise.methods.oap.config import OAPTrainConfig
from labelwise.methods.oap.method import OAPMethod, OAPState
from labelwise.methods.oap.model import OAPNet, teacher_targets

register_method(OAPMethod)

__all__ = ["OAPTrainConfig", "OAPMethod", "OAPState", "OAPNet", "teacher_targets"]
