"""Class activation maps: a CAM classifier head, multi-scale CAM inference, CAM -> labels.

Conventions (see ``docs/architecture.md``): CAM tensors have one channel per *foreground*
class, in the order of the image-level ``tags`` (``tags[c - 1]`` is class ``c``); label
maps use 0 for background and 255 for "uncertain / ignore".

* :class:`CAMHead` is a 1x1-conv classifier. Because global average pooling (GAP) is
  linear it commutes with the 1x1 conv: ``GAP(W * F) = W * GAP(F)``. So the image logits of
  the ``"gap"`` head are exactly the spatial mean of its per-class maps, i.e. the maps are
  the CAMs of Zhou et al. (2016) of that classifier (CoBra, Sec. 3.2: CAM then GAP). With
  ``"gmp"`` (global max pooling, SeCo/ToCo) the logits are the spatial max of the maps;
  with ``"gwrp"`` (global weighted rank pooling, Kolesnikov & Lampert 2016) they are a
  rank-weighted mean with weights ``decay**rank``. With ``bias=True`` the bias is added
  to every map location, so the identity still holds (the maps include the bias).
* :func:`multiscale_cam` sums ReLU'd CAMs over scales and horizontal flips at the input
  size, then max-normalises each class map to [0, 1] (the standard test-time CAM of
  IRN/ToCo/SeCo/CoBra).
* :func:`cam_to_label` and :func:`cam_seeds` turn normalised CAMs into label maps with a
  background threshold, or with a (low, high) pair that leaves the band in between as
  255 (uncertain), as ToCo/SeCo do (``low < cam <= high`` is uncertain).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CAMHead", "cam_from_features", "max_norm", "min_max_norm", "multiscale_cam", "cam_to_label", "cam_seeds",
           "CAM_NORMS", "FLIP_REDUCTIONS"]

POOLINGS = ("gap", "gmp", "gwrp")


class CAMHead(nn.Module):
    """1x1-conv classifier producing per-class maps and image-level logits.

    ``forward(features (B, D, h, w)) -> (logits (B, C), cams (B, C, h, w))``; ``cams`` are
    raw (no ReLU) so the logits are the pooled maps. Pooling is done in fp32 (AMP-safe).
    """

    def __init__(self, in_channels: int, num_classes: int, pooling: str = "gap", bias: bool = False,
                 gwrp_decay: float = 0.996):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.gwrp_decay = float(gwrp_decay)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """Classifier weight as a (C, D) matrix."""
        return self.classifier.weight.flatten(1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = self.classifier(features)
        return pool_maps(cams, self.pooling, self.gwrp_decay), cams


def pool_maps(maps: torch.Tensor, pooling: str = "gap", gwrp_decay: float = 0.996) -> torch.Tensor:
    """Pool (B, C, h, w) maps to (B, C) logits in fp32: ``gap`` (mean), ``gmp`` (max) or ``gwrp``."""
    x = maps.float().flatten(2)
    if pooling == "gap":
        return x.mean(-1)
    if pooling == "gmp":
        return x.amax(-1)
    if pooling == "gwrp":
        # GWRP: sort descending, weight rank j by d**j, normalise by the weight sum.
        n = x.shape[-1]
        w = gwrp_decay ** torch.arange(n, device=x.device, dtype=torch.float32)
        return (x.sort(dim=-1, descending=True).values * w).sum(-1) / w.sum()
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def cam_from_features(features: torch.Tensor, weight: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """CAMs from features and classifier weights (SeCo Eq. 1 without the ReLU unless ``relu``).

    ``features``: (B, D, h, w) maps or (B, N, D) tokens; ``weight``: (C, D) or (C, D, 1, 1).
    Returns (B, C, h, w) or (B, C, N) respectively.
    """
    w = weight.flatten(1) if weight.dim() == 4 else weight
    if features.dim() == 4:
        cams = torch.einsum("bdhw,cd->bchw", features, w.to(features.dtype))
    elif features.dim() == 3:
        cams = torch.einsum("bnd,cd->bcn", features, w.to(features.dtype))
    else:
        raise ValueError(f"features must be (B, D, h, w) or (B, N, D), got shape {tuple(features.shape)}")
    return F.relu(cams) if relu else cams


def max_norm(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU then divide every (image, class) map by its spatial max; fp32 output in [0, 1].

    Works on (..., H, W) tensors. A map that is zero everywhere stays zero.
    """
    x = F.relu(cams.float())
    return x / (x.amax(dim=(-2, -1), keepdim=True) + eps)


def min_max_norm(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU, subtract every (image, class) map's spatial min, divide by the new max; fp32 in [0, 1]
    (the normalisation of ToCo's and SeCo's released CAMs). A constant map becomes zero."""
    x = F.relu(cams.float())
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / (x.amax(dim=(-2, -1), keepdim=True) + eps)


CAM_NORMS = ("max", "minmax")
FLIP_REDUCTIONS = ("sum", "max")


def multiscale_cam(forward_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True,
                   out_size: tuple[int, int] | None = None, normalize: bool = True,
                   grad: bool = False, flip_reduce: str = "sum", norm: str = "max") -> torch.Tensor:
    """Multi-scale (+ flip) CAM inference, batched: one ``forward_fn`` call per scale.

    ``forward_fn(images (B', 3, h, w)) -> raw CAMs (B', C, h', w')``. For every scale the
    batch (and its horizontal flip, concatenated along the batch) is resized bilinearly,
    the CAMs are ReLU'd, resized to ``out_size`` (default: the input size), un-flipped and
    summed with their flip (``flip_reduce="sum"``; ``"max"``: resized, max with the flip, then
    ReLU'd, in the order of ToCo's and SeCo's releases), then summed over scales in fp32. With ``normalize`` each class map is brought to [0, 1]
    (``norm``: ``max`` divides by the map's max, ``minmax`` subtracts its min first as ToCo / SeCo).
    Method presets: SeCo (1.0, 0.5, 0.75, 1.5); CoBra 0.5..2.0 in steps of 0.25.
    Runs under ``torch.no_grad()`` unless ``grad=True``.
    """
    if flip_reduce not in FLIP_REDUCTIONS:
        raise ValueError(f"flip_reduce must be one of {FLIP_REDUCTIONS}, got {flip_reduce!r}")
    if norm not in CAM_NORMS:
        raise ValueError(f"norm must be one of {CAM_NORMS}, got {norm!r}")
    B, _, H, W = images.shape
    out_size = (H, W) if out_size is None else tuple(out_size)
    total = None
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for s in scales:
            x = images
            if s != 1.0:
                size = (max(1, round(H * s)), max(1, round(W * s)))
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            if flip:
                x = torch.cat([x, x.flip(-1)], dim=0)
            cams = forward_fn(x).float()
            if flip_reduce == "sum":
                cams = F.interpolate(F.relu(cams), size=out_size, mode="bilinear", align_corners=False)
                if flip:
                    cams = cams[:B] + cams[B:].flip(-1)
            else:  # the release's order: resize the raw maps, max with the flip, then ReLU
                cams = F.interpolate(cams, size=out_size, mode="bilinear", align_corners=False)
                cams = F.relu(torch.maximum(cams[:B], cams[B:].flip(-1)) if flip else cams)
            total = cams if total is None else total + cams
    if total is None:
        raise ValueError("multiscale_cam needs at least one scale")
    if not normalize:
        return total
    return max_norm(total) if norm == "max" else min_max_norm(total)


def _present_scores(cams: torch.Tensor, tags: torch.Tensor | None, keys: torch.Tensor | None):
    """(max score, label index) per pixel with classes restricted to the present ones."""
    cams = cams.float()
    if keys is not None:
        keys = torch.as_tensor(keys, device=cams.device).long()
        if keys.shape[-1] != cams.shape[-3]:
            raise ValueError(f"keys has {keys.shape[-1]} entries but cams has {cams.shape[-3]} channels")
        if cams.shape[-3] == 0:
            return cams.new_zeros(cams.shape[:-3] + cams.shape[-2:]), None
        score, idx = cams.max(dim=-3)
        k = keys.reshape(keys.shape + (1, 1)).expand(keys.shape + cams.shape[-2:])
        return score, torch.gather(k, -3, idx.unsqueeze(-3)).squeeze(-3)
    if tags is not None:
        tags = torch.as_tensor(tags, device=cams.device)
        if tags.shape[-1] != cams.shape[-3]:
            raise ValueError(f"tags has {tags.shape[-1]} entries but cams has {cams.shape[-3]} channels")
        present = (tags > 0).reshape(tags.shape + (1, 1))
        cams = cams.masked_fill(~present, float("-inf"))
    score, idx = cams.max(dim=-3)
    score = score.clamp_min(0)  # no present class -> score 0 (-inf would propagate)
    return score, idx + 1


def cam_to_label(cams: torch.Tensor, tags: torch.Tensor | None = None, bg_threshold: float = 0.5, *,
                 keys: torch.Tensor | None = None, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Label map from normalised CAMs: argmax over present classes, background where weak.

    ``cams``: (B, C, H, W) or (C, H, W) over the foreground classes. Restrict classes with
    either ``tags`` (multi-hot (B, C)/(C,) over foreground classes; label = channel + 1) or
    ``keys`` ((B, K)/(K,) class indices, one per channel of ``cams``; label = ``keys[channel]``,
    as in the seeds ``.npz`` files). Pixels whose best present score is ``<= bg_threshold``
    are background (0), as IRN/ToCo do (a padded background channel wins ties).
    Returns ``dtype`` (uint8 by default) of shape (B, H, W) or (H, W).
    """
    score, label = _present_scores(cams, tags, keys)
    if label is None:
        return torch.zeros(score.shape, dtype=dtype, device=score.device)
    label = label.masked_fill(score <= bg_threshold, 0)
    return label.to(dtype)


def cam_seeds(cams: torch.Tensor, high: float = 0.7, low: float = 0.25, tags: torch.Tensor | None = None, *,
              keys: torch.Tensor | None = None, ignore_index: int = 255,
              dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Seed labels with an uncertain band, as used by SeCo/ToCo and CoBra's IR labels.

    Best present class where its score ``> high``; ``ignore_index`` (uncertain) where
    ``low < score <= high``; background (0) where ``score <= low``. Classes restricted by
    ``tags`` or ``keys`` as in :func:`cam_to_label`. Defaults are SeCo's VOC values.
    """
    if low > high:
        raise ValueError(f"cam_seeds needs low <= high, got low={low}, high={high}")
    score, label = _present_scores(cams, tags, keys)
    if label is None:
        return torch.zeros(score.shape, dtype=dtype, device=score.device)
    label = label.masked_fill(score <= high, ignore_index).masked_fill(score <= low, 0)
    return label.to(dtype)
