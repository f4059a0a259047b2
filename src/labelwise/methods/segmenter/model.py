"""The segmenter's network: :class:`labelwise.modeling.decoders.deeplab.DeepLabV3Plus` (shared,
in ``modeling/``) built from the ``model`` section of the config.

``build_segmenter(cfg, num_classes, pretrained=)``: backbone at ``model.output_stride``
(CNN: timm dilation; ViT: its simple pyramid), ASPP (``model.aspp_rates``, image pooling),
the DeepLabV3+ decoder (``model.decoder``) and a 1x1 classifier; logits at the input size.
``pretrained=False`` (a finished run being loaded) never reads a weights file.
"""

from __future__ import annotations

from labelwise.errors import LabelwiseError
from labelwise.modeling.decoders.deeplab import DeepLabV3Plus, build_deeplabv3plus

__all__ = ["DeepLabV3Plus", "build_segmenter"]


def build_segmenter(cfg, num_classes: int, *, pretrained: bool = True) -> DeepLabV3Plus:
    m = cfg.model
    try:
        return build_deeplabv3plus(m.backbone, num_classes, pretrained=pretrained and m.pretrained,
                                   weights=m.weights if pretrained else None, output_stride=m.output_stride,
                                   decoder=m.decoder, aspp_channels=m.aspp_channels, low_channels=m.low_channels,
                                   rates=tuple(m.aspp_rates), decoder_channels=m.decoder_channels,
                                   dropout=m.dropout)
    except LabelwiseError as e:
        if "stride" in str(e):
            raise LabelwiseError(f"config key 'model.output_stride' = {m.output_stride}: {e}") from None
        raise
