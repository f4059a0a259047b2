"""Models shared by the methods.

* ``labelwise.modeling.backbones``: timm-based backbones and checkpoint loading.
* ``labelwise.modeling.decoders``: segmentation decoders: DeepLabV3 ASPP and the DeepLabV3+
  decoder now; Mask2Former and kMaX-DeepLab pixel / transformer decoders later.
* ``labelwise.modeling.heads``: heads: the DINO projection head now; others later.

Subpackages are imported on demand (nothing torch-heavy is imported here).
"""
