"""CAMs of an ImageNet classifier on real photos (the demo's "real photos" section).

The CAM of class ``c`` (Zhou et al., 2016) is the classifier weight row of ``c`` applied to
the last feature map (before global average pooling): ``M_c(x, y) = sum_k w_ck f_k(x, y)``.
With GAP + linear head, the spatial mean of ``M_c`` plus the bias is the logit of ``c``.
Maps are ReLU'd, upsampled bilinearly to the photo size and max-normalised to [0, 1].

Works with any timm-style classifier: ``forward_features(x) -> (B, D, h, w)`` and a linear
head found via ``get_classifier()`` (or a ``classifier`` / ``fc`` / ``_fc`` attribute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# skimage.data photos used by the demo (name -> loader attribute).
DEFAULT_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@dataclass
class ClassCAM:
    index: int          # ImageNet class index
    name: str           # human-readable class name
    prob: float         # softmax probability
    cam: np.ndarray     # float32 H x W in [0, 1], photo size


def _linear_head(model: nn.Module) -> nn.Module:
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    for attr in ("classifier", "fc", "_fc", "head"):
        if isinstance(head, nn.Linear):
            break
        head = getattr(model, attr, head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}: no linear classifier head found "
                        "(expected get_classifier() / classifier / fc returning nn.Linear)")
    return head


def _norm_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
            return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def imagenet_class_name(index: int) -> str:
    """Readable ImageNet-1k name of class ``index`` (first synonym), e.g. 281 -> 'tabby'."""
    try:
        from timm.data import ImageNetInfo

        return ImageNetInfo().index_to_description(int(index)).split(",")[0].strip()
    except Exception:  # pragma: no cover - timm without the info table
        return f"class {int(index)}"


@torch.no_grad()
def classifier_cams(model: nn.Module, image: np.ndarray, topk: int = 3, input_long_side: int = 224,
                    features_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    class_name: Callable[[int], str] = imagenet_class_name) -> list[ClassCAM]:
    """Top-``topk`` classes of ``model`` on an RGB ``uint8`` photo, each with its CAM.

    The photo is resized (aspect kept) so its longer side is ``input_long_side`` (rounded
    to a multiple of 32), normalised with the model's mean/std (``pretrained_cfg``, else
    ImageNet's). ``features_fn`` overrides ``model.forward_features``.
    """
    model.eval()
    head = _linear_head(model)
    m0, s0 = _norm_stats(model)
    mean = tuple(mean) if mean is not None else m0
    std = tuple(std) if std is not None else s0
    param = next(model.parameters())
    H, W = image.shape[:2]
    scale = input_long_side / max(H, W)
    h = max(32, int(round(H * scale / 32)) * 32)
    w = max(32, int(round(W * scale / 32)) * 32)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = x.to(device=param.device, dtype=param.dtype)
    feats = (features_fn or model.forward_features)(x)
    if feats.dim() != 4:
        raise ValueError(f"forward_features must return (B, D, h, w), got shape {tuple(feats.shape)}")
    feats = feats.float()
    weight = head.weight.float()
    logits = feats.mean(dim=(2, 3)) @ weight.t()
    if head.bias is not None:
        logits = logits + head.bias.float()
    probs = logits.softmax(dim=-1)[0]
    top = probs.topk(min(topk, probs.numel()))
    idx = top.indices
    cams = torch.einsum("bdhw,cd->bchw", feats, weight[idx])  # CAM: w_c . f(x, y)
    cams = F.interpolate(F.relu(cams), size=(H, W), mode="bilinear", align_corners=False)[0]
    cams = cams / (cams.amax(dim=(1, 2), keepdim=True) + 1e-8)
    return [ClassCAM(int(i), class_name(int(i)), float(p), cams[k].cpu().numpy().astype(np.float32))
            for k, (i, p) in enumerate(zip(idx.tolist(), top.values.tolist()))]


def load_skimage_photos(names: Sequence[str] = DEFAULT_PHOTOS) -> dict[str, np.ndarray]:
    """RGB ``uint8`` photos shipped with scikit-image (no download); unknown names skipped."""
    import skimage.data

    out = {}
    for n in names:
        fn = getattr(skimage.data, n, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except Exception:  # some skimage photos need pooch downloads; skip those
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out[n] = img[..., :3].astype(np.uint8)
    return out
