"""Joint image/label augmentation on ``torchvision.transforms.v2`` and a dict ``collate``.

Items are the dicts of :mod:`labelwise.data.base`. :class:`ToTensors` turns the numpy
arrays into ``tv_tensors.Image`` (``uint8`` 3xHxW) and ``tv_tensors.Mask`` (``int64`` HxW,
for the keys ``mask``, ``parts``, ``objects``); every geometric transform then moves the
image and all masks together (images bilinear, masks nearest). Order used by
:class:`TrainTransform`::

    ToTensors -> ColorJitter -> RandomScale -> RandomHorizontalFlip -> ToFloat -> RandomCrop

Images leave these transforms as float RGB in [0, 1]: normalisation belongs to the model
(each backbone applies its own pixel mean / std, see ``labelwise.modeling.backbones``), so
one dataset pipeline serves every backbone. Crop padding fills image pixels with ``fill``
(pass the backbone's mean colour, ``labelwise.modeling.backbones.pixel_stats``, so padding
normalises to 0 as in the reference implementations) and label pixels with 255 (ignore).

Randomness comes from torch's RNG (each DataLoader worker has its own seed) or from an
explicit ``torch.Generator`` passed as ``generator=``; nothing here reseeds any RNG.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from labelwise.io import IGNORE_INDEX

MASK_KEYS = ("mask", "parts", "objects")


def _masks(item: dict) -> list[str]:
    return [k for k in MASK_KEYS if k in item and item[k] is not None]


def _hw(item: dict) -> tuple[int, int]:
    return tuple(item["image"].shape[-2:])  # type: ignore[return-value]


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * _rand(generator)


class ToTensors:
    """numpy item -> ``tv_tensors`` (image ``uint8`` 3xHxW, masks ``int64`` HxW, tags float tensor)."""

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        img = item["image"]
        if isinstance(img, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        out["image"] = tv_tensors.Image(img)
        for k in _masks(item):
            m = item[k]
            m = torch.from_numpy(np.ascontiguousarray(m)) if isinstance(m, np.ndarray) else m
            out[k] = tv_tensors.Mask(m.to(torch.int64))
        if isinstance(item.get("tags"), np.ndarray):
            out["tags"] = torch.from_numpy(item["tags"].astype(np.float32))
        return out


class Compose:
    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, item: dict) -> dict:
        for t in self.transforms:
            item = t(item)
        return item

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomScale:
    """Rescale image and masks by a factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0), generator: torch.Generator | None = None):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.scale_range = tuple(scale_range)
        self.generator = generator

    def __call__(self, item: dict) -> dict:
        s = _uniform(*self.scale_range, self.generator)
        h, w = _hw(item)
        size = [max(1, round(h * s)), max(1, round(w * s))]
        out = dict(item)
        out["image"] = F.resize(item["image"], size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        for k in _masks(item):
            out[k] = F.resize(item[k], size, interpolation=InterpolationMode.NEAREST)
        return out


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p = p
        self.generator = generator

    def __call__(self, item: dict) -> dict:
        if _rand(self.generator) >= self.p:
            return item
        out = dict(item)
        out["image"] = F.horizontal_flip(item["image"])
        for k in _masks(item):
            out[k] = F.horizontal_flip(item[k])
        return out


class ColorJitter:
    """Photometric jitter of the image only, with prob ``p``: brightness, contrast and saturation
    factors uniform in ``[max(0, 1 - x), 1 + x]``, a hue shift uniform in ``[-hue, hue]``, applied in
    a random order (the recipe of ``torchvision.transforms.v2.ColorJitter``). Every draw comes from
    ``generator`` -- torchvision's class draws from the global RNG, which a seeded, resumable
    pipeline must not touch."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 p: float = 0.8, generator: torch.Generator | None = None):
        for name, x in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if x < 0:
                raise ValueError(f"ColorJitter: {name}={x} must be >= 0")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter: hue={hue} must lie in [0, 0.5]")
        # (adjust, range of its factor); None = off. All four stay in the list so the random order is
        # drawn over the same four slots whichever are off.
        factor = lambda x: (max(0.0, 1.0 - x), 1.0 + x) if x > 0 else None  # noqa: E731
        self.ops = [(F.adjust_brightness, factor(brightness)), (F.adjust_contrast, factor(contrast)),
                    (F.adjust_saturation, factor(saturation)), (F.adjust_hue, (-hue, hue) if hue > 0 else None)]
        self.p = p
        self.generator = generator

    def __call__(self, item: dict) -> dict:
        if _rand(self.generator) >= self.p:
            return item
        image = item["image"]
        for i in torch.randperm(len(self.ops), generator=self.generator).tolist():
            adjust, bounds = self.ops[i]
            if bounds is not None:
                image = adjust(image, _uniform(*bounds, self.generator))
        out = dict(item)
        out["image"] = image
        return out


class ToFloat:
    """``uint8`` image -> float32 in [0, 1] (a float image passes through)."""

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        out["image"] = F.to_dtype(item["image"], torch.float32, scale=True)
        return out


class RandomCrop:
    """Random ``size`` crop; smaller inputs are padded (image with ``fill``, masks with 255).

    ``fill``: a value or one per channel, in the image's units (after :class:`ToFloat`: [0, 1]).
    """

    def __init__(self, size: int | tuple[int, int], ignore_index: int = IGNORE_INDEX,
                 fill: float | Sequence[float] = 0.0, generator: torch.Generator | None = None):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.ignore_index = ignore_index
        self.image_fill = list(fill) if isinstance(fill, (list, tuple)) else float(fill)
        self.generator = generator

    def __call__(self, item: dict) -> dict:
        ch, cw = self.size
        h, w = _hw(item)
        out = dict(item)
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            pad = [0, 0, pw, ph]  # left, top, right, bottom
            out["image"] = F.pad(out["image"], pad, fill=self.image_fill)
            for k in _masks(item):
                out[k] = F.pad(out[k], pad, fill=self.ignore_index)
            h, w = h + ph, w + pw
        top = int(torch.randint(0, h - ch + 1, (), generator=self.generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=self.generator))
        out["image"] = F.crop(out["image"], top, left, ch, cw)
        for k in _masks(item):
            out[k] = F.crop(out[k], top, left, ch, cw)
        out["crop_box"] = torch.tensor([left, top, left + cw, top + ch])  # in the scaled/padded frame
        return out


class TrainTransform(Compose):
    """The standard WSSS/segmentation training pipeline (see module docstring)."""

    def __init__(self, crop_size: int | tuple[int, int] = 448, scale_range: tuple[float, float] = (0.5, 2.0),
                 flip_p: float = 0.5, jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, fill: float | Sequence[float] = 0.0,
                 generator: torch.Generator | None = None):
        ts: list[Any] = [ToTensors()]
        if jitter is not None:
            ts.append(ColorJitter(*jitter, p=jitter_p, generator=generator))
        ts += [RandomScale(scale_range, generator), RandomHorizontalFlip(flip_p, generator), ToFloat(),
               RandomCrop(crop_size, fill=fill, generator=generator)]
        super().__init__(ts)


class EvalTransform:
    """Deterministic: optional resize (``size`` = short side int or ``(h, w)``), image as float in [0, 1].

    Masks keep the original resolution unless ``resize_masks=True`` (metrics are computed at
    the label resolution). ``orig_size`` (H, W) is recorded.
    """

    def __init__(self, size: int | tuple[int, int] | None = None, resize_masks: bool = False):
        self.size = size
        self.resize_masks = resize_masks
        self.to_tensors = ToTensors()
        self.normalize = ToFloat()

    def __call__(self, item: dict) -> dict:
        out = self.to_tensors(item)
        h, w = _hw(out)
        out["orig_size"] = torch.tensor([h, w])
        if self.size is not None:
            if isinstance(self.size, int):
                s = self.size / min(h, w)
                size = [max(1, round(h * s)), max(1, round(w * s))]
            else:
                size = list(self.size)
            out["image"] = F.resize(out["image"], size, interpolation=InterpolationMode.BILINEAR, antialias=True)
            if self.resize_masks:
                for k in _masks(out):
                    out[k] = F.resize(out[k], size, interpolation=InterpolationMode.NEAREST)
        return self.normalize(out)


class MultiCropTransform:
    """``n_global`` + ``n_local`` random resized crops of the item's image (and masks).

    Adds ``global_views`` / ``local_views`` (lists of 3xSxS float tensors), ``global_boxes`` /
    ``local_boxes`` (``n x 4`` ``x0, y0, x1, y1`` in the input image's pixel frame),
    ``global_flips`` / ``local_flips`` (bool), and ``global_masks`` / ``local_masks`` when the
    item has a ``mask``. Views are float in [0, 1] (a ``uint8`` image is scaled; the model normalises).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 10,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 generator: torch.Generator | None = None):
        self.global_size, self.local_size = global_size, local_size
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale, self.ratio = global_scale, local_scale, ratio
        self.flip_p = flip_p
        self.normalize = ToFloat()
        self.generator = generator

    def _box(self, h: int, w: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
        area = h * w
        lr = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            a = area * _uniform(*scale, self.generator)
            r = math.exp(_uniform(*lr, self.generator))
            cw, ch = round(math.sqrt(a * r)), round(math.sqrt(a / r))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=self.generator))
                left = int(torch.randint(0, w - cw + 1, (), generator=self.generator))
                return top, left, ch, cw
        s = min(h, w)  # fallback: centred square
        return (h - s) // 2, (w - s) // 2, s, s

    def _views(self, item: dict, n: int, size: int, scale) -> tuple[list, list, torch.Tensor, torch.Tensor]:
        h, w = _hw(item)
        views, masks, boxes, flips = [], [], [], []
        for _ in range(n):
            top, left, ch, cw = self._box(h, w, scale)
            v = F.resized_crop(item["image"], top, left, ch, cw, [size, size],
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
            m = None
            if "mask" in item and item["mask"] is not None:
                m = F.resized_crop(item["mask"], top, left, ch, cw, [size, size], interpolation=InterpolationMode.NEAREST)
            flip = _rand(self.generator) < self.flip_p
            if flip:
                v = F.horizontal_flip(v)
                m = F.horizontal_flip(m) if m is not None else None
            views.append(v)
            if m is not None:
                masks.append(m)
            boxes.append([left, top, left + cw, top + ch])
            flips.append(flip)
        return views, masks, torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), torch.tensor(flips)

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        if isinstance(out["image"], np.ndarray) or any(isinstance(out.get(k), np.ndarray) for k in MASK_KEYS):
            out = ToTensors()(out)
        src = self.normalize(out) if out["image"].dtype == torch.uint8 else out
        for name, n, size, scale in (("global", self.n_global, self.global_size, self.global_scale),
                                     ("local", self.n_local, self.local_size, self.local_scale)):
            views, masks, boxes, flips = self._views(src, n, size, scale)
            out[f"{name}_views"] = views
            out[f"{name}_boxes"] = boxes
            out[f"{name}_flips"] = flips
            if masks:
                out[f"{name}_masks"] = masks
        return out


def _plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


def collate(batch: list[dict]) -> dict:
    """Collate dict items: stack same-shape tensors/arrays, stack lists of views per position,
    keep strings, ``None``, ragged data and instance lists as Python lists."""
    if not batch:
        return {}
    keys = list(batch[0])
    for b in batch[1:]:
        keys += [k for k in b if k not in keys]
    out: dict[str, Any] = {}
    for k in keys:
        vals = [b.get(k) for b in batch]
        out[k] = _collate_values(vals)
    return out


def _collate_values(vals: list) -> Any:
    if all(isinstance(v, np.ndarray) for v in vals) and len({v.shape for v in vals}) == 1 and vals[0].dtype != object:
        return torch.from_numpy(np.stack(vals))
    if all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
        return torch.stack([_plain(v) for v in vals])
    if (all(isinstance(v, (list, tuple)) for v in vals) and len({len(v) for v in vals}) == 1 and vals[0]
            and all(isinstance(x, torch.Tensor) for v in vals for x in v)):
        per_pos = list(zip(*vals))
        if all(len({tuple(x.shape) for x in pos}) == 1 for pos in per_pos):
            return [torch.stack([_plain(x) for x in pos]) for pos in per_pos]
    return list(vals)


__all__ = ["ToTensors", "Compose", "RandomScale", "RandomHorizontalFlip", "ColorJitter", "ToFloat", "RandomCrop",
           "TrainTransform", "EvalTransform", "MultiCropTransform", "collate"]


def seeded_train_transform(data_cfg: Any, fill: Sequence[float], rng: np.random.Generator) -> TrainTransform:
    """The usual training augmentation of a ``data`` config section (``crop_size``, ``scale_range``,
    ``flip``, ``color_jitter``), driven by a generator seeded from the sampler's ``rng`` (never the
    global RNG); crops are padded with ``fill`` (the backbone's mean colour)."""
    g = torch.Generator()
    g.manual_seed(int(rng.integers(0, 2 ** 62)))
    j = data_cfg.color_jitter
    return TrainTransform(crop_size=data_cfg.crop_size, scale_range=tuple(data_cfg.scale_range),
                          flip_p=0.5 if data_cfg.flip else 0.0, jitter=(j, j, j, min(j / 4, 0.5)) if j > 0 else None,
                          fill=fill, generator=g)


class ImageInput:
    """Inference-side (DataLoader workers): ``item["input"]`` = the image as ``3 x H x W`` float in
    [0, 1], resized so its long side is ``long_side`` (0 = keep), or shrunk so it is at most
    ``max_size`` (0 = keep)."""

    def __init__(self, max_size: int = 0, long_side: int = 0):
        self.max_size, self.long_side = int(max_size), int(long_side)

    def __call__(self, item: dict) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div_(255.0)
        H, W = x.shape[-2:]
        target = self.long_side or (self.max_size if self.max_size and max(H, W) > self.max_size else 0)
        if target and target != max(H, W):
            s = target / max(H, W)
            x = torch.nn.functional.interpolate(x[None], size=(max(1, round(H * s)), max(1, round(W * s))),
                                                mode="bilinear", align_corners=False)[0]
        return {**item, "input": x}
