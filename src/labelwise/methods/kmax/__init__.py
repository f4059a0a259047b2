"""kMaX-DeepLab (Yu et al., "k-means Mask Transformer", ECCV 2022) for object parsing: the baseline
CoCal is built on (CoCal Table 2, row "kMaX-DeepLab"). ``labelwise train kmax``.

=============================================  ===============================================
kMaX-DeepLab                                   code
=============================================  ===============================================
pixel decoder (axial + bottleneck, 32 -> 4)    ``modeling.decoders.kmax.KMaXPixelDecoder``
k-means cross-attention (CoCal Eq. 4)          ``modeling.decoders.kmax.kmeans_cross_attention``
transformer decoder, [2, 2, 2] on 32/16/8      ``modeling.decoders.kmax.KMaXTransformerDecoder``
mask head (L2 pixels . centres, BN gamma 0.1)  same module (``pred_masks``)
Hungarian matching on -(dice x p(class))       ``blocks.kmax_losses.kmax_match``
PQ-style class + dice, mask-ID CE, instance    ``blocks.kmax_losses.kmax_losses``
discrimination, auxiliary semantic             ``blocks.kmax_losses.loss_aux_semantic``
semantic inference per level                   ``model.level_probabilities``
=============================================  ===============================================

``model.decoder=mask2former`` swaps in Mask2Former (deformable pixel decoder, masked-attention
decoder, class + BCE + dice matching and losses: ``model.Mask2FormerParser``,
``blocks.mask2former_losses``), the baseline row of CoCal's Table 5.

For parsing, the queries form two groups -- the part level and the object level -- clustered
separately (``query_groups``), with one class head over the joint class space (parts, then
objects; the void class last). The two levels are predicted independently.
"""

from labelwise.engine.registry import register_method
from labelwise.methods.kmax.config import KMaXConfig
from labelwise.methods.kmax.method import KMaXMethod
from labelwise.methods.kmax.model import KMaXParser

register_method(KMaXMethod)

__all__ = ["KMaXConfig", "KMaXMethod", "KMaXParser"]
