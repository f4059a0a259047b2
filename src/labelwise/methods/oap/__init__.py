"""OAP: "Online Agglomerative Pooling for Scalable Self-Supervised Universal Segmentation" —
online training (issue 11; WORK IN PROGRESS, see ``WIP_OAP.md`` at the repository root).
Paper: ``../shared/papers/oap-online-agglomerative-pooling.txt``.

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
mask losses (Mask2Former)                  ``losses.oap_mask_loss``
Eq. 1 / Eq. 7 query-wise distillation      ``losses.query_distillation``; centre in ``OAPState``
DINO head, last layer frozen 1st epoch     ``model.OAPNet.head``, ``OAPMethod.after_backward``
=========================================  ====================================================

Registered (``engine/registry.py`` ``BUILTIN_METHODS["oap"]``); still work in progress: the recipe,
the benchmark figures and the README section are missing (``WIP_OAP.md``).
"""

from labelwise.engine.registry import register_method
from labelwise.methods.oap.config import OAPTrainConfig
from labelwise.methods.oap.method import OAPMethod, OAPState
from labelwise.methods.oap.model import OAPNet, teacher_targets

register_method(OAPMethod)

__all__ = ["OAPTrainConfig", "OAPMethod", "OAPState", "OAPNet", "teacher_targets"]
