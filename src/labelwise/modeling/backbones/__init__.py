"""timm-based backbones with the hooks labelwise's methods need (see ``backbone.py``), and the
ViT-Adapter multi-scale encoder around a ViT backbone (``vit_adapter.py``, imported on first use)."""

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
    "load_into", "pixel_stats", "read_checkpoint", "resolve_name", "ViTAdapter",
]


def __getattr__(name: str):
    # the adapter pulls in the deformable-attention decoder code: import it only when asked for
    if name == "ViTAdapter":
        from labelwise.modeling.backbones.vit_adapter import ViTAdapter

        return ViTAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
