"""Segmentation decoders shared by the methods.

Now: DeepLabV3 ASPP and the DeepLabV3+ decoder (``deeplab.py``). Planned: Mask2Former and
kMaX-DeepLab pixel / transformer decoders.
"""

from labelwise.modeling.decoders.deeplab import (
    ASPP,
    ASPPConv,
    ASPPPooling,
    DeepLabV2Classifier,
    DeepLabV3PlusDecoder,
)

__all__ = ["ASPP", "ASPPConv", "ASPPPooling", "DeepLabV2Classifier", "DeepLabV3PlusDecoder"]
