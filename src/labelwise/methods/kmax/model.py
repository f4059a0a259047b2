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
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KMaXParser(nn.Module):
    def __init__(self, cfg, num_parts: int, num_objects: int, *, dictionary: bool, pretrained: bool = True):
        super().__init__()
        from labelwise.modeling.backbones import create_backbone
        from labelwise.modeling.decoders import KMaXPixelDecoder, KMaXTransformerDecoder

        m = cfg.model
        kw = dict(m.timm_kwargs)
        if m.drop_path > 0:
            kw.setdefault("drop_path_rate", m.drop_path)
        self.backbone = create_backbone(m.backbone, pretrained=pretrained and m.pretrained and not m.weights,
                                        weights=m.weights if pretrained else None, strides=(4, 8, 16, 32), **kw)
        self.pixel_decoder = KMaXPixelDecoder(list(self.backbone.channels), dec_layers=list(m.pixel_blocks),
                                              dec_channels=list(m.pixel_dims), num_heads=m.axial_heads)
        self.num_parts, self.num_objects = int(num_parts), int(num_objects)
        self.dictionary = bool(dictionary)
        if dictionary:
            groups, classes = [self.num_parts, self.num_objects], None
        else:
            groups = [m.part_queries or 2 * self.num_parts, m.object_queries or 2 * self.num_objects]
            classes = self.num_parts + self.num_objects  # joint class space: parts, then objects
        self.query_groups = [int(g) for g in groups]
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


def level_probabilities(out: dict, num_parts: int, num_objects: int, dictionary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel class probabilities of both levels, ``(part_prob (B, P, h, w), object_prob (B, P~, h, w))``.

    * dictionary mode (CoCal): the softmax over each level's components of the mask logits
      (pixel embedding . component): its argmax is the nearest component;
    * kMaX-DeepLab: semantic inference of a mask transformer -- ``sum_q p_q(c) m_q(x)`` over the
      level's queries, with ``p_q`` the class softmax restricted to the level's classes (void
      dropped, renormalised) and ``m_q`` the mask softmax within the level's group.
    """
    from labelwise.modeling.decoders import group_softmax

    groups = [int(g) for g in out["query_groups"]]
    masks = group_softmax(out["pred_masks"].float(), groups)
    mp, mo = masks[:, :groups[0]], masks[:, groups[0]:]
    if dictionary:
        return mp, mo
    cls = out["pred_logits"].float()[..., :-1]
    cp = cls[:, :groups[0], :num_parts].softmax(-1)
    co = cls[:, groups[0]:, num_parts:num_parts + num_objects].softmax(-1)
    return torch.einsum("bqc,bqhw->bchw", cp, mp), torch.einsum("bqc,bqhw->bchw", co, mo)


def upsample(prob: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(prob, size=tuple(size), mode="bilinear", align_corners=False)
