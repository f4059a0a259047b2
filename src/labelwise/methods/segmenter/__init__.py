"""The ``segmenter`` method: DeepLabV3+ trained fully supervised on label PNGs.

The last stage of every WSSS pipeline: ``labelwise train segmenter --data SPEC --labels
PRED_DIR`` trains on the pseudo-masks of any method (``labelwise infer RUN --what masks`` of
cam / seco / cobra / irn); without ``--labels`` on the dataset's own masks (the fully
supervised reference). ``labelwise infer RUN --what segmentation`` writes label PNGs.

Paper: Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous Separable
Convolution for Semantic Image Segmentation" (DeepLabV3+), ECCV 2018; its encoder is
DeepLabV3 (Chen et al., arXiv:1706.05587, 2017).

==============================================================  ===============================================
paper component                                                 symbol
==============================================================  ===============================================
encoder backbone, atrous conv at output stride 16 (V3 Sec. 3.2)  ``modeling.decoders.deeplab.build_deeplabv3plus``
                                                                (timm ``output_stride``; ViT: simple pyramid)
ASPP: 1x1 + three 3x3 rates (6, 12, 18), 256 ch + BN             ``modeling.decoders.deeplab.ASPP``
(V3 Sec. 3.3, Fig. 5)
image-level pooling branch (V3 Sec. 3.3)                         ``modeling.decoders.deeplab.ASPPPooling``
decoder: low-level (stride 4) 1x1 -> 48 ch (V3+ Sec. 3.1,        ``DeepLabV3PlusDecoder.low_proj``
Table 1)
encoder output bilinearly x4, concat, [3x3, 256] x 2             ``DeepLabV3PlusDecoder.refine``
(V3+ Sec. 3.1, Table 2)
1x1 classifier, final bilinear upsampling to the input (Sec 3.1) ``DeepLabV3PlusDecoder.classifier``,
                                                                ``DeepLabV3Plus.forward``
whole network                                                   ``modeling.decoders.deeplab.DeepLabV3Plus``,
                                                                ``model.build_segmenter``
pixel cross-entropy, ignore 255 (Sec. 4)                         ``method.SegmenterMethod.training_step``
random scale 0.5-2.0, flip, crop 512 (Sec. 4)                    ``method._SegTrainTransform`` (``data.*``)
poly lr (power 0.9), SGD momentum 0.9, wd 1e-4 (Sec. 4)          ``optim.*`` (presets ``voc`` / ``coco``)
multi-scale + flip inference, averaged (Sec. 4, Table 3 MS/Flip) ``method.multiscale_probs`` (``infer.scales``,
                                                                ``infer.flip``)
dense CRF post-processing (DeepLab-v2; common in WSSS)          ``method.probs_to_label`` (``infer.crf``)
==============================================================  ===============================================

Ablation switches (DeepLabV3+ Table 3 rows / Tables 1-2):

* ``model.decoder=false``: DeepLabV3 (ASPP -> 1x1 classifier, no low-level skip);
* ``model.output_stride`` (8 / 16 / 32; set ``model.aspp_rates`` to (12, 24, 36) at 8);
* ``model.low_channels`` (Table 1), ``model.decoder_channels`` (Table 2);
* ``infer.scales=[1.0]`` / ``infer.flip=false``: single-scale, no flip (Table 3 "MS", "Flip").

Deviations: plain (not depthwise-separable) 3x3 convolutions and a standard timm backbone
instead of the modified aligned Xception (the paper's ResNet-101 rows use the same
choice); the head is Kaiming-initialised (common re-implementations).
"""

from labelwise.engine.registry import register_method
from labelwise.methods.segmenter.config import SegmenterConfig
from labelwise.methods.segmenter.method import SegmenterMethod, multiscale_probs
from labelwise.methods.segmenter.model import build_segmenter

register_method(SegmenterMethod)

__all__ = ["SegmenterConfig", "SegmenterMethod", "build_segmenter", "multiscale_probs"]
