"""kMaX-DeepLab for object parsing (the network of ``kmax`` and ``cocal``).

``KMaXParser``: a timm backbone (strides 4-32) -> :class:`~labelwise.modeling.decoders.KMaXPixelDecoder`
-> :class:`~labelwise.modeling.decoders.KMaXTransformerDecoder` with two query groups, the part
level and the object level (the k-means argmax and the mask softmax run within each group), plus
the auxiliary semantic heads of kMaX-DeepLab (one per level, on the stride-4 pixel map).

* ``dictionary=False`` (kMaX-DeepLab): ``part_queries`` + ``object_queries`` free cluster centres
  and one class head over the joint class space ``[parts..., objects...]`` (+ void); the losses
  match queries to segments with the Hungarian algorithm within each level.
* ``dictionary=True`` (CoCal Sec. 2.1): exactly ``P`` part and ``P~`` object components, component
  ``i`` of a level *is* class ``i`` (no class head, no void, no matching); inference is the
  nearest component of each pixel embedding.

``Mask2FormerParser`` (``model.decoder=mask2former``, CoCal Table 5): the same backbone ->
:class:`~labelwise.modeling.decoders.MSDeformAttnPixelDecoder` ->
:class:`~labelwise.modeling.decoders.MultiScaleMaskedTransformerDecoder` (no [SEM] / [INS] tokens)
with the same two query groups; its masks are sigmoid logits, not a softmax over the queries. In
dictionary mode a component is the query's mask kernel (``mask_embed``), the vector the pixel
embeddings are compared with.

Both return ``pred_masks`` (B, Q, h, w), ``aux_outputs``, ``query_groups``, ``cluster_centres``
(B, Q, D: the mask kernels, CoCal's components in dictionary mode) and ``pixel_feature``
(B, D, h, w); ``pred_logits`` (B, Q, C + 1) without the dictionary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def build_parser(cfg, num_parts: int, num_objects: int, *, dictionary: bool, pretrained: bool = True) -> nn.Module:
    """The parsing network of ``model.decoder``."""
    cls = Mask2FormerParser if cfg.model.decoder == "mask2former" else KMaXParser
    return cls(cfg, num_parts, num_objects, dictionary=dictionary, pretrained=pretrained)


def _query_groups(m, num_parts: int, num_objects: int, dictionary: bool) -> tuple[list[int], int | None]:
    """``(query groups [part, object], class-head size or None)``: the dictionary has one component per
    class of each level and no class head; otherwise free queries and the joint class space."""
    if dictionary:
        return [num_parts, num_objects], None
    return ([int(m.part_queries or 2 * num_parts), int(m.object_queries or 2 * num_objects)],
            num_parts + num_objects)  # joint class space: parts, then objects


def _backbone(m, pretrained: bool):
    from labelwise.modeling.backbones import create_backbone

    kw = dict(m.timm_kwargs)
    if m.drop_path > 0:
        kw.setdefault("drop_path_rate", m.drop_path)
    return create_backbone(m.backbone, pretrained=pretrained and m.pretrained and not m.weights,
                           weights=m.weights if pretrained else None, strides=(4, 8, 16, 32), **kw)


class KMaXParser(nn.Module):
    mask_activation = "softmax"  # kMaX: each pixel's masks are a softmax over the queries of a level

    def __init__(self, cfg, num_parts: int, num_objects: int, *, dictionary: bool, pretrained: bool = True):
        super().__init__()
        from labelwise.modeling.decoders import KMaXPixelDecoder, KMaXTransformerDecoder

        m = cfg.model
        self.backbone = _backbone(m, pretrained)
        self.pixel_decoder = KMaXPixelDecoder(list(self.backbone.channels), dec_layers=list(m.pixel_blocks),
                                              dec_channels=list(m.pixel_dims), num_heads=m.axial_heads)
        self.num_parts, self.num_objects = int(num_parts), int(num_objects)
        self.dictionary = bool(dictionary)
        self.query_groups, classes = _query_groups(m, self.num_parts, self.num_objects, self.dictionary)
        self.decoder = KMaXTransformerDecoder(
            in_channels=self.pixel_decoder.out_channels, dec_layers=list(m.dec_layers), hidden_dim=m.hidden_dim,
            base_filters=m.base_filters, num_heads=m.nheads, dim_feedforward=m.dim_feedforward, mask_dim=m.mask_dim,
            pixel_head_dim=m.pixel_head_dim, query_groups=self.query_groups, num_classes=classes)
        c4 = self.pixel_decoder.out_channels[3]
        # kMaX-DeepLab's auxiliary semantic heads (one per level) on the stride-4 pixel map
        self.aux_semantic = nn.ModuleDict({
            level: nn.Sequential(nn.Conv2d(c4, c4, 3, padding=1, bias=False), nn.BatchNorm2d(c4), nn.GELU(),
                                 nn.Conv2d(c4, n, 1))
            for level, n in (("parts", self.num_parts), ("objects", self.num_objects))})

    def forward(self, x: torch.Tensor) -> dict:
        """``x`` (B, 3, H, W) in [0, 1] (H, W multiples of 32) -> the decoder's dict plus
        ``aux_semantic`` ``{"parts": (B, P, H/4, W/4), "objects": (B, P~, H/4, W/4)}`` logits."""
        feats = self.backbone(x).features
        ms, pixel = self.pixel_decoder(feats)
        out = self.decoder(ms, pixel)
        out["aux_semantic"] = {k: head(pixel) for k, head in self.aux_semantic.items()}
        return out


class Mask2FormerParser(nn.Module):
    """Mask2Former for object parsing (CoCal Table 5); see the module doc."""

    mask_activation = "sigmoid"  # Mask2Former: an independent sigmoid per mask

    def __init__(self, cfg, num_parts: int, num_objects: int, *, dictionary: bool, pretrained: bool = True):
        super().__init__()
        from labelwise.modeling.decoders import MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder

        m, n = cfg.model, cfg.model.mask2former
        self.backbone = _backbone(m, pretrained)
        self.pixel_decoder = MSDeformAttnPixelDecoder(list(self.backbone.channels), conv_dim=n.conv_dim,
                                                      mask_dim=n.mask_dim, num_layers=n.pixel_layers,
                                                      n_heads=n.pixel_heads, ffn_dim=n.pixel_ffn, num_feature_levels=3)
        self.num_parts, self.num_objects = int(num_parts), int(num_objects)
        self.dictionary = bool(dictionary)
        self.query_groups, classes = _query_groups(m, self.num_parts, self.num_objects, self.dictionary)
        self.decoder = MultiScaleMaskedTransformerDecoder(
            in_channels=n.conv_dim, hidden_dim=n.hidden_dim, num_semantic_queries=self.query_groups[0],
            num_instance_queries=self.query_groups[1], nheads=n.nheads, dim_feedforward=n.dim_feedforward,
            dec_layers=n.dec_layers, mask_dim=n.mask_dim, num_feature_levels=3, num_classes=classes,
            level_tokens=False)

    def forward(self, x: torch.Tensor) -> dict:
        """``x`` (B, 3, H, W) in [0, 1] (H, W multiples of 32) -> the decoder's dict (masks at stride 4)
        plus ``query_groups``, ``cluster_centres`` and ``pixel_feature``."""
        feats = self.backbone(x).features
        mask_features, ms = self.pixel_decoder(feats)
        out = self.decoder(ms, mask_features)
        out["query_groups"] = list(self.query_groups)
        out["cluster_centres"] = out["mask_embed"]
        out["pixel_feature"] = mask_features
        return out


def level_probabilities(out: dict, num_parts: int, num_objects: int, dictionary: bool,
                        mask_activation: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel class probabilities of both levels, ``(part_prob (B, P, h, w), object_prob (B, P~, h, w))``.

    * dictionary mode (CoCal): the softmax over each level's components of the mask logits
      (pixel embedding . component): its argmax is the nearest component (for either decoder);
    * free queries: semantic inference of a mask transformer -- ``sum_q p_q(c) m_q(x)`` over the
      level's queries, with ``p_q`` the class softmax restricted to the level's classes (void
      dropped, renormalised) and ``m_q`` the mask softmax within the level's group
      (``mask_activation="softmax"``, kMaX-DeepLab) or the mask sigmoid (``"sigmoid"``,
      Mask2Former's ``semantic_inference``; then the maps are scores, not normalised over classes).
    """
    from labelwise.modeling.decoders import group_softmax

    groups = [int(g) for g in out["query_groups"]]
    if dictionary or mask_activation == "softmax":
        masks = group_softmax(out["pred_masks"].float(), groups)
    elif mask_activation == "sigmoid":
        masks = out["pred_masks"].float().sigmoid()
    else:
        raise ValueError(f"mask_activation must be 'softmax' or 'sigmoid', got {mask_activation!r}")
    mp, mo = masks[:, :groups[0]], masks[:, groups[0]:]
    if dictionary:
        return mp, mo
    cls = out["pred_logits"].float()[..., :-1]
    cp = cls[:, :groups[0], :num_parts].softmax(-1)
    co = cls[:, groups[0]:, num_parts:num_parts + num_objects].softmax(-1)
    return torch.einsum("bqc,bqhw->bchw", cp, mp), torch.einsum("bqc,bqhw->bchw", co, mo)


def upsample(prob: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(prob, size=tuple(size), mode="bilinear", align_corners=False)
