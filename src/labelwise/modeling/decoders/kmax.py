"""kMaX-DeepLab's pixel decoder and k-means transformer decoder (pure PyTorch), with query groups.

References
----------
* kMaX-DeepLab: Yu, Wang, Qiao, Collins, Zhu, Adam, Yuille, Chen, "k-means Mask Transformer",
  ECCV 2022. Pixel decoder (Sec. 3.3 / Fig. 4): the stride-32 backbone map goes through axial-
  attention blocks, is upsampled and fused with the stride-16 map (axial blocks), then the
  stride-8 and stride-4 maps (bottleneck blocks). Transformer decoder: learnable cluster
  centres updated by kMaX blocks on the stride-32, -16 and -8 decoder maps ([2, 2, 2] blocks);
  each block = k-means cross-attention (the cluster-assignment step is a hard argmax over the
  centres, the update step sums the assigned pixel values), query self-attention, FFN. Every
  block and the final head predict masks = L2-normalised pixel embedding . centre kernel.
  Official PyTorch port: bytedance/kmax-deeplab, ``kmax_pixel_decoder.py`` /
  ``kmax_transformer_decoder.py`` (after deeplab2).
* CoCal (``cocal-dictionary-part-parsing``), Sec. 2.1, Eq. 4:
  ``O_hat = O + argmax_N(Q^o x (K^p)^T) x V^p`` -- each pixel contributes its value to the one
  query of highest affinity (:func:`kmeans_cross_attention`, in fp32 even under autocast, on the
  *detached* mask logits). CoCal's hierarchical dictionary (Sec. 2.2.1) has a part level of P
  components and an object level of P~ components: ``query_groups=[P, P~]`` makes the argmax
  (and, in the losses, the mask softmax over queries: :func:`group_softmax`) run within each
  group, so every pixel belongs to one part component and to one object component. The groups
  share all decoder weights and attend to each other in the query self-attention.

Modules
-------
:class:`KMaXPixelDecoder` ``(features) -> (multi_scale_features, pixel_feature)``: ``features``
finest -> coarsest (strides 4, 8, 16, 32, as ``Backbone(...).features``); returns the decoder
maps at strides 32, 16, 8 (channels ``4 * dec_channels[:3]``) and the stride-4 pixel map
(``4 * dec_channels[3]``).

:class:`KMaXTransformerDecoder` ``(multi_scale_features, pixel_feature) -> dict``:

* ``pred_masks`` (B, Q, H/4, W/4): mask logits of the final prediction;
* ``pred_logits``: only with a class head: (B, Q, C + 1) for an int ``num_classes`` (last =
  void), a list of (B, Q_g, C_g + 1) per group for a sequence;
* ``cluster_centres`` (B, Q, mask_dim): the per-image mask kernels the masks are made of
  (``pred_masks = BN1(pixel_feature . cluster_centres)``) -- CoCal's dictionary components C,
  in the pixel-embedding space;
* ``pixel_feature`` (B, mask_dim, H/4, W/4): L2-normalised pixel embedding (instance-
  discrimination loss, nearest-component inference);
* ``aux_outputs``: one dict with the same keys (no ``aux_outputs``) per kMaX block, i.e. the
  prediction each block makes from its input centres before updating them
  (``sum(dec_layers)`` dicts); masks and pixel features bilinearly resized to H/4 x W/4 as the
  port (the resized features are no longer unit-norm);
* ``query_groups``: list of group sizes (``[num_queries]`` without groups).

Parameter names follow the official port (``_in_norms``, ``_stages.{i}._blocks.{j}._conv1_bn_act``,
``_attention._height_axis._query_rpe._embeddings``, ``_resized_fuses``,
``_kmax_transformer_layers.{i}._query_qkv_conv_bn``, ``_kmeans_query_conv3_bn``, ``_cluster_centers``
of shape (hidden_dim, num_queries), ``_mask_embedding_projection``, ``_predcitor`` -- the port's
spelling, kept so its checkpoints load -- ``._pixel_space_mask_batch_norm`` ...), initialisation
too (TF-style truncated normals, zero-init residual BN gammas, mask BN gamma 0.1, void-biased
class logits).

Differences from the official port
----------------------------------
* Relative positional encodings of the axial attention index the shared (2 * 255 - 1)-row table
  by the *actual* axis length at each call instead of a length fixed from ``INPUT.IMAGE_SIZE``:
  any input size works (axis length <= 255 at strides 32 and 16); identical to the port when the
  sizes match.
* Plain ``BatchNorm`` (eps 1e-3, momentum 0.01 as the port's SyncBN) -- convert with
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training; the 1-channel mask BN and
  the similarity BNs run on reshaped views (same statistics).
* Widths the port hard-codes are arguments (query width ``hidden_dim`` 256, FFN 2048, pixel-head
  width 256, mask-embedding width 128, heads 8).
* Query groups (CoCal); the class head is optional (``num_classes=None``: CoCal's dictionary
  mode, no ``_transformer_class_head`` / ``_class_embedding_projection`` parameters at all, so
  DDP sees no unused parameters) and may be one per group.
* The auxiliary semantic head and the backbone "semantic features" pass-through are not part of
  this module; ``cluster_centres`` is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AxialAttention",
    "AxialAttention2D",
    "ConvBN",
    "KMaXPixelDecoder",
    "KMaXPredictor",
    "KMaXTransformerDecoder",
    "KMaXTransformerLayer",
    "group_softmax",
    "kmeans_cross_attention",
]

_BN_EPS = 1e-3  # the port's (TF-aligned) SyncBN settings
_BN_MOMENTUM = 0.01
MAX_SPAN = 255  # longest axis of the axial attention (size of the relative-position table)


# ------------------------------------------------------------------------------------ helpers
def _check_groups(groups: Sequence[int] | None, num_queries: int) -> list[int]:
    if groups is None:
        return [int(num_queries)]
    sizes = [int(g) for g in groups]
    if not sizes or any(g < 1 for g in sizes) or sum(sizes) != num_queries:
        raise ValueError(f"query groups {sizes} must be positive and sum to the {num_queries} queries")
    return sizes


def kmeans_cross_attention(queries_affinity_logits: torch.Tensor, values: torch.Tensor,
                           groups: Sequence[int] | None = None) -> torch.Tensor:
    """k-means cross-attention (CoCal Eq. 4 / kMaX-DeepLab's cluster update).

    ``queries_affinity_logits`` (B, Q, N): affinity of every query to every pixel (kMaX: the mask
    logits); ``values`` (B, N, D): pixel values. Within each group of queries (``groups`` = sizes
    of consecutive query blocks summing to Q; ``None`` = one group), each pixel is assigned to
    the query of highest affinity (hard argmax, first index on ties, no gradient: the affinity
    is detached) and the one-hot assignment matrix multiplies the values:
    ``out[b, q] = sum_{n : argmax_{q' in group(q)} A[b, q', n] = q} values[b, n]``.
    So every pixel contributes to exactly one query per group. Computed in float32 with
    autocast disabled; returns float32 (B, Q, D), differentiable w.r.t. ``values`` only.
    """
    if queries_affinity_logits.dim() != 3 or values.dim() != 3:
        raise ValueError("expected affinity (B, Q, N) and values (B, N, D)")
    b, q, n = queries_affinity_logits.shape
    if values.shape[0] != b or values.shape[1] != n:
        raise ValueError(f"values {tuple(values.shape)} do not match affinity {tuple(queries_affinity_logits.shape)}")
    sizes = _check_groups(groups, q)
    with torch.no_grad():
        affinity = queries_affinity_logits.detach().float()
        index, start = [], 0
        for size in sizes:
            index.append(affinity[:, start:start + size].argmax(dim=1, keepdim=True) + start)  # (B, 1, N)
            start += size
        assignment = torch.zeros_like(affinity).scatter_(1, torch.cat(index, dim=1), 1.0)  # (B, Q, N) one-hot
    with torch.autocast(device_type=values.device.type, enabled=False):
        return torch.bmm(assignment, values.float())


def group_softmax(logits: torch.Tensor, groups: Sequence[int] | None = None, dim: int = 1) -> torch.Tensor:
    """Softmax over the query dimension ``dim`` within each group of consecutive queries
    (``groups`` sizes summing to ``logits.shape[dim]``; ``None`` = plain softmax). E.g. the mask
    probabilities of ``pred_masks`` (B, Q, H, W) with ``query_groups``: every pixel's
    probabilities sum to 1 over each group."""
    sizes = _check_groups(groups, logits.shape[dim])
    if len(sizes) == 1:
        return logits.softmax(dim)
    return torch.cat([part.softmax(dim) for part in logits.split(sizes, dim=dim)], dim=dim)


def _trunc_normal_tf_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    # TF / timm ``trunc_normal_tf_``: N(0, 1) truncated to [-2, 2], then scaled by std.
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def _bn1d(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class DropPath(nn.Module):
    """Stochastic depth per sample (dim 0), scaled by 1 / keep probability; identity in eval."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0.0 else nn.Identity()


class ConvBN(nn.Module):
    """Conv (1-d or 2-d) -> optional BatchNorm -> optional activation (``conv``, ``norm``, ``act``
    as the port's ``ConvBN``). ``conv_init``: ``he_normal`` (TF: truncated normal with std
    sqrt(2 / in_channels)), ``xavier_uniform``, ``trunc_normal`` (std 0.02); ``norm_init`` = BN
    gamma at init (0 for the last BN of a residual branch)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, norm: bool = True, act: str | None = None,
                 conv_type: str = "2d", conv_init: str = "he_normal", norm_init: float = 1.0) -> None:
        super().__init__()
        if conv_type not in ("1d", "2d"):
            raise ValueError(f"conv_type must be '1d' or '2d', got {conv_type!r}")
        conv_cls = nn.Conv1d if conv_type == "1d" else nn.Conv2d
        self.conv = conv_cls(in_channels, out_channels, kernel_size, padding=padding, groups=groups, bias=bias)
        if norm:
            self.norm = _bn1d(out_channels) if conv_type == "1d" else _bn2d(out_channels)
            nn.init.constant_(self.norm.weight, norm_init)
        else:
            self.norm = nn.Identity()
        if act is None:
            self.act = nn.Identity()
        elif act == "gelu":
            self.act = nn.GELU()
        elif act == "relu":
            self.act = nn.ReLU()
        else:
            raise ValueError(f"unknown activation {act!r}")
        if conv_init == "he_normal":
            _trunc_normal_tf_(self.conv.weight, std=math.sqrt(2.0 / in_channels))
        elif conv_init == "xavier_uniform":
            nn.init.xavier_uniform_(self.conv.weight)
        elif conv_init == "trunc_normal":
            _trunc_normal_tf_(self.conv.weight, std=0.02)
        else:
            raise ValueError(f"unknown conv_init {conv_init!r}")
        if bias:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm (``weight``, ``bias``; eps 1e-6) on (B, C, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.channels = int(channels)  # a Python int: an ONNX export keeps the normalised shape constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ pixel decoder
class RelativePositionalEncoding(nn.Module):
    """Learned 1-D relative position embeddings: a (2 * MAX_SPAN - 1, depth) table (``_embeddings``)
    indexed by ``key - query + MAX_SPAN - 1``; ``forward(length) -> (length, length, depth)``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self._embeddings = nn.Embedding(MAX_SPAN * 2 - 1, depth)
        _trunc_normal_tf_(self._embeddings.weight, std=1.0)

    def forward(self, length: int) -> torch.Tensor:
        if length > MAX_SPAN:
            raise ValueError(f"axial attention over {length} positions; at most {MAX_SPAN} are supported "
                             "(shrink the input)")
        pos = torch.arange(length, device=self._embeddings.weight.device)
        return self._embeddings.weight[pos[None, :] - pos[:, None] + MAX_SPAN - 1]


class AxialAttention(nn.Module):
    """1-D multi-head self-attention along the last axis of (N, C, L) with relative positional
    encodings on queries, keys and values (Axial-DeepLab / deeplab2 ``AxialAttention``): BN on qkv,
    BN on the three similarity terms (content, query-RPE, key-RPE) before summing them, softmax in
    float32, BN on the retrieved content and RPE values before summing them. Output (N, Dv, L)."""

    def __init__(self, in_planes: int, total_key_depth: int = 512, total_value_depth: int = 1024,
                 num_heads: int = 8) -> None:
        super().__init__()
        if total_key_depth % num_heads or total_value_depth % num_heads:
            raise ValueError("key / value depths must be divisible by num_heads")
        self._total_key_depth, self._total_value_depth, self._num_heads = total_key_depth, total_value_depth, num_heads
        qkv = 2 * total_key_depth + total_value_depth
        self.qkv_transform = ConvBN(in_planes, qkv, bias=False, norm=False, conv_type="1d")
        _trunc_normal_tf_(self.qkv_transform.conv.weight, std=in_planes ** -0.5)
        self._query_rpe = RelativePositionalEncoding(total_key_depth // num_heads)
        self._key_rpe = RelativePositionalEncoding(total_key_depth // num_heads)
        self._value_rpe = RelativePositionalEncoding(total_value_depth // num_heads)
        self._batch_norm_qkv = _bn1d(qkv)
        self._batch_norm_similarity = _bn2d(num_heads * 3)
        self._batch_norm_retrieved_output = _bn1d(total_value_depth * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, length = x.shape
        h = self._num_heads
        qkv = self._batch_norm_qkv(self.qkv_transform(x))
        q, k, v = qkv.split([self._total_key_depth, self._total_key_depth, self._total_value_depth], dim=1)
        q = q.reshape(n, h, -1, length)
        k = k.reshape(n, h, -1, length)
        v = v.reshape(n, h, -1, length)
        sim = torch.cat([torch.einsum("bhdl,bhdm->bhlm", q, k),
                         torch.einsum("bhdl,lmd->bhlm", q, self._query_rpe(length)),
                         torch.einsum("bhdm,lmd->bhlm", k, self._key_rpe(length))], dim=1)
        sim = self._batch_norm_similarity(sim).reshape(n, 3, h, length, length).sum(dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weights = sim.float().softmax(dim=-1)
        out = torch.cat([torch.einsum("bhlm,bhdm->bhdl", weights, v),
                         torch.einsum("bhlm,lmd->bhdl", weights, self._value_rpe(length))], dim=1)
        out = self._batch_norm_retrieved_output(out.reshape(n, 2 * self._total_value_depth, length))
        return out.reshape(n, 2, self._total_value_depth, length).sum(dim=1)


class AxialAttention2D(nn.Module):
    """Height-axis then width-axis :class:`AxialAttention` on (N, C, H, W) -> (N, Dv, H, W)."""

    def __init__(self, in_planes: int, filters: int = 512, key_expansion: float = 1, value_expansion: float = 2,
                 num_heads: int = 8) -> None:
        super().__init__()
        key_depth, value_depth = round(filters * key_expansion), round(filters * value_expansion)
        self._total_value_depth = value_depth
        self._height_axis = AxialAttention(in_planes, key_depth, value_depth, num_heads)
        self._width_axis = AxialAttention(value_depth, key_depth, value_depth, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        d = self._total_value_depth
        x = self._height_axis(x.permute(0, 3, 1, 2).reshape(n * w, c, h))  # (N W, D, H)
        x = x.reshape(n, w, d, h).permute(0, 3, 2, 1).reshape(n * h, d, w)
        x = self._width_axis(x)  # (N H, D, W)
        return x.reshape(n, h, d, w).permute(0, 2, 1, 3).contiguous()


class SingleBlock(nn.Module):
    """Residual block (deeplab2 ``axial_blocks``): ``x = gelu(x)``; branch = 1x1 ConvBN-GELU ->
    (axial attention -> GELU | 3x3 ConvBN-GELU) -> 1x1 ConvBN (gamma 0); shortcut = x or a 1x1
    ConvBN when the width changes; output = drop_path(branch) + shortcut (no final activation: the
    next block / fuse starts with GELU)."""

    def __init__(self, inplanes: int, filter_list: Sequence[int], block_type: str, key_expansion: float = 1,
                 value_expansion: float = 2, num_heads: int = 8, drop_path_prob: float = 0.0) -> None:
        super().__init__()
        self._block_type = block_type
        f0, f1, f2 = filter_list
        self._conv1_bn_act = ConvBN(inplanes, f0, bias=False, act="gelu")
        if block_type == "axial":
            self._attention = AxialAttention2D(f0, f1, key_expansion, value_expansion, num_heads)
            mid = round(f1 * value_expansion)
        elif block_type == "bottleneck":
            self._conv2_bn_act = ConvBN(f0, f1, kernel_size=3, padding=1, bias=False, act="gelu")
            mid = f1
        else:
            raise ValueError(f"block_type must be 'axial' or 'bottleneck', got {block_type!r}")
        self._conv3_bn = ConvBN(mid, f2, bias=False, norm_init=0.0)
        self._shortcut = ConvBN(inplanes, f2, bias=False) if inplanes != f2 else None
        self.drop_path = _drop_path(drop_path_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(x)
        shortcut = x if self._shortcut is None else self._shortcut(x)
        x = self._conv1_bn_act(x)
        if self._block_type == "axial":
            x = F.gelu(self._attention(x))
        else:
            x = self._conv2_bn_act(x)
        return self.drop_path(self._conv3_bn(x)) + shortcut


class BlockGroup(nn.Module):
    """``num_blocks`` :class:`SingleBlock`; widths (axial) [2f, f, 4f] / (bottleneck) [f, f, 4f] for
    ``base_filter`` f, so the output has 4f channels."""

    def __init__(self, inplanes: int, base_filter: int, num_blocks: int, block_type: str, **kwargs) -> None:
        super().__init__()
        if block_type == "axial":
            filter_list = [base_filter * 2, base_filter, base_filter * 4]
        else:
            filter_list = [base_filter, base_filter, base_filter * 4]
        self._blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self._blocks.append(SingleBlock(inplanes, filter_list, block_type, **kwargs))
            inplanes = filter_list[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._blocks:
            x = block(x)
        return x


class ResizedFuse(nn.Module):
    """Upsample the coarser decoder map (GELU + 1x1 ConvBN if its width differs, then bilinear;
    ``align_corners`` when its width is odd, as the port) and add the finer backbone map (GELU +
    1x1 ConvBN if its width differs)."""

    def __init__(self, low_in_channels: int, high_in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.low_in_channels, self.high_in_channels, self.out_channels = low_in_channels, high_in_channels, out_channels
        if low_in_channels != out_channels:
            self._conv_bn_low = ConvBN(low_in_channels, out_channels, bias=False)
        if high_in_channels != out_channels:
            self._conv_bn_high = ConvBN(high_in_channels, out_channels, bias=False)

    def forward(self, lowres_x: torch.Tensor, highres_x: torch.Tensor) -> torch.Tensor:
        align_corners = int(lowres_x.shape[-1]) % 2 == 1  # a python bool, also when traced for export
        if self.low_in_channels != self.out_channels:
            lowres_x = self._conv_bn_low(F.gelu(lowres_x))
        lowres_x = F.interpolate(lowres_x, size=highres_x.shape[-2:], mode="bilinear", align_corners=align_corners)
        if self.high_in_channels != self.out_channels:
            highres_x = self._conv_bn_high(F.gelu(highres_x))
        return lowres_x + highres_x


class KMaXPixelDecoder(nn.Module):
    """kMaX-DeepLab pixel decoder: strides 32 -> 16 -> 8 -> 4.

    Args:
        in_channels: channels of the backbone maps, finest -> coarsest (strides 4, 8, 16, 32),
            the order of ``Backbone(...).features``.
        dec_layers, dec_channels, layer_types: per decoder stage in *decoding* order (strides 32,
            16, 8, 4; the port's order): number of blocks, base width f (the stage outputs 4f
            channels) and block type (kMaX: [1, 5, 1, 1], [512, 256, 128, 64], axial, axial,
            bottleneck, bottleneck).
        num_heads: axial-attention heads (8; f must be divisible by it on axial stages).
        drop_path_prob: stochastic depth of every block's residual branch.

    Each backbone map is first normalised by a channels-first LayerNorm (``_in_norms``). Stage 0
    runs on the stride-32 map; stage i > 0 runs on ``ResizedFuse(stage i-1 output, map i)``.

    ``forward(features) -> (multi_scale_features, pixel_feature)``: the outputs of the stages at
    strides 32, 16, 8 (a list, coarsest first, ``out_channels[:3]``) and the stride-4 output
    (``out_channels[3]`` channels).
    """

    def __init__(self, in_channels: Sequence[int], dec_layers: Sequence[int] = (1, 5, 1, 1),
                 dec_channels: Sequence[int] = (512, 256, 128, 64),
                 layer_types: Sequence[str] = ("axial", "axial", "bottleneck", "bottleneck"),
                 num_heads: int = 8, drop_path_prob: float = 0.0) -> None:
        super().__init__()
        if not (len(in_channels) == len(dec_layers) == len(dec_channels) == len(layer_types) == 4):
            raise ValueError("in_channels, dec_layers, dec_channels and layer_types need 4 entries "
                             "(strides 4..32 for in_channels, 32..4 for the others)")
        if any(n < 1 for n in dec_layers):
            raise ValueError("every pixel-decoder stage needs at least one block")
        coarse_first = [int(c) for c in reversed(list(in_channels))]
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = [4 * int(c) for c in dec_channels]
        self._in_norms = nn.ModuleList()
        self._stages = nn.ModuleList()
        self._resized_fuses = nn.ModuleList()
        for i in range(4):
            self._in_norms.append(LayerNorm2d(coarse_first[i]))
            inplanes = coarse_first[i] if i == 0 else int(dec_channels[i])
            self._stages.append(BlockGroup(inplanes, int(dec_channels[i]), int(dec_layers[i]), str(layer_types[i]).lower(),
                                           key_expansion=1, value_expansion=2, num_heads=num_heads,
                                           drop_path_prob=drop_path_prob))
            if i > 0:
                self._resized_fuses.append(ResizedFuse(4 * int(dec_channels[i - 1]), coarse_first[i],
                                                       int(dec_channels[i])))

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        if len(features) != 4:
            raise ValueError(f"expected 4 backbone maps (strides 4, 8, 16, 32), got {len(features)}")
        feats = list(features)[::-1]  # coarsest first
        outs = []
        x = self._in_norms[0](feats[0])
        for i in range(4):
            if i > 0:
                x = self._resized_fuses[i - 1](x, self._in_norms[i](feats[i]))
            x = self._stages[i](x)
            outs.append(x)
        return outs[:3], outs[3]


# ------------------------------------------------------------------------ transformer decoder
def _void_bias(logits: torch.Tensor, void_prior_prob: float = 0.9) -> torch.Tensor:
    # deeplab2 ``add_bias_towards_void``: the void logit starts at log((C - 1) p / (1 - p)).
    c = logits.shape[-1]
    bias = torch.zeros(c, dtype=logits.dtype, device=logits.device)
    bias[-1] = math.log((c - 1) * void_prior_prob / (1 - void_prior_prob)) if c > 1 else 0.0
    return logits + bias


class KMaXPredictor(nn.Module):
    """Mask (and class) prediction from centre embeddings and a pixel map (port: ``kMaXPredictor``).

    Pixel head: depthwise 5x5 ConvBN-GELU -> 1x1 ConvBN-GELU (``pixel_head_dim``) -> 1x1 ConvBN
    (``mask_dim``, bias), L2-normalised over channels. Mask kernels: 1x1 ConvBN of the centres to
    ``mask_dim``. ``mask_logits = BN1(einsum(pixel, kernel))`` with a single-channel BN whose gamma
    starts at 0.1. Class head (optional): a 1x1 conv to ``num_classes`` (+ void already counted by
    the caller): one on all queries, or one per group of ``class_groups``; void-biased."""

    def __init__(self, in_channel_pixel: int, in_channel_query: int, mask_dim: int = 128,
                 pixel_head_dim: int = 256, class_dims: Sequence[int] | None = None,
                 class_groups: Sequence[int] | None = None) -> None:
        super().__init__()
        self._pixel_space_head_conv0bnact = ConvBN(in_channel_pixel, in_channel_pixel, kernel_size=5, padding=2,
                                                   groups=in_channel_pixel, bias=False, act="gelu",
                                                   conv_init="xavier_uniform")
        self._pixel_space_head_conv1bnact = ConvBN(in_channel_pixel, pixel_head_dim, bias=False, act="gelu")
        self._pixel_space_head_last_convbn = ConvBN(pixel_head_dim, mask_dim, bias=True)
        _trunc_normal_tf_(self._pixel_space_head_last_convbn.conv.weight, std=0.01)
        self._transformer_mask_head = ConvBN(in_channel_query, mask_dim, bias=False, conv_type="1d")
        self.class_groups = None if class_groups is None else [int(g) for g in class_groups]
        self._transformer_class_head: nn.Module | None = None
        if class_dims is not None:
            heads = [ConvBN(in_channel_query, int(c), norm=False, conv_type="1d") for c in class_dims]
            for head in heads:
                _trunc_normal_tf_(head.conv.weight, std=0.01)
            if self.class_groups is None:
                if len(heads) != 1:
                    raise ValueError("several class heads need class_groups")
                self._transformer_class_head = heads[0]
            else:
                if len(heads) != len(self.class_groups):
                    raise ValueError("one class head per class group")
                self._transformer_class_head = nn.ModuleList(heads)
        self._pixel_space_mask_batch_norm = _bn1d(1)
        nn.init.constant_(self._pixel_space_mask_batch_norm.weight, 0.1)

    def forward(self, mask_embeddings: torch.Tensor, class_embeddings: torch.Tensor | None,
                pixel_feature: torch.Tensor) -> dict:
        """``mask_embeddings`` / ``class_embeddings`` (B, C, Q), ``pixel_feature`` (B, C_p, h, w).
        Returns ``mask_logits`` (B, Q, h, w), ``pixel_feature`` (B, mask_dim, h, w) unit-norm,
        ``mask_kernel`` (B, mask_dim, Q) and, with a class head, ``class_logits``."""
        pixel = self._pixel_space_head_conv0bnact(pixel_feature)
        pixel = self._pixel_space_head_conv1bnact(pixel)
        pixel = F.normalize(self._pixel_space_head_last_convbn(pixel), p=2, dim=1)
        kernel = self._transformer_mask_head(mask_embeddings)  # (B, D, Q)
        logits = torch.einsum("bchw,bcn->bnhw", pixel, kernel)
        b, q, h, w = logits.shape
        logits = self._pixel_space_mask_batch_norm(logits.reshape(b, 1, q * h * w)).reshape(b, q, h, w)
        out = {"mask_logits": logits, "pixel_feature": pixel, "mask_kernel": kernel}
        head = self._transformer_class_head
        if head is not None:
            if isinstance(head, nn.ModuleList):
                out["class_logits"] = [_void_bias(hd(e).transpose(1, 2))
                                       for hd, e in zip(head, class_embeddings.split(self.class_groups, dim=-1))]
            else:
                out["class_logits"] = _void_bias(head(class_embeddings).transpose(1, 2))
        return out


class KMaXTransformerLayer(nn.Module):
    """One kMaX block (port: ``kMaXTransformerLayer``) on centres (B, D, Q) and a pixel map.

    ``pixel_space = ConvBN-GELU(gelu(pixel))``, ``query_space = ConvBN-GELU(centres)`` (bottleneck
    width); the predictor makes masks from them; k-means cross-attention of the mask logits
    (:func:`kmeans_cross_attention`, within the query groups) over ``ConvBN(pixel_space)`` values
    -> BN -> 1x1 ConvBN (gamma 0) -> residual; self-attention among the queries (qkv from
    ``query_space``, 1-D BN on the similarities, float32 softmax, BN + GELU on the result) -> 1x1
    ConvBN (gamma 0) -> residual -> GELU; FFN (ConvBN-GELU, ConvBN gamma 0) -> residual -> GELU.
    Returns the updated centres and the predictor's output (made *before* the update)."""

    def __init__(self, in_channel_pixel: int, in_channel_query: int = 256, base_filters: int = 128,
                 num_heads: int = 8, bottleneck_expansion: float = 2, key_expansion: float = 1,
                 value_expansion: float = 2, dim_feedforward: int = 2048, mask_dim: int = 128,
                 pixel_head_dim: int = 256, class_dims: Sequence[int] | None = None,
                 query_groups: Sequence[int] | None = None, class_groups: Sequence[int] | None = None,
                 drop_path_prob: float = 0.0) -> None:
        super().__init__()
        self._num_heads = num_heads
        self._bottleneck_channels = round(base_filters * bottleneck_expansion)
        self._total_key_depth = round(base_filters * key_expansion)
        self._total_value_depth = round(base_filters * value_expansion)
        if self._total_key_depth % num_heads or self._total_value_depth % num_heads:
            raise ValueError("key / value depths of the kMaX block must be divisible by num_heads")
        self.query_groups = None if query_groups is None else [int(g) for g in query_groups]
        self.drop_path_kmeans = _drop_path(drop_path_prob)
        self.drop_path_attn = _drop_path(drop_path_prob)
        self.drop_path_ffn = _drop_path(drop_path_prob)
        bott, kd, vd = self._bottleneck_channels, self._total_key_depth, self._total_value_depth
        std = bott ** -0.5
        self._query_conv1_bn_act = ConvBN(in_channel_query, bott, bias=False, act="gelu", conv_type="1d")
        self._pixel_conv1_bn_act = ConvBN(in_channel_pixel, bott, bias=False, act="gelu")
        self._query_qkv_conv_bn = ConvBN(bott, 2 * kd + vd, bias=False, conv_type="1d")
        _trunc_normal_tf_(self._query_qkv_conv_bn.conv.weight, std=std)
        self._pixel_v_conv_bn = ConvBN(bott, vd, bias=False)
        _trunc_normal_tf_(self._pixel_v_conv_bn.conv.weight, std=std)
        self._query_self_attention = nn.Module()  # port: AttentionOperation (two BNs, no weights)
        self._query_self_attention._batch_norm_similarity = _bn2d(num_heads)
        self._query_self_attention._batch_norm_retrieved_value = _bn1d(vd)
        self._query_conv3_bn = ConvBN(vd, in_channel_query, bias=False, conv_type="1d", norm_init=0.0)
        self._query_ffn_conv1_bn_act = ConvBN(in_channel_query, dim_feedforward, bias=False, act="gelu",
                                              conv_type="1d")
        self._query_ffn_conv2_bn = ConvBN(dim_feedforward, in_channel_query, bias=False, conv_type="1d",
                                          norm_init=0.0)
        self._predcitor = KMaXPredictor(bott, bott, mask_dim, pixel_head_dim, class_dims, class_groups)
        self._kmeans_query_batch_norm_retrieved_value = _bn1d(vd)
        self._kmeans_query_conv3_bn = ConvBN(vd, in_channel_query, bias=False, conv_type="1d", norm_init=0.0)

    def _self_attention(self, query_space: torch.Tensor) -> torch.Tensor:
        b, _, q = query_space.shape
        h = self._num_heads
        qkv = self._query_qkv_conv_bn(query_space)
        qq, kk, vv = qkv.split([self._total_key_depth, self._total_key_depth, self._total_value_depth], dim=1)
        sim = torch.einsum("bhdl,bhdm->bhlm", qq.reshape(b, h, -1, q), kk.reshape(b, h, -1, q))
        sim = self._query_self_attention._batch_norm_similarity(sim)
        with torch.autocast(device_type=query_space.device.type, enabled=False):
            weights = sim.float().softmax(dim=-1)
        out = torch.einsum("bhlm,bhdm->bhdl", weights, vv.reshape(b, h, -1, q)).reshape(b, -1, q)
        return F.gelu(self._query_self_attention._batch_norm_retrieved_value(out))

    def forward(self, pixel_feature: torch.Tensor, query_feature: torch.Tensor) -> tuple[torch.Tensor, dict]:
        pixel_space = self._pixel_conv1_bn_act(F.gelu(pixel_feature))
        query_space = self._query_conv1_bn_act(query_feature)
        pixel_value = self._pixel_v_conv_bn(pixel_space).flatten(2)  # (B, Dv, HW)
        prediction = self._predcitor(query_space, query_space, pixel_space)
        # k-means cross-attention (Eq. 4): hard assignment of each pixel to one centre per group.
        update = kmeans_cross_attention(prediction["mask_logits"].flatten(2), pixel_value.transpose(1, 2),
                                        self.query_groups).transpose(1, 2)  # (B, Dv, Q) float32
        update = self._kmeans_query_conv3_bn(self._kmeans_query_batch_norm_retrieved_value(update))
        query_feature = query_feature + self.drop_path_kmeans(update)
        query_feature = query_feature + self.drop_path_attn(self._query_conv3_bn(self._self_attention(query_space)))
        query_feature = F.gelu(query_feature)
        ffn = self._query_ffn_conv2_bn(self._query_ffn_conv1_bn_act(query_feature))
        query_feature = F.gelu(query_feature + self.drop_path_ffn(ffn))
        return query_feature, prediction


class KMaXTransformerDecoder(nn.Module):
    """kMaX-DeepLab transformer decoder with optional query groups (CoCal's part / object levels).

    Args:
        in_channels: channels of the decoder maps at strides 32, 16, 8 and of the stride-4 pixel
            map (port: [2048, 1024, 512, 256] = ``KMaXPixelDecoder.out_channels``).
        num_queries: number of cluster centres (kMaX: 128); default ``sum(query_groups)`` with
            groups, else 128.
        dec_layers: kMaX blocks on strides 32, 16, 8 (kMaX: [2, 2, 2]).
        hidden_dim: centre width (256); base_filters: block width unit (128: bottleneck 2x,
            keys 1x, values 2x); num_heads: self-attention heads (8); dim_feedforward: FFN width
            (2048); mask_dim: pixel-embedding / mask-kernel width (128); pixel_head_dim: hidden
            width of the pixel head (256).
        query_groups: sizes of consecutive query groups (e.g. ``[P, P_obj]``); the k-means
            argmax runs within each group. ``None``: one group.
        num_classes: ``None`` = no class head (CoCal dictionary mode: each component is a class);
            an int = one head on all queries (``num_classes + 1`` logits, last = void); a
            sequence = one head per group (``num_classes[g] + 1`` logits each).
        drop_path_prob: stochastic depth in the kMaX blocks (port config: 0.2 for COCO).

    ``forward(multi_scale_features, pixel_feature)``: the three maps at strides 32, 16, 8 (coarsest
    first) and the stride-4 map, as returned by :class:`KMaXPixelDecoder`. Returns the dict
    described in the module docstring.
    """

    def __init__(self, in_channels: Sequence[int] = (2048, 1024, 512, 256), num_queries: int | None = None,
                 dec_layers: Sequence[int] = (2, 2, 2), hidden_dim: int = 256, base_filters: int = 128,
                 num_heads: int = 8, dim_feedforward: int = 2048, mask_dim: int = 128, pixel_head_dim: int = 256,
                 query_groups: Sequence[int] | None = None, num_classes: int | Sequence[int] | None = None,
                 drop_path_prob: float = 0.0) -> None:
        super().__init__()
        if len(in_channels) != 4 or len(dec_layers) != 3:
            raise ValueError("in_channels needs 4 entries (strides 32, 16, 8 and the stride-4 pixel map), "
                             "dec_layers 3 (strides 32, 16, 8)")
        if any(n < 0 for n in dec_layers):
            raise ValueError("dec_layers must be >= 0")
        if num_queries is None:
            num_queries = 128 if query_groups is None else sum(int(g) for g in query_groups)
        self.num_queries = int(num_queries)
        self.query_groups = _check_groups(query_groups, self.num_queries)
        groups = None if query_groups is None else self.query_groups
        class_dims: list[int] | None = None
        class_groups: list[int] | None = None  # None: one class head shared by all queries
        if isinstance(num_classes, int):
            class_dims = [int(num_classes) + 1]
        elif num_classes is not None:
            if len(num_classes) != len(self.query_groups):
                raise ValueError(f"num_classes {list(num_classes)} needs one entry per query group {self.query_groups}")
            class_dims, class_groups = [int(c) + 1 for c in num_classes], self.query_groups
        self.num_classes = num_classes
        self._num_blocks = [int(n) for n in dec_layers]
        self._kmax_transformer_layers = nn.ModuleList()
        for index in range(3):
            for _ in range(self._num_blocks[index]):
                self._kmax_transformer_layers.append(KMaXTransformerLayer(
                    in_channel_pixel=int(in_channels[index]), in_channel_query=hidden_dim, base_filters=base_filters,
                    num_heads=num_heads, dim_feedforward=dim_feedforward, mask_dim=mask_dim,
                    pixel_head_dim=pixel_head_dim, class_dims=class_dims, query_groups=groups,
                    class_groups=class_groups, drop_path_prob=drop_path_prob))
        self._cluster_centers = nn.Embedding(hidden_dim, self.num_queries)  # port layout: (D, Q)
        _trunc_normal_tf_(self._cluster_centers.weight, std=1.0)
        self._class_embedding_projection = None if class_dims is None else ConvBN(
            hidden_dim, hidden_dim, bias=False, act="gelu", conv_type="1d")
        self._mask_embedding_projection = ConvBN(hidden_dim, hidden_dim, bias=False, act="gelu", conv_type="1d")
        self._predcitor = KMaXPredictor(int(in_channels[3]), hidden_dim, mask_dim, pixel_head_dim, class_dims,
                                        class_groups)

    @staticmethod
    def _to_output(pred: dict, groups: list[int]) -> dict:
        out = {"pred_masks": pred["mask_logits"], "cluster_centres": pred["mask_kernel"].transpose(1, 2),
               "pixel_feature": pred["pixel_feature"], "query_groups": list(groups)}
        if "class_logits" in pred:
            out["pred_logits"] = pred["class_logits"]
        return out

    def forward(self, multi_scale_features: Sequence[torch.Tensor], pixel_feature: torch.Tensor) -> dict:
        if len(multi_scale_features) != 3:
            raise ValueError(f"expected 3 decoder maps (strides 32, 16, 8), got {len(multi_scale_features)}")
        b = pixel_feature.shape[0]
        centres = self._cluster_centers.weight.unsqueeze(0).expand(b, -1, -1)  # (B, D, Q)
        predictions, layer = [], 0
        for index, feat in enumerate(multi_scale_features):
            for _ in range(self._num_blocks[index]):
                centres, pred = self._kmax_transformer_layers[layer](feat, centres)
                predictions.append(pred)
                layer += 1
        class_embeddings = None if self._class_embedding_projection is None else \
            self._class_embedding_projection(centres)
        final = self._predcitor(self._mask_embedding_projection(centres), class_embeddings, pixel_feature)

        out = self._to_output(final, self.query_groups)
        size = final["mask_logits"].shape[-2:]
        align_corners = int(size[0]) % 2 == 1
        aux = []
        for pred in predictions:
            entry = self._to_output(pred, self.query_groups)
            for key in ("pred_masks", "pixel_feature"):
                entry[key] = F.interpolate(entry[key], size=size, mode="bilinear", align_corners=align_corners)
            aux.append(entry)
        out["aux_outputs"] = aux
        return out
