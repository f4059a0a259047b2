"""SeCo image decomposition (SeCo Sec. 3.3): ROI maps, crop boxes, category tags, crops, key-view augmentation.

Everything is batched on the inputs' device, without Python loops over pixels or crops and
without host syncs (except where a function documents one that the caller can avoid).

Pipeline of one training step (SeCo Sec. 3.3, "Assignment of Category Tags"):

1. :func:`roi_mask` turns the auxiliary CAMs into the pseudo mask ``M_aux`` with three kinds
   of pixels: confident class ``c`` (``v > high``), uncertain ``-1`` (``low < v <= high``),
   background ``0`` (``v <= low``), and ``255`` outside the image (crop padding).
2. :func:`sample_crop_boxes` draws ``n`` crop boxes per image (``x = crp(I)``), centred on
   uncertain pixels (where co-occurring categories meet), without replacement.
3. :func:`crop_tags` assigns the tag ``t_i`` of every crop from ``m_i = crp(M_aux)`` with the
   proportion threshold ``phi``: background ``0``, a single category ``c`` or uncertain ``-1``.
   :func:`global_tags` tags the whole-image (global) views.
4. :func:`extract_crops` cuts the query crops from the raw image and the key crops (the *same*
   boxes) from the image, then :func:`strong_augment` gives the key view its strong
   augmentation (SeCo Sec. 3.3, "Representation of Local Patches": W.T. / S.T., after MoCo).

Differences from the authors' release (``assign_csc_tags``; we follow the paper):

* phi is tested on the fraction of *pixels* that are confident foreground or uncertain among
  the crop's valid pixels; the release compares the sum of the class ids over the crop with
  ``phi * crop**2`` (larger class ids pass more easily, padding counts as background).
* Images with no confident class get the global tag ``-1``; the release leaves them at 1.
* The global RNG is never reseeded (the release calls ``torch.manual_seed(0)`` per image).
* The key crops are cut at the same boxes as the query crops; the release flips the whole key
  image independently, which misaligns about half of the key crops. :func:`strong_augment`
  flips the crop itself, which keeps the pair aligned in content.
* The key-view augmentation is drawn per crop (the release draws one per image and blurs the
  whole 448 image before cropping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE",
    "UNCERTAIN",
    "roi_mask",
    "sample_crop_boxes",
    "crop_tags",
    "global_tags",
    "extract_crops",
    "extract_crops_2d",
    "strong_augment",
    "gaussian_blur",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "adjust_hue",
    "rgb_to_gray",
]

IGNORE = 255      # outside the image (crop padding)
UNCERTAIN = -1    # low < CAM <= high; also the "excluded from contrast" tag

# ITU-R 601 luma, as PIL's ``convert("L")`` (the release augments PIL images)
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------
# 1. ROI map (SeCo Sec. 3.3: M_aux from CAM_aux, Eq. 1)
# ----------------------------------------------------------------------------------------------

def roi_mask(cams: torch.Tensor, tags: torch.Tensor, valid: torch.Tensor | None = None,
             high: float = 0.7, low: float = 0.25) -> torch.Tensor:
    """Three-level pseudo mask from normalised CAMs (SeCo Sec. 3.3, ``M_aux``).

    ``cams``: ``B x K x H x W`` in [0, 1], one channel per foreground class; ``tags``: ``B x K``
    multi-hot image tags (absent classes are zeroed before the max); ``valid``: ``B x H x W``
    bool, pixels inside the image (None = all). With ``v`` = max over present classes and
    ``c`` = its argmax + 1, returns int64 ``B x H x W``: ``c`` where ``v > high``, ``-1`` where
    ``low < v <= high``, ``0`` where ``v <= low``, ``255`` outside ``valid``.
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be B x K x H x W, got shape {tuple(cams.shape)}")
    B, K = cams.shape[:2]
    present = tags.reshape(B, K, 1, 1).to(device=cams.device, dtype=torch.bool)
    v, c = cams.masked_fill(~present, 0).max(dim=1)
    lab = torch.where(v > high, c + 1, torch.where(v > low, torch.full_like(c, UNCERTAIN), torch.zeros_like(c)))
    if valid is not None:
        lab = lab.masked_fill(~valid.to(device=lab.device, dtype=torch.bool), IGNORE)
    return lab


# ----------------------------------------------------------------------------------------------
# 2. Crop boxes (SeCo Sec. 3.3: x = crp(I))
# ----------------------------------------------------------------------------------------------

def sample_crop_boxes(roi: torch.Tensor, n: int, crop: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` square ``crop`` x ``crop`` boxes per image, centred on uncertain pixels.

    ``roi``: ``B x H x W`` from :func:`roi_mask`. Returns int64 ``B x n x 4`` boxes
    ``(x0, y0, x1, y1)`` (``x1 - x0 = y1 - y0 = crop``, end exclusive), all inside the image.
    A box has its centre at ``(x0 + crop // 2, y0 + crop // 2)``; the centres that fit lie in
    rows ``[crop//2, H - crop + crop//2]`` (columns alike).

    Per image, the centres are drawn uniformly *without replacement* among the uncertain pixels
    (``roi == -1``) that fit; an image with fewer than ``n`` of them draws among the fitting
    pixels inside the image (``roi != 255``) instead, and if even those are fewer than ``n``,
    among all fitting pixels (as the release: "random when there are too few").

    Implementation: one uniform key per pixel, candidates keep their key, the others get -1,
    and ``topk(n)`` takes a uniformly random subset of the candidates (in random order).
    Randomness comes from ``generator`` (None = the global RNG of ``roi``'s device); with a
    generator the keys are drawn on the generator's device and moved. Nothing is reseeded.
    """
    if roi.dim() != 3:
        raise ValueError(f"roi must be B x H x W, got shape {tuple(roi.shape)}")
    B, H, W = roi.shape
    if not 1 <= crop <= min(H, W):
        raise ValueError(f"crop size {crop} must be in [1, min(H, W) = {min(H, W)}]")
    if (H - crop + 1) * (W - crop + 1) < n:
        raise ValueError(f"only {(H - crop + 1) * (W - crop + 1)} crop positions of size {crop} fit in "
                         f"{H}x{W}, cannot draw {n} distinct boxes")
    dev = roi.device
    half = crop // 2
    ys = torch.arange(H, device=dev)
    xs = torch.arange(W, device=dev)
    fit = (((ys >= half) & (ys <= H - crop + half))[:, None]
           & ((xs >= half) & (xs <= W - crop + half))[None, :])                  # H x W
    unc = (roi == UNCERTAIN) & fit
    inside = (roi != IGNORE) & fit
    use_unc = (unc.flatten(1).sum(1) >= n)[:, None]
    use_inside = (inside.flatten(1).sum(1) >= n)[:, None]
    cand = torch.where(use_unc, unc.flatten(1),
                       torch.where(use_inside, inside.flatten(1), fit.flatten()[None, :]))  # B x HW
    gdev = generator.device if generator is not None else dev
    keys = torch.rand(B, H * W, generator=generator, device=gdev).to(dev)
    idx = torch.where(cand, keys, torch.full_like(keys, -1.0)).topk(n, dim=1).indices  # B x n
    x0 = idx % W - half
    y0 = torch.div(idx, W, rounding_mode="floor") - half
    return torch.stack([x0, y0, x0 + crop, y0 + crop], dim=-1)


# ----------------------------------------------------------------------------------------------
# 3. Category tags (SeCo Sec. 3.3, proportion threshold phi)
# ----------------------------------------------------------------------------------------------

def global_tags(roi: torch.Tensor) -> torch.Tensor:
    """Tag of a whole-image (global) view: the class id if ``roi`` (``B x H x W``) holds exactly
    one confident class, else ``-1`` (two or more classes, or none: the release tags images
    without a confident class as class 1, a bug we do not reproduce). Returns int64 ``B``."""
    roi = roi.long()
    conf = (roi > 0) & (roi != IGNORE)
    cmin = torch.where(conf, roi, torch.full_like(roi, torch.iinfo(torch.int64).max)).flatten(1).amin(1)
    cmax = torch.where(conf, roi, torch.full_like(roi, -1)).flatten(1).amax(1)
    return torch.where((cmax > 0) & (cmin == cmax), cmax, torch.full_like(cmax, UNCERTAIN))


def _fill_classes(roi: torch.Tensor, image_classes: torch.Tensor | None) -> torch.Tensor:
    """Per-image fill class (int64 ``B``; ``<= 0`` = no fill)."""
    if image_classes is None:
        return global_tags(roi)
    image_classes = image_classes.to(roi.device)
    if image_classes.dim() == 2:                                   # B x K multi-hot
        hot = image_classes > 0
        one = hot.sum(1) == 1
        return torch.where(one, hot.to(torch.uint8).argmax(1).long() + 1, torch.full_like(one, -1, dtype=torch.long))
    if image_classes.dim() != 1:
        raise ValueError("image_classes must be B (class ids) or B x K (multi-hot)")
    return image_classes.long()


def _window_sums(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Sums of ``maps`` (``B x C x H x W``, integer) over ``boxes`` (``B x n x 4``) with an
    integral image: returns int64 ``B x C x n``. Cost O(B C H W + B C n)."""
    B, C, _, W = maps.shape
    n = boxes.shape[1]
    S = F.pad(maps.to(torch.int32), (1, 0, 1, 0)).cumsum(2, dtype=torch.int32).cumsum(3, dtype=torch.int32)
    S = S.flatten(2)                                               # B x C x (H+1)(W+1)
    x0, y0, x1, y1 = boxes.long().unbind(-1)

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return S.gather(2, (y * (W + 1) + x)[:, None, :].expand(B, C, n)).long()

    return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)


def crop_tags(roi: torch.Tensor, boxes: torch.Tensor, num_classes: int, phi: float = 0.2,
              fill_single_class: bool = True, image_classes: torch.Tensor | None = None) -> torch.Tensor:
    """Category tag of every crop (SeCo Sec. 3.3, proportion threshold ``phi``).

    ``roi``: ``B x H x W`` from :func:`roi_mask` (values ``255``, ``-1``, ``0``, ``1..num_classes-1``);
    ``boxes``: ``B x n x 4`` ``(x0, y0, x1, y1)`` inside the image (any sizes);
    ``num_classes``: number of classes *including* background. Returns int64 ``B x n``.

    With ``m`` the crop of ``roi``: the target fraction is (# pixels that are a confident class
    or uncertain) / (# valid pixels, ``!= 255``). Fraction ``<= phi`` -> ``0`` (background);
    otherwise the set of confident classes in ``m``: exactly one -> that class, none (only
    uncertain pixels) or two or more -> ``-1`` (uncertain, excluded from the contrast).
    A crop without valid pixels gets ``-1``.

    ``fill_single_class`` (as the release): in images with a single confident class, uncertain
    pixels count as that class, so a crop of such an image that holds only uncertain target
    pixels is tagged with the image's class instead of ``-1`` (the fraction is unchanged).
    The single class of each image is ``global_tags(roi)`` unless ``image_classes`` gives it:
    int64 ``B`` class ids (``<= 0``: no fill) or a ``B x (num_classes - 1)`` multi-hot (e.g. the
    ground-truth image tags; fill where exactly one tag is set).

    Computed with integral images of the per-class indicator maps: O(B K H W + B n K), no loop.
    """
    if roi.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != roi.shape[0]:
        raise ValueError(f"expected roi B x H x W and boxes B x n x 4, got {tuple(roi.shape)} and {tuple(boxes.shape)}")
    roi = roi.long()
    boxes = boxes.to(roi.device)
    lab = roi
    if fill_single_class:
        fill = _fill_classes(roi, image_classes)[:, None, None]
        lab = torch.where((roi == UNCERTAIN) & (fill > 0), fill, roi)
    valid = roi != IGNORE
    target = valid & (roi != 0)                                    # confident class or uncertain
    classes = torch.arange(1, num_classes, device=roi.device)
    ind = torch.cat([valid[:, None], target[:, None], lab[:, None] == classes[None, :, None, None]], dim=1)
    cnt = _window_sums(ind, boxes)                                 # B x (2 + K) x n
    n_valid, n_target, present = cnt[:, 0], cnt[:, 1], cnt[:, 2:] > 0
    n_cls = present.sum(1)
    only = (present * classes[None, :, None]).amax(1) if classes.numel() else torch.zeros_like(n_cls)
    tag = torch.where(n_cls == 1, only, torch.full_like(only, UNCERTAIN))
    frac = n_target.double() / n_valid.clamp(min=1).double()
    tag = torch.where(frac <= phi, torch.zeros_like(tag), tag)
    return torch.where(n_valid == 0, torch.full_like(tag, UNCERTAIN), tag)


# ----------------------------------------------------------------------------------------------
# 4. Crops (exact pixels, image-major)
# ----------------------------------------------------------------------------------------------

def _box_size(boxes: torch.Tensor, crop_size: int | None) -> int:
    if crop_size is not None:
        return int(crop_size)
    if boxes.numel() == 0:
        raise ValueError("pass crop_size when there are no boxes")
    return int((boxes[0, 0, 2] - boxes[0, 0, 0]).item())          # one host read; pass crop_size to avoid it


def extract_crops(images: torch.Tensor, boxes: torch.Tensor, out_size: int | None = None,
                  crop_size: int | None = None) -> torch.Tensor:
    """Crops ``(B*n) x C x s x s`` of ``images`` (``B x C x H x W``) at ``boxes`` (``B x n x 4``,
    all of side ``crop_size``, inside the image), image-major (all ``n`` crops of image 0 first).

    Exact pixels by advanced indexing; resized bilinearly (``align_corners=False``) only when
    ``out_size`` differs from the box side. ``crop_size`` = the box side; None reads it from the
    first box (one host sync; pass it inside training steps). Boxes must lie inside the image
    (negative indices would wrap).
    """
    B, C = images.shape[:2]
    n = boxes.shape[1]
    s = _box_size(boxes, crop_size)
    ar = torch.arange(s, device=images.device)
    boxes = boxes.to(images.device).long()
    ys = boxes[..., 1, None] + ar                                  # B x n x s
    xs = boxes[..., 0, None] + ar
    bi = torch.arange(B, device=images.device)[:, None, None, None]
    crops = images[bi, :, ys[..., :, None], xs[..., None, :]]      # B x n x s x s x C
    crops = crops.permute(0, 1, 4, 2, 3).reshape(B * n, C, s, s)
    if out_size is not None and int(out_size) != s:
        crops = F.interpolate(crops, size=(int(out_size), int(out_size)), mode="bilinear", align_corners=False)
    return crops


def extract_crops_2d(masks: torch.Tensor, boxes: torch.Tensor, crop_size: int | None = None) -> torch.Tensor:
    """Crops ``(B*n) x s x s`` of label maps ``masks`` (``B x H x W``), exact, image-major."""
    return extract_crops(masks[:, None], boxes, crop_size=crop_size)[:, 0]


# ----------------------------------------------------------------------------------------------
# 5. Strong (key-view) augmentation, batched with per-sample parameters
# ----------------------------------------------------------------------------------------------

def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``N x 1 x H x W`` of RGB ``N x 3 x H x W`` (ITU-R 601 weights, as PIL)."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[:, None]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB ``N x 3 x H x W`` in [0, 1] -> HSV, all channels in [0, 1] (hue in turns)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, torch.remainder((g - b) / d, 6.0),
                    torch.where(maxc == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h = torch.where(delta > 0, h, torch.zeros_like(h)) / 6.0
    return torch.stack([torch.remainder(h, 1.0), sat, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV ``N x 3 x H x W`` (hue in turns) -> RGB, with ``f(n) = V - V S clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 H) mod 6`` for ``n = 5, 3, 1`` (R, G, B)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each sample by ``shift`` (``N``, in turns, e.g. [-0.1, 0.1])."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur of each sample of ``x`` (``N x C x H x W``) with its own ``sigma`` (``N``).

    Sample ``i`` uses the kernel size ``2 * ceil(3 sigma_i) + 1``, capped to the largest odd
    number ``<= min(H, W)``, and reflect padding, i.e. exactly
    ``torchvision.transforms.functional.gaussian_blur(x[i], that size, sigma_i)``. All samples
    run as two depthwise (grouped) 1-D convolutions with one shared tap count
    ``2 * ceil(3 max_sigma) + 1`` (capped the same way); each sample's taps beyond its own half
    width are zero (reflect padding gives the same values whatever the pad width). ``max_sigma``:
    an upper bound of ``sigma`` (None = ``sigma.max()``, one host sync). Computed in fp32.
    """
    N, C, H, W = x.shape
    if N == 0:
        return x
    cap = (min(H, W) - 1) // 2                                     # largest odd size <= min(H, W) is 2*cap+1
    if max_sigma is None:
        max_sigma = float(sigma.max())
    kmax = min(math.ceil(3.0 * float(max_sigma)), cap)
    if kmax <= 0:
        return x
    sigma = sigma.to(device=x.device, dtype=torch.float32).clamp(min=1e-6)
    half = torch.ceil(3.0 * sigma.double()).clamp(max=kmax).float()            # per-sample half width
    t = torch.arange(-kmax, kmax + 1, device=x.device, dtype=torch.float32)
    w = torch.exp(-0.5 * (t[None, :] / sigma[:, None]).pow(2)) * (t[None, :].abs() <= half[:, None])
    w = w / w.sum(1, keepdim=True)                                  # N x (2 kmax + 1)
    w = w.repeat_interleave(C, dim=0)                               # (N C) x taps
    y = F.pad(x.float(), (kmax, kmax, kmax, kmax), mode="reflect").reshape(1, N * C, H + 2 * kmax, W + 2 * kmax)
    y = F.conv2d(y, w[:, None, None, :], groups=N * C)              # horizontal
    y = F.conv2d(y, w[:, None, :, None], groups=N * C)              # vertical
    return y.reshape(N, C, H, W).to(x.dtype)


def strong_augment(x: torch.Tensor, generator: torch.Generator | None = None,
                   brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                   jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.5,
                   blur_sigma: Sequence[float] = (0.1, 2.0), flip_p: float = 0.5,
                   blur_ref_size: int | None = 224) -> torch.Tensor:
    """Strong ("S.T.") augmentation of the key crops (SeCo Sec. 3.3, after MoCo v2 / BYOL).

    ``x``: ``N x 3 x s x s`` RGB in [0, 1]; every sample draws its own parameters (one
    ``N x 9`` uniform draw from ``generator``, None = the global RNG of ``x``'s device; with a
    generator it is drawn on the generator's device). Returns the augmented batch, clamped to
    [0, 1], in ``x``'s dtype (computed in fp32, autocast off). Steps, as the release's
    ``s_image`` pipeline (strengths and probabilities: the release's defaults):

    * horizontal flip with ``flip_p`` (of the crop: the key stays aligned with its query);
    * colour jitter with ``jitter_p`` (all four together, as torchvision ``RandomApply``), in the
      fixed order brightness, contrast, saturation, hue; factors uniform in
      ``[max(0, 1 - a), 1 + a]`` (hue shift uniform in ``[-hue, hue]`` turns) with torchvision's
      definitions: brightness ``x * f``, contrast blends with the mean luma of the sample,
      saturation blends with the luma image, hue rotates H in HSV; each clamped to [0, 1];
    * grayscale with ``gray_p`` (luma replicated to 3 channels);
    * Gaussian blur with ``blur_p``, sigma uniform in ``blur_sigma`` (PIL radius = sigma) scaled
      by ``s / blur_ref_size``: the 0.1-2.0 range is the 224-px ImageNet convention of
      MoCo v2 / BYOL. ``blur_ref_size=None`` keeps sigma in pixels of the crop; note the release
      blurs the full 448-px image before cutting its 64-px crops at native resolution, so
      ``None`` is the release's per-pixel blur strength. See :func:`gaussian_blur`.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N x 3 x s x s RGB crops, got shape {tuple(x.shape)}")
    N, _, H, W = x.shape
    gdev = generator.device if generator is not None else x.device
    u = torch.rand(N, 9, generator=generator, device=gdev).to(x.device)
    lo, hi = float(blur_sigma[0]), float(blur_sigma[1])
    scale = 1.0 if blur_ref_size is None else min(H, W) / float(blur_ref_size)

    def pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, 1, 1, 1), a, b)

    def factor(col: int, a: float) -> torch.Tensor:
        return (max(0.0, 1.0 - a) + (1.0 + a - max(0.0, 1.0 - a)) * u[:, col]).view(-1, 1, 1, 1)

    with torch.autocast(device_type=x.device.type, enabled=False):
        y = x.float()
        if flip_p > 0:
            y = pick(u[:, 0] < flip_p, y.flip(-1), y)
        if jitter_p > 0:
            j = y
            if brightness > 0:
                j = (j * factor(2, brightness)).clamp(0.0, 1.0)
            if contrast > 0:
                mean = rgb_to_gray(j).mean(dim=(1, 2, 3), keepdim=True)
                f = factor(3, contrast)
                j = (f * j + (1.0 - f) * mean).clamp(0.0, 1.0)
            if saturation > 0:
                f = factor(4, saturation)
                j = (f * j + (1.0 - f) * rgb_to_gray(j)).clamp(0.0, 1.0)
            if hue > 0:
                j = adjust_hue(j, hue * (2.0 * u[:, 5] - 1.0)).clamp(0.0, 1.0)
            y = pick(u[:, 1] < jitter_p, j, y)
        if gray_p > 0:
            y = pick(u[:, 6] < gray_p, rgb_to_gray(y).expand(-1, 3, -1, -1), y)
        if blur_p > 0 and hi > 0:
            sigma = (lo + (hi - lo) * u[:, 7]) * scale
            y = pick(u[:, 8] < blur_p, gaussian_blur(y, sigma, max_sigma=hi * scale), y)
        y = y.clamp(0.0, 1.0)
    return y.to(x.dtype)
