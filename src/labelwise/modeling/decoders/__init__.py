"""Segmentation decoders shared by the methods.

DeepLabV3 ASPP and the DeepLabV3+ decoder (``deeplab.py``); Mask2Former's parts in pure PyTorch:
multi-scale deformable attention (``msdeform.py``, no compiled extension), the multi-scale
deformable-attention pixel decoder (``pixel_decoder.py``) and the masked-attention transformer
decoder with level-tagged (semantic / instance) queries (``mask2former.py``); kMaX-DeepLab's pixel
decoder and k-means transformer decoder with query groups (``kmax.py``).
"""

from labelwise.modeling.decoders.deeplab import (
    ASPP,
    ASPPConv,
    ASPPPooling,
    DeepLabV2Classifier,
    DeepLabV3PlusDecoder,
)
from labelwise.modeling.decoders.kmax import (
    KMaXPixelDecoder,
    KMaXTransformerDecoder,
    group_softmax,
    kmeans_cross_attention,
)
from labelwise.modeling.decoders.mask2former import MultiScaleMaskedTransformerDecoder, masked_attention_mask
from labelwise.modeling.decoders.msdeform import MSDeformAttn, ms_deform_attn
from labelwise.modeling.decoders.pixel_decoder import MSDeformAttnPixelDecoder, PositionEmbeddingSine

__all__ = ["ASPP", "ASPPConv", "ASPPPooling", "DeepLabV2Classifier", "DeepLabV3PlusDecoder",
           "MultiScaleMaskedTransformerDecoder", "masked_attention_mask", "MSDeformAttn", "ms_deform_attn",
           "MSDeformAttnPixelDecoder", "PositionEmbeddingSine", "KMaXPixelDecoder", "KMaXTransformerDecoder",
           "group_softmax", "kmeans_cross_attention"]
