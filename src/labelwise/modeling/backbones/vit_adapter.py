"""ViT-Adapter: a multi-scale encoder around a plain (pretrained) ViT :class:`Backbone`.

References
----------
* ViT-Adapter: Chen, Duan, Wang, He, Lu, Dai, Qiao, "Vision Transformer Adapter for Dense
  Predictions", ICLR 2023 (arXiv:2205.08534) -- spatial prior module (Sec. 3.2), spatial
  feature injector (Sec. 3.3, Eq. 1, learnable ``gamma`` initialised to 0), multi-scale
  feature extractor with ConvFFN (Sec. 3.4, Eq. 2-3); public release
  ``czczup/ViT-Adapter`` (``segmentation/mmseg_custom/models/backbones/adapter_modules.py``,
  ``vit_adapter.py``), whose module and parameter names are kept here.
* OAP: "Online Agglomerative Pooling for Scalable Self-Supervised Universal Segmentation",
  Sec. 4.3 "Multi-scale Encoder and Zero-initialization": ViT-Adapter is the multi-scale
  encoder and "we zero-initialize the adapter parameters so that OAP can generate
  meaningful masks during the early stages of training" -- OAP pools the last block's
  attention *keys*, so at step 0 they must be those of the plain pretrained ViT.

Data flow (``ViTAdapter.forward``)::

    image --normalise--> spatial prior module (conv stem) -> c1 (s4), c = [c2 (s8), c3 (s16), c4 (s32)]
          \\-> ViT patch embed + pos embed -> x
    for each interaction i (a contiguous group of ViT blocks):
        x = x + gamma_i * MSDeformAttn(x -> c)          # injector (patch tokens only)
        x = blocks[start_i .. end_i](x)                 # the ViT's own blocks, unchanged
        c = c + MSDeformAttn(c -> x); c = c + ConvFFN(c) # extractor
    features = BN([up(c2) + c1, c2, c3, c4] (+ the ViT grid resized to each level))

Zero-initialisation (what OAP's "zero-initialize the adapter parameters" amounts to): the
only adapter parameters on the ViT's path are the injectors' ``gamma`` vectors
(``init_values=0.0``). With every ``gamma == 0`` the injector adds exactly ``0`` to the
tokens, so every ViT block, the final norm, the ``tokens`` and the last block's ``keys``
are bit-identical to the plain :class:`Backbone` on the same input (the injection is cast
to the residual stream's dtype so that autocast cannot change it either). The other
adapter parameters (spatial prior module, deformable attention, ConvFFN, level
embeddings, output norms) keep ViT-Adapter's random initialisation: they only feed the
multi-scale ``features``, and zeroing them as well would leave them without gradient
(``gamma``'s gradient is ``sum(dL/dx * attn)``, which needs a non-zero injector output,
and the injector's gradient is scaled by ``gamma``). ``gamma`` gets a non-zero gradient
from step 0 and the injectors train from step 1 on.

Differences from the public release (all forced by labelwise's :class:`Backbone`): any
patch size and input size (the ViT grid is ``H/p x W/p``; the spatial-prior levels are
``ceil(H/s) x ceil(W/s)``, and deformable attention uses normalised coordinates, so the
two need not be aligned; the ViT grid added to the levels is resized to each level's size
instead of scaled by 4 / 2 / 1 / 0.5); prefix tokens (class token, registers) bypass the
injector and the extractor, like ViT-Adapter's BEiT variant; ``BatchNorm2d`` instead of
``SyncBatchNorm`` (convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP);
the deformable attention is labelwise's pure-PyTorch :class:`MSDeformAttn` (no value
``deform_ratio``, i.e. the release's default ``1.0``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import LabelwiseError
from labelwise.modeling.backbones.backbone import (
    PYRAMID_STRIDES,
    Backbone,
    BackboneOutput,
)
from labelwise.modeling.decoders.msdeform import MSDeformAttn

__all__ = [
    "ConvFFN", "Extractor", "Injector", "InteractionBlock", "SpatialPriorModule", "ViTAdapter",
    "default_interaction_indexes",
]

ADAPTER_STRIDES = (8, 16, 32)  # spatial-prior levels the injector / extractor exchange with the ViT


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # ViT-Adapter's norm_layer (timm ViT's)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _reference_points(shapes: Sequence[tuple[int, int]], device, dtype=torch.float32) -> Tensor:
    """Pixel centres of each ``(h, w)`` grid, normalised ``(x, y)`` in [0, 1], concatenated
    row-major over the grids -> ``(1, sum h*w, 1, 2)`` (one level broadcast by the caller)."""
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([gx.reshape(-1), gy.reshape(-1)], -1))
    return torch.cat(refs, 0)[None, :, None]


def _shapes_tensor(shapes: Sequence[tuple[int, int]], device) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(shapes, dtype=torch.long, device=device)
    start = torch.cat([t.new_zeros(1), (t[:, 0] * t[:, 1]).cumsum(0)[:-1]])
    return t, start


def default_interaction_indexes(depth: int, groups: int = 4) -> list[list[int]]:
    """``groups`` (at most ``depth``) contiguous, near-equal ``[start, end]`` (inclusive) block
    ranges covering all blocks -- ViT-Adapter's ``[[0, 2], [3, 5], [6, 8], [9, 11]]`` for 12."""
    g = max(1, min(int(groups), int(depth)))
    bounds = [round(i * depth / g) for i in range(g + 1)]
    return [[bounds[i], bounds[i + 1] - 1] for i in range(g)]


# --------------------------------------------------------------------------- modules


class SpatialPriorModule(nn.Module):
    """ViT-Adapter Sec. 3.2: a ResNet-like conv stem giving ``c1`` (stride 4) and ``c2`` /
    ``c3`` / ``c4`` (strides 8 / 16 / 32), each projected to ``embed_dim`` by a 1x1 conv
    (``fc1``..``fc4``). Every conv has stride 2 / padding 1 or stride 1, so level ``s`` is
    ``ceil(H/s) x ceil(W/s)``."""

    def __init__(self, inplanes: int = 64, embed_dim: int = 384):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x``: normalised image -> ``(c1, c2, c3, c4)`` as ``B x embed_dim x h_s x w_s``."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


class DWConv(nn.Module):
    """3x3 depth-wise conv applied to each level of a flattened multi-level token sequence
    (the release splits by ``N // 21``; here the level shapes are passed explicitly, so any
    input size works)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        B, _, C = x.shape
        out = []
        for part, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes):
            g = part.transpose(1, 2).reshape(B, C, h, w)
            out.append(self.dwconv(g).flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """ViT-Adapter Sec. 3.4: ``fc2(drop(GELU(DWConv(fc1(x)))))`` over the multi-level tokens."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), shapes)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """Spatial feature injector (ViT-Adapter Sec. 3.3, Eq. 1):
    ``x + gamma * MSDeformAttn(LN(x), LN(c))`` with the ViT patch tokens as queries and the
    three spatial-prior levels as values. ``gamma`` (``dim``) starts at ``init_values``
    (``0``): the ViT's token stream is then untouched (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, n_levels: int = 3,
                 init_values: float = 0.0):
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query: Tensor, reference_points: Tensor, feat: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor) -> Tensor:
        attn = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes,
                         level_start_index, None)
        # Keep the residual stream's dtype: a float32 ``gamma * attn`` would promote a
        # reduced-precision token stream and change its rounding even at gamma == 0.
        return query + (self.gamma * attn).to(query.dtype)


class Extractor(nn.Module):
    """Multi-scale feature extractor (ViT-Adapter Sec. 3.4, Eq. 2-3): the spatial-prior tokens
    ``c`` query the ViT patch tokens (one level) by deformable attention, then a ConvFFN;
    both residual."""

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, with_cffn: bool = True,
                 cffn_ratio: float = 0.25, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=1, n_heads=num_heads, n_points=n_points)
        self.with_cffn = bool(with_cffn)
        if self.with_cffn:
            from timm.layers import DropPath

            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = _layer_norm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query: Tensor, reference_points: Tensor, feat: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, query_shapes: Sequence[tuple[int, int]]) -> Tensor:
        attn = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes,
                         level_start_index, None)
        query = query + attn
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))
        return query


class InteractionBlock(nn.Module):
    """Injector -> a group of the ViT's blocks -> extractor (-> 2 extra extractors in the last
    interaction, the release's ``use_extra_extractor``). The ViT blocks are not owned here
    (they stay at their upstream state-dict names); ``forward`` receives them."""

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, with_cffn: bool = True,
                 cffn_ratio: float = 0.25, init_values: float = 0.0, drop: float = 0.0, drop_path: float = 0.0,
                 extra_extractor: bool = False):
        super().__init__()
        self.injector = Injector(dim, num_heads=num_heads, n_points=n_points, n_levels=3, init_values=init_values)
        kw = dict(num_heads=num_heads, n_points=n_points, with_cffn=with_cffn, cffn_ratio=cffn_ratio, drop=drop,
                  drop_path=drop_path)
        self.extractor = Extractor(dim, **kw)
        self.extra_extractor = bool(extra_extractor)
        if self.extra_extractor:
            self.extra_extractors = nn.Sequential(*[Extractor(dim, **kw) for _ in range(2)])

    def forward(self, x: Tensor, c: Tensor, blocks: Sequence[nn.Module], num_prefix_tokens: int,
                inj: tuple, ext: tuple) -> tuple[Tensor, Tensor]:
        """``x``: ``B x (P + h*w) x D`` ViT tokens (prefix first); ``c``: ``B x S x D``
        spatial-prior tokens; ``inj`` / ``ext``: (reference points, shapes, start index[, query
        shapes]) of the injector / extractor."""
        P = num_prefix_tokens
        # Prefix tokens (class token, registers) have no position: only patches are injected.
        patches = self.injector(x[:, P:], inj[0], c, inj[1], inj[2])
        x = torch.cat([x[:, :P], patches], dim=1) if P else patches
        for blk in blocks:
            x = blk(x)
        feat = x[:, P:]
        c = self.extractor(c, ext[0], feat, ext[1], ext[2], ext[3])
        if self.extra_extractor:
            for ex in self.extra_extractors:
                c = ex(c, ext[0], feat, ext[1], ext[2], ext[3])
        return x, c


# --------------------------------------------------------------------------- encoder


class ViTAdapter(nn.Module):
    """ViT-Adapter multi-scale encoder around a ViT :class:`Backbone` (OAP Sec. 4.3).

    Args:
        vit: a ViT :class:`Backbone` (``create_backbone("dino_vitb8", weights=...)``). It is
            kept as the submodule ``vit``, so its parameters are ``vit.model.<timm name>``
            and ``adapter.vit.load_state_dict(...)`` / ``create_backbone(weights=...)`` load
            official ViT weights unchanged.
        interaction_indexes: ``[start, end]`` (inclusive) block ranges, one per interaction;
            contiguous and covering every block (the ViT must run whole). Default: 4 near-equal
            groups (:func:`default_interaction_indexes`).
        conv_inplanes: width of the spatial prior module's stem (64).
        n_points / deform_num_heads: deformable attention points per head per level / heads
            (4 / 6; ``embed_dim`` must be divisible by ``deform_num_heads``).
        init_values: initial value of the injectors' ``gamma`` (``0.0`` = OAP's
            zero-initialisation: the ViT, its ``tokens`` and ``keys`` are exactly the plain
            backbone's until ``gamma`` moves).
        with_cffn / cffn_ratio: ConvFFN in the extractors and its hidden ratio (True / 0.25).
        add_vit_feature: add the ViT's last-block patch grid (resized) to every level (True).
        use_extra_extractor: two more extractors after the last interaction (the release's
            default, True).
        drop_path: stochastic depth of the extractors' ConvFFN (0).

    ``forward(x)`` (``B x 3 x H x W`` RGB in [0, 1], normalised with the ViT's statistics)
    returns a :class:`BackboneOutput` with ``features`` (``B x embed_dim`` maps at strides
    4 / 8 / 16 / 32, ``ceil(H/s) x ceil(W/s)``), ``tokens`` (``B x D x h x w`` ViT patch
    tokens after the final norm), ``cls`` and ``keys`` (``B x h x w x D``, the last block's
    attention keys), the latter three exactly as ``Backbone(x, return_keys=True)`` computes
    them. Train-mode BatchNorm needs more than one value per channel at stride 32 (batch
    size > 1 or inputs of at least 64 px).
    """

    def __init__(self, vit: Backbone, interaction_indexes: Sequence[Sequence[int]] | None = None,
                 conv_inplanes: int = 64, n_points: int = 4, deform_num_heads: int = 6, init_values: float = 0.0,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, add_vit_feature: bool = True,
                 use_extra_extractor: bool = True, drop_path: float = 0.0):
        super().__init__()
        if not isinstance(vit, Backbone) or not vit.is_vit:
            raise LabelwiseError("ViTAdapter needs a ViT backbone (create_backbone('vit_*' / 'dino_*' / 'deit_*')), "
                                 f"got {getattr(vit, 'name', type(vit).__name__)}")
        D = vit.embed_dim
        if D % deform_num_heads:
            raise LabelwiseError(f"ViTAdapter: embed_dim {D} of '{vit.name}' is not divisible by "
                                 f"deform_num_heads={deform_num_heads}")
        depth = vit.depth
        idx = [list(map(int, r)) for r in (interaction_indexes or default_interaction_indexes(depth))]
        expect = 0
        for r in idx:
            if len(r) != 2 or r[0] != expect or r[1] < r[0]:
                raise LabelwiseError(f"ViTAdapter: interaction_indexes {idx} must be contiguous inclusive "
                                     f"[start, end] ranges starting at block 0")
            expect = r[1] + 1
        if expect != depth:
            raise LabelwiseError(f"ViTAdapter: interaction_indexes {idx} must cover all {depth} blocks of '{vit.name}'")
        self.vit = vit
        self.interaction_indexes = idx
        self.add_vit_feature = bool(add_vit_feature)
        self.embed_dim = D
        self.patch_size = vit.patch_size
        self.num_heads = vit.num_heads
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.depth = depth
        self.strides = list(PYRAMID_STRIDES)
        self.channels = [D] * len(self.strides)
        self.is_vit = True
        self.name = f"vit_adapter({vit.name})"

        self.level_embed = nn.Parameter(torch.zeros(len(ADAPTER_STRIDES), D))
        self.spm = SpatialPriorModule(inplanes=conv_inplanes, embed_dim=D)
        self.interactions = nn.Sequential(*[
            InteractionBlock(D, num_heads=deform_num_heads, n_points=n_points, with_cffn=with_cffn,
                             cffn_ratio=cffn_ratio, init_values=init_values, drop_path=drop_path,
                             extra_extractor=use_extra_extractor and i == len(idx) - 1)
            for i in range(len(idx))])
        self.up = nn.ConvTranspose2d(D, D, 2, 2)
        self.norm1 = nn.BatchNorm2d(D)
        self.norm2 = nn.BatchNorm2d(D)
        self.norm3 = nn.BatchNorm2d(D)
        self.norm4 = nn.BatchNorm2d(D)
        self.reset_adapter_parameters(init_values)

    # ------------------------------------------------------------------ init
    def reset_adapter_parameters(self, init_values: float = 0.0) -> None:
        """ViT-Adapter's initialisation of every adapter parameter (the ViT is not touched):
        Linear trunc-normal(0.02) / zero bias, norms 1 / 0, convs He-normal (fan-out) / zero
        bias, MSDeformAttn its own (Deformable DETR) init, ``level_embed`` N(0, 1), and
        ``gamma = init_values`` (0: the ViT path is exactly the plain ViT's)."""
        for mod in (self.spm, self.interactions, self.up, self.norm1, self.norm2, self.norm3, self.norm4):
            mod.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        for m in self.modules():
            if isinstance(m, Injector):
                nn.init.constant_(m.gamma, float(init_values))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def adapter_parameters(self):
        """``(name, parameter)`` of everything but the wrapped ViT (e.g. for a separate lr)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("vit.")]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, return_keys: bool = True) -> BackboneOutput:
        """``x``: ``B x 3 x H x W`` RGB floats in [0, 1] (see the class docstring)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W image tensor, got shape {tuple(x.shape)}")
        vit, m = self.vit, self.vit.model
        x = vit.normalize(x)
        p = self.patch_size
        x = vit.pad_to_patch(x)                      # as Backbone: identical ViT input
        H, W_ = x.shape[-2:]
        h, w = H // p, W_ // p
        B, P, dev = x.shape[0], self.num_prefix_tokens, x.device

        # Spatial prior (ViT-Adapter Sec. 3.2) + level embeddings.
        c1, c2, c3, c4 = self.spm(x)
        lvl_shapes = [tuple(t.shape[-2:]) for t in (c2, c3, c4)]
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[i].to(t.dtype)
                       for i, t in enumerate((c2, c3, c4))], dim=1)
        # Injector: ViT patch tokens (grid h x w) -> the 3 levels; extractor: levels -> grid.
        lvl_t, lvl_start = _shapes_tensor(lvl_shapes, dev)
        inj = (_reference_points([(h, w)], dev).expand(B, -1, len(lvl_shapes), -1), lvl_t, lvl_start)
        vit_t, vit_start = _shapes_tensor([(h, w)], dev)
        ext = (_reference_points(lvl_shapes, dev).expand(B, -1, 1, -1), vit_t, vit_start, lvl_shapes)

        captured: dict[str, Tensor] = {}
        handle = None
        if return_keys:
            handle = m.blocks[self.depth - 1].attn.qkv.register_forward_hook(
                lambda _mod, _inp, out: captured.__setitem__("qkv", out))
        try:
            # Exactly Backbone._forward_vit's token path (the blocks run in the interactions).
            t = m.patch_embed(x)
            t = m._pos_embed(t)
            t = m.patch_drop(t)
            t = m.norm_pre(t)
            for layer, (s, e) in zip(self.interactions, self.interaction_indexes):
                t, c = layer(t, c, m.blocks[s:e + 1], P, inj, ext)
            last = t
            t = m.norm(t)
        finally:
            if handle is not None:
                handle.remove()
        tokens = vit._grid(t, h, w)
        cls = t[:, 0] if getattr(m, "cls_token", None) is not None else None
        keys = None
        if return_keys:
            qkv = captured["qkv"]
            a = qkv.shape[-1] // 3
            keys = qkv[:, P:, a:2 * a].reshape(B, h, w, a)

        # Split the levels back to maps; stride 4 = up(stride 8) + the stem's c1.
        D = self.embed_dim
        c2, c3, c4 = [part.transpose(1, 2).reshape(B, D, hh, ww)
                      for part, (hh, ww) in zip(c.split([hh * ww for hh, ww in lvl_shapes], dim=1), lvl_shapes)]
        up = self.up(c2)
        # 2 * ceil(H/8) >= ceil(H/4): crop the extra row / column of odd stride-4 sizes.
        c1 = c1 + up[..., :c1.shape[-2], :c1.shape[-1]]
        maps = [c1, c2, c3, c4]
        if self.add_vit_feature:
            grid = vit._grid(last, h, w)  # last block's output before the final norm, as the release
            maps = [f + (grid if tuple(f.shape[-2:]) == (h, w) else
                         F.interpolate(grid, size=f.shape[-2:], mode="bilinear", align_corners=False)).to(f.dtype)
                    for f in maps]
        feats = [norm(f) for norm, f in zip((self.norm1, self.norm2, self.norm3, self.norm4), maps)]
        return BackboneOutput(features=feats, tokens=tokens, cls=cls, keys=keys)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, interaction_indexes={self.interaction_indexes}, "
                f"add_vit_feature={self.add_vit_feature}")
