"""The CAM classifier: backbone -> (multi-level) feature map -> 1x1-conv CAM head.

Feature map the CAM is computed on:

* CNN: the backbone levels at ``model.feature_strides`` (default stride 16 and 32),
  the coarser ones bilinearly upsampled to the finest and concatenated — a stride-16 CAM
  that still sees the last (most semantic) stage;
* ViT: the final patch-token grid (``BackboneOutput.tokens``), i.e. stride = patch size.

Inputs are images in [0, 1] (``B x 3 x H x W``); the backbone applies its own mean/std,
so datasets do not depend on the backbone. A CNN backbone is built only up to the deepest
stride the CAM uses (no unused layers: DDP needs every parameter in the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.blocks.cam import CAMHead
from labelwise.errors import LabelwiseError


class CAMNet(nn.Module):
    def __init__(self, cfg, num_foreground: int, pretrained: bool = True):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone

        m = cfg.model
        strides = sorted(set(m.feature_strides))
        try:  # pretrained=False: a finished run is being loaded, its checkpoint holds every weight
            self.backbone = create_backbone(m.backbone, pretrained=pretrained and m.pretrained and not m.weights,
                                            weights=m.weights if pretrained else None, strides=strides)
        except LabelwiseError as e:
            if "stride" in str(e):
                raise LabelwiseError(f"config key 'model.feature_strides' = {strides}: {e}") from None
            raise
        bb = self.backbone
        if bb.is_vit:
            self.levels: list[int] = []
            in_ch = bb.embed_dim
            self.size_divisor = bb.patch_size
        else:
            self.levels = [bb.strides.index(s) for s in strides]
            in_ch = sum(bb.channels[i] for i in self.levels)
            self.size_divisor = max(m.size_divisor, max(bb.strides[i] for i in self.levels))
        self.head = CAMHead(in_ch, num_foreground, pooling=m.pooling)
        self.freeze_backbone = bool(m.freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BN statistics
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            out = self.backbone(images)
        if self.backbone.is_vit:
            return out.tokens
        feats = [out.features[i] for i in self.levels]
        size = feats[0].shape[-2:]
        feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                 for f in feats]
        return torch.cat(feats, dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits B x C, raw cams B x C x h x w)`` over the foreground classes."""
        return self.head(self.features(images))

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """Raw CAMs for any input size (resized to a multiple of the stride; callers resize back)."""
        H, W = images.shape[-2:]
        d = self.size_divisor
        h, w = max(d, round(H / d) * d), max(d, round(W / d) * d)
        if (h, w) != (H, W):
            images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
        return self(images)[1]

