"""Mask2Former's multi-scale deformable-attention pixel decoder (pure PyTorch).

References
----------
* Mask2Former: Cheng, Misra, Schwing, Kirillov, Girdhar, "Masked-attention Mask Transformer
  for Universal Image Segmentation", CVPR 2022. Sec. 3.2.1 / 4.1: the pixel decoder is a
  6-layer multi-scale deformable-attention Transformer (MSDeformAttn) over the 1/32, 1/16
  and 1/8 features, followed by a lateral + upsampling FPN step to 1/4 that produces the
  per-pixel embeddings ("mask features"); the three encoder outputs feed the masked-
  attention Transformer decoder round-robin, one resolution per decoder layer.
* Deformable DETR (Zhu et al., ICLR 2021): the encoder layer (Sec. 4.1, Appendix A.2)
  and the scale-level embedding.
* DETR (Carion et al., ECCV 2020): the sine positional encoding.

Module and parameter names follow Mask2Former's ``MSDeformAttnPixelDecoder`` (``input_proj``,
``transformer.level_embed``, ``transformer.encoder.layers.{i}.self_attn.*`` / ``linear1`` /
``norm1`` ..., ``adapter_{i}`` / ``layer_{i}`` with ``.norm``, ``mask_features``), so the
pixel-decoder part of a Mask2Former checkpoint maps onto it by a prefix change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.modeling.decoders.msdeform import MSDeformAttn

__all__ = [
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoder",
    "PositionEmbeddingSine",
]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine positional encoding: ``num_pos_feats`` channels for y, then for x.

    Each coordinate (row / column index + 1, cumulated over non-padded pixels; optionally
    normalised to ``(0, scale]``) is divided by ``temperature ** (2 i / num_pos_feats)``;
    sines and cosines of the result alternate. Mask2Former uses ``num_pos_feats =
    conv_dim / 2`` and ``normalize=True`` so that the code depends on relative position,
    not on the map size.

    ``forward(x (B, C, H, W), mask=None (B, H, W) bool, True = padding) -> (B, 2 *
    num_pos_feats, H, W)`` in ``x.dtype``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, temperature, normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
        # float32 whatever the feature dtype: bfloat16 cannot even count to 300 exactly.
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable DETR encoder layer (post-norm): ``x = LN(x + MSDeformAttn(x + pos))``,
    ``x = LN(x + FFN(x))`` with a ReLU FFN of width ``ffn_dim``."""

    def __init__(self, d_model: int = 256, ffn_dim: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.activation = nn.ReLU(inplace=True)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        # The position code enters the queries (where to look, how much) but not the values.
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    """The encoder stack plus the scale-level embedding (Mask2Former's
    ``MSDeformAttnTransformerEncoderOnly``; parameters ``level_embed`` and
    ``encoder.layers.{i}.*``).

    ``forward(srcs, pos_embeds)`` takes per-level ``(B, C, h_l, w_l)`` maps and their
    position codes, flattens and concatenates them (level order as given), runs
    ``num_layers`` encoder layers in which every pixel of every level is a query whose
    reference point is its own centre on all levels, and returns ``(memory (B, S, C),
    spatial_shapes (L, 2), level_start_index (L,))``.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, num_layers: int = 6, ffn_dim: int = 1024,
                 dropout: float = 0.0, n_levels: int = 3, n_points: int = 4) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, ffn_dim, dropout, n_levels, n_heads, n_points)
            for _ in range(num_layers))
        # Position codes are the same on every level; this learned per-level vector tells the
        # attention which scale a query / value comes from (Deformable DETR Sec. 4.1).
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR: xavier on every matrix, then MSDeformAttn's own init on top.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for mod in self.modules():
            if isinstance(mod, MSDeformAttn):
                mod.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: Sequence[tuple[int, int]], n_levels: int, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pixel centres ``((j + 0.5) / w, (i + 0.5) / h)`` of every level, concatenated,
        repeated for all ``n_levels`` sampled levels: ``(1, S, n_levels, 2)``. Without padding
        (all valid ratios 1) the normalised centre is the same point on every level."""
        refs = []
        for h, w in shapes:
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        return torch.cat(refs, 0)[None, :, None, :].expand(1, -1, n_levels, 2)

    def forward(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(srcs) != self.n_levels or len(pos_embeds) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(srcs)} maps / {len(pos_embeds)} codes")
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        device = srcs[0].device
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1]))
        ref = self.reference_points(shapes, self.n_levels, device).expand(src_flat.shape[0], -1, -1, -1)
        out = src_flat
        for layer in self.encoder.layers:
            out = layer(out, pos_flat, ref, spatial_shapes, level_start_index)
        return out, spatial_shapes, level_start_index


class _ConvNorm(nn.Conv2d):
    """``Conv2d -> norm -> activation`` with the norm as a ``.norm`` child (detectron2's
    ``Conv2d`` layout, so keys read ``adapter_1.weight`` / ``adapter_1.norm.weight``)."""

    def __init__(self, *args, norm: nn.Module, activation: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return self.activation(x) if self.activation is not None else x


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # detectron2's "c2_xavier_fill" (Caffe2's XavierFill): uniform fan-in init, zero bias.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder (Mask2Former Sec. 4.1 "Pixel decoder").

    The ``transformer_in_features`` coarsest inputs are projected to ``conv_dim`` (1x1 conv
    + GroupNorm(32)), given sine position codes plus a level embedding, and refined jointly
    by ``num_layers`` deformable encoder layers. Each finer input (e.g. stride 4 when the
    encoder sees 8/16/32) is added FPN-style: 1x1 lateral conv + GN, plus the bilinearly
    upsampled coarser output, then a 3x3 conv + GN + ReLU. A 1x1 conv of the finest output
    gives the per-pixel mask embeddings. When every input goes through the encoder, the
    finest encoder output itself feeds ``mask_features`` (no FPN step), as in Mask2Former
    with ``common_stride`` equal to the finest input stride.

    Args:
        in_channels: channels of each input, finest -> coarsest (e.g. strides 4/8/16/32 or
            8/16/32).
        conv_dim: width of the encoder and the FPN (256).
        mask_dim: width of the mask embeddings (256).
        num_layers: deformable encoder layers (6).
        n_heads, n_points: MSDeformAttn heads / points per level (8, 4).
        ffn_dim: encoder FFN width (1024).
        dropout: encoder dropout (0.0 in Mask2Former).
        transformer_in_features: how many of the coarsest inputs the encoder sees (3);
            clamped to ``len(in_channels)``.
        num_feature_levels: how many outputs (coarsest first) are returned for the
            Transformer decoder (3).

    ``forward(features: list finest -> coarsest (B, in_channels[i], h_i, w_i))`` returns
    ``(mask_features (B, mask_dim, h_0, w_0), multi_scale_features)``, the latter a list of
    ``num_feature_levels`` maps ``(B, conv_dim, h, w)`` from coarsest to finer (the encoder
    outputs when it sees 3 or more levels).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        n_heads: int = 8,
        n_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        transformer_in_features: int = 3,
        num_feature_levels: int = 3,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels:
            raise ValueError("in_channels is empty")
        self.in_channels = in_channels
        self.num_transformer_levels = max(1, min(int(transformer_in_features), len(in_channels)))
        self.num_fpn_levels = len(in_channels) - self.num_transformer_levels
        self.num_feature_levels = int(num_feature_levels)
        self.conv_dim, self.mask_dim = conv_dim, mask_dim

        # Encoder inputs, coarsest first (Mask2Former's order: level 0 = stride 32).
        trans_channels = in_channels[self.num_fpn_levels:][::-1]
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(num_groups, conv_dim))
            for c in trans_channels)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = MSDeformAttnTransformerEncoder(
            d_model=conv_dim, n_heads=n_heads, num_layers=num_layers, ffn_dim=ffn_dim, dropout=dropout,
            n_levels=self.num_transformer_levels, n_points=n_points)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)

        # FPN on the inputs finer than the encoder's; registered as adapter_{i} / layer_{i}
        # (i = 1 finest) like Mask2Former, and kept in plain lists (coarse -> fine, the order
        # of the top-down pass) so that the state dict holds each conv once.
        lateral, output = [], []
        for idx, c in enumerate(in_channels[:self.num_fpn_levels]):
            lat = _ConvNorm(c, conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(num_groups, conv_dim))
            out = _ConvNorm(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False,
                            norm=nn.GroupNorm(num_groups, conv_dim), activation=nn.ReLU(inplace=True))
            _c2_xavier_fill(lat)
            _c2_xavier_fill(out)
            self.add_module(f"adapter_{idx + 1}", lat)
            self.add_module(f"layer_{idx + 1}", out)
            lateral.append(lat)
            output.append(out)
        self.lateral_convs = lateral[::-1]
        self.output_convs = output[::-1]

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(features)}")
        trans_feats = list(features[self.num_fpn_levels:])[::-1]
        srcs = [proj(x) for proj, x in zip(self.input_proj, trans_feats)]
        pos = [self.pe_layer(s) for s in srcs]
        memory, spatial_shapes, _ = self.transformer(srcs, pos)

        b = memory.shape[0]
        sizes = [h * w for h, w in spatial_shapes.tolist()]
        outs = [m.transpose(1, 2).reshape(b, self.conv_dim, h, w)
                for m, (h, w) in zip(memory.split(sizes, dim=1), spatial_shapes.tolist())]

        # Top-down: each finer input gets the upsampled coarser output (FPN, Lin et al. 2017).
        fine_feats = list(features[:self.num_fpn_levels])[::-1]
        for x, lat, out_conv in zip(fine_feats, self.lateral_convs, self.output_convs):
            cur = lat(x)
            up = F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(out_conv(cur + up))

        return self.mask_features(outs[-1]), outs[:self.num_feature_levels]
