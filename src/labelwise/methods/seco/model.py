"""SeCo's network: one ViT encoder shared by the student and the global teacher, two CAM
classifiers, the projection head, the segmentation head; the local teacher is an EMA copy
of :class:`PatchEmbedder` kept by the trainer.

* :class:`PatchEmbedder` = encoder ``g`` + projection MLP ``O``: a view -> the L2-normalised
  projection of its class token (SeCo Eq. 2: ``q = O_q(g_q(x))``; the EMA teacher of this
  module gives ``k = O_k(g_k(x))``).
* :class:`SeCoNet` adds the classifier on the final patch tokens (CAM, global max pooling of
  the token features then a bias-free 1x1 conv, as released) and the auxiliary classifier on
  block ``model.aux_layer`` (SeCo Eq. 1: ``CAM_aux = ReLU(W_lambda^T Z_F^lambda)``), and the
  segmentation head (DeepLab-v2 classifier on the final tokens). ``forward`` computes everything
  a training step needs in one call (so DDP sees every parameter use in one forward).

Inputs are RGB in [0, 1]; the backbone normalises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.errors import LabelwiseError


class PatchEmbedder(nn.Module):
    """Encoder + projection head: ``forward(views) -> (N, D) unit embeddings`` of the class tokens."""

    def __init__(self, backbone: nn.Module, proj: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.proj = proj

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(views).cls)


class SeCoNet(nn.Module):
    def __init__(self, cfg, num_foreground: int, pretrained: bool = True):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone
        from labelwise.modeling.decoders import DeepLabV2Classifier
        from labelwise.modeling.heads import ProjectionMLP

        m = cfg.model
        backbone = create_backbone(m.backbone, pretrained=pretrained and m.pretrained and not m.weights,
                                   weights=m.weights if pretrained else None, **dict(m.timm_kwargs))
        if not backbone.is_vit or getattr(backbone.model, "cls_token", None) is None:
            raise LabelwiseError(f"config key 'model.backbone' = {m.backbone!r}: SeCo needs a ViT with a class token "
                                 "(e.g. vit_base_patch16, deit_small_patch16)")
        backbone._layer_index(m.aux_layer, backbone.depth, "block")  # a bad aux_layer is a one-line error now
        if m.freeze_pos_embed:
            backbone.model.pos_embed.requires_grad_(False)
        d = backbone.embed_dim
        self.embedder = PatchEmbedder(backbone, ProjectionMLP(d, d, m.proj_hidden, m.proj_layers))
        self.classifier = nn.Conv2d(d, num_foreground, 1, bias=False)
        self.aux_classifier = nn.Conv2d(d, num_foreground, 1, bias=False)
        self.decoder = DeepLabV2Classifier(d, num_foreground + 1, m.decoder_rates)
        self.aux_layer = int(m.aux_layer)
        self.patch_size = backbone.patch_size

    @property
    def backbone(self):
        return self.embedder.backbone

    def _features(self, images: torch.Tensor):
        out = self.backbone(images, return_blocks=(self.aux_layer,))
        return out.tokens, out.blocks[self.aux_layer], out.cls

    @staticmethod
    def _logits(classifier: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        # Global max pooling of the token features, then the 1x1 classifier (as released).
        return classifier(F.adaptive_max_pool2d(tokens, 1)).flatten(1)

    def forward(self, images: torch.Tensor, views: torch.Tensor | list[torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """``images`` B x 3 x H x W; ``views`` (optional) query views N x 3 x s x s, or a list of such
        batches of different sizes (embedded one batch each, concatenated in order).

        Returns ``logits`` / ``logits_aux`` (B x K), ``tokens`` (B x D x h x w, final patch
        tokens), ``cls`` (B x D, final class token), ``seg`` (B x K+1 x h x w) and, with views,
        ``q`` (N x D unit embeddings).
        """
        tokens, aux, cls = self._features(images)
        out = {"logits": self._logits(self.classifier, tokens), "logits_aux": self._logits(self.aux_classifier, aux),
               "tokens": tokens, "cls": cls, "seg": self.decoder(tokens)}
        if views is not None:
            groups = views if isinstance(views, (list, tuple)) else [views]
            out["q"] = torch.cat([self.embedder(v) for v in groups])
        return out

    def cams(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAMs ``(final, aux)``, each B x K x h x w, before ReLU (SeCo Eq. 1 for the aux one)."""
        tokens, aux, _ = self._features(images)
        return self.classifier(tokens), self.aux_classifier(aux)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Segmentation logits B x K+1 x h x w (token resolution)."""
        return self.decoder(self.backbone(images).tokens)
