"""timm-based backbones with the hooks labelwise's methods need (see ``backbone.py``)."""

from labelwise.modeling.backbones.backbone import (
    PYRAMID_STRIDES,
    Backbone,
    BackboneOutput,
    create_backbone,
    create_classifier,
    image_to_tensor,
)
from labelwise.modeling.backbones.registry import (ALIASES, IMAGENET_MEAN, IMAGENET_STD, list_backbones, pixel_stats,
                                                  resolve_name)
from labelwise.modeling.backbones.weights import fit_state_dict, load_into, read_checkpoint

__all__ = [
    "ALIASES", "Backbone", "BackboneOutput", "IMAGENET_MEAN", "IMAGENET_STD", "PYRAMID_STRIDES",
    "create_backbone", "create_classifier", "fit_state_dict", "image_to_tensor", "list_backbones",
    "load_into", "pixel_stats", "read_checkpoint", "resolve_name",
]
