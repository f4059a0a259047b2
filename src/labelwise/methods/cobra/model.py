"""CoBra's two branches (Sec. 3.2, Fig. 2).

* :class:`ClassAwareBranch` (CAK): a CNN (ResNet-50 at output stride 16 by default) ->
  feature map -> ``f_CAM`` (bias-free 1x1 conv, IRN style) giving ``M_cnn``; global average
  pooling of ``M_cnn`` gives the image logits of ``L_cls-cnn`` (the GAP of a 1x1-conv map is the
  1x1 conv of the GAP, so these are the CAMs of that classifier); ``f_proj`` (linear 1x1 conv,
  L2-normalised) gives the Class-Aware Projection ``v^c``.
* :class:`SemanticAwareBranch` (SAK): a ViT with a class token (DeiT-S/16 by default) ->
  final patch tokens -> ``f_CAM`` (TS-CAM's conv head) giving the semantic maps ``M_tran``
  whose GAP (``model.vit_pooling``; gmp as an option) gives ``L_cls-tran``'s logits;
  ``f_proj`` gives the Semantic-Aware Projection
  ``v^s``; the attention maps of all layers, averaged over heads and summed over layers, give
  the patch affinity ``P = A[1:, 1:]`` (Sec. 3.2, SAK item 3) and the semantic-agnostic
  attention ``A_obj = A[0, 1:]`` (Sec. 3.4, TS-CAM) that couples ``M_tran`` at inference.

:class:`CoBraNet` holds the branches the config switches on (``cobra.cnn`` / ``cobra.vit``)
and runs both in one ``forward`` (so DDP sees every parameter use in one call). Inputs are RGB
in [0, 1] with sides a multiple of the ViT's patch size; each backbone normalises them itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.blocks.cam import CAMHead, pool_maps
from labelwise.errors import LabelwiseError


def _frozen_bn(module: nn.Module) -> None:
    """BatchNorm layers of ``module`` keep their statistics and affine parameters (IRN / CoBra's CNN)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


class ClassAwareBranch(nn.Module):
    """CAK branch: ``forward(x) -> {"logits" B x K, "cams" B x K x h x w (raw), "proj" B x E x h x w}``."""

    def __init__(self, backbone: str, num_classes: int, *, pretrained: bool = True, weights: str | None = None,
                 timm_kwargs: dict | None = None, strides=(), frozen_bn: bool = True, embed_dim: int = 0):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone

        self.backbone = create_backbone(backbone, pretrained=pretrained and not weights, weights=weights,
                                        strides=sorted(set(strides)) or None, weights_key="model.cnn_weights",
                                        **dict(timm_kwargs or {}))
        if self.backbone.is_vit:
            raise LabelwiseError(f"config key 'model.cnn' = {backbone!r} is a ViT; the CAK branch is a CNN "
                                 "(e.g. resnet50, efficientnet_lite0)")
        self.use_levels = bool(strides)
        in_ch = sum(self.backbone.channels) if self.use_levels else self.backbone.embed_dim
        self.cam_head = CAMHead(in_ch, num_classes, pooling="gap")  # f_CAM, then GAP (Sec. 3.2, CAK 1)
        self.proj = nn.Conv2d(in_ch, embed_dim, 1) if embed_dim else None  # f_proj (CAK 3)
        self.frozen_bn = bool(frozen_bn)
        if self.frozen_bn:
            _frozen_bn(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            _frozen_bn(self.backbone)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if not self.use_levels:
            return out.tokens
        size = out.features[0].shape[-2:]
        return torch.cat([f if f.shape[-2:] == size else
                          F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in out.features], 1)

    def forward(self, x: torch.Tensor, with_proj: bool = True) -> dict[str, torch.Tensor]:
        f = self.features(x)
        logits, cams = self.cam_head(f)
        out = {"logits": logits, "cams": cams}
        if with_proj and self.proj is not None:
            out["proj"] = F.normalize(self.proj(f).float(), dim=1)
        return out


class SemanticAwareBranch(nn.Module):
    """SAK branch: ``forward(x) -> {"logits", "cams" (semantic maps, raw), "proj", "affinity" B x N x N,
    "a_obj" B x 1 x h x w}`` (affinity and A_obj: attention averaged over heads, summed over layers)."""

    def __init__(self, backbone: str, num_classes: int, *, pretrained: bool = True, weights: str | None = None,
                 timm_kwargs: dict | None = None, head_kernel: int = 3, embed_dim: int = 0, pooling: str = "gap"):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone

        self.backbone = create_backbone(backbone, pretrained=pretrained and not weights, weights=weights,
                                        weights_key="model.vit_weights", **dict(timm_kwargs or {}))
        if not self.backbone.is_vit or getattr(self.backbone.model, "cls_token", None) is None:
            raise LabelwiseError(f"config key 'model.vit' = {backbone!r}: the SAK branch needs a ViT with a class "
                                 "token (e.g. deit_small_patch16)")
        d = self.backbone.embed_dim
        self.patch_size = self.backbone.patch_size
        self.prefix = self.backbone.num_prefix_tokens
        # TS-CAM: a conv layer on the patch-token map gives the semantic-aware maps; GAP -> logits
        self.cam_head = nn.Conv2d(d, num_classes, head_kernel, padding=head_kernel // 2)
        self.pooling = pooling
        self.proj = nn.Conv2d(d, embed_dim, 1) if embed_dim else None  # f_proj (SAK 2)

    def forward(self, x: torch.Tensor, with_proj: bool = True, with_affinity: bool = True) -> dict[str, torch.Tensor]:
        # Without the affinity only the CLS rows of the attention maps are computed (O(N), not O(N^2)).
        out = self.backbone(x, return_attn=True, average_heads=True, attn_rows=None if with_affinity else 1,
                            return_features=False)
        tokens = out.tokens
        B, _, h, w = tokens.shape
        attn = torch.stack([a[:, 0].float() for a in out.attn]).sum(0)  # B x rows x (P+N), summed over layers
        P = self.prefix
        cams = self.cam_head(tokens)
        res = {"logits": pool_maps(cams, self.pooling), "cams": cams,
               "a_obj": attn[:, 0, P:].reshape(B, 1, h, w)}          # Sec. 3.4: semantic-agnostic attention
        if with_affinity:
            res["affinity"] = attn[:, P:, P:]                         # Sec. 3.2 SAK 3: patch affinity
        if with_proj and self.proj is not None:
            res["proj"] = F.normalize(self.proj(tokens).float(), dim=1)
        return res


class CoBraNet(nn.Module):
    """Both branches (those switched on). ``forward(x) -> {"cnn": {...}, "vit": {...}}``."""

    def __init__(self, cfg, num_classes: int, pretrained: bool = True):
        super().__init__()
        m, c = cfg.model, cfg.cobra
        both = c.cnn and c.vit
        self.cnn = ClassAwareBranch(
            m.cnn, num_classes, pretrained=pretrained and m.cnn_pretrained, weights=m.cnn_weights if pretrained else None,
            timm_kwargs=m.cnn_timm_kwargs, strides=m.cnn_strides, frozen_bn=m.cnn_frozen_bn,
            embed_dim=m.embed_dim if both and c.l_cap else 0) if c.cnn else None
        self.vit = SemanticAwareBranch(
            m.vit, num_classes, pretrained=pretrained and m.vit_pretrained, weights=m.vit_weights if pretrained else None,
            timm_kwargs=m.vit_timm_kwargs, head_kernel=m.vit_head_kernel, pooling=m.vit_pooling,
            embed_dim=m.embed_dim if both and c.l_sap else 0) if c.vit else None
        self.size_divisor = self.vit.patch_size if self.vit is not None else 16

    def forward(self, x: torch.Tensor, with_proj: bool = True, with_affinity: bool = True
                ) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        if self.cnn is not None:
            out["cnn"] = self.cnn(x, with_proj)
        if self.vit is not None:
            out["vit"] = self.vit(x, with_proj, with_affinity)
        return out
