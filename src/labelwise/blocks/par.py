"""Pixel-Adaptive Refinement (PAR) and CAM -> pseudo-label refinement with a background score.

PAR is the training-time mask refiner of Ru et al., "Learning Affinity from Attention:
End-to-End Weakly-Supervised Semantic Segmentation with Transformers" (AFA, CVPR 2022,
Sec. 3.3) and "Token Contrast for Weakly-Supervised Semantic Segmentation" (ToCo, CVPR 2023),
reused by SeCo. This module follows the released ``PAR`` (``num_iter=10``, dilations
``(1, 2, 4, 8, 12, 24)``, ``w1=0.3``, ``w2=0.01``) but is written from its description.

**Neighbourhood.** For every dilation ``d`` the 8 neighbours at offsets
``(dy, dx) in {-d, 0, d}^2 \\ {(0, 0)}`` in the order TL, T, TR, L, R, BL, B, BR, taken with
replicate padding (coordinates clamped to the image); ``N = 8 * len(dilations)`` neighbours
(48 by default), ordered dilation-major. ``shift_n(X)[i] = X[clamp(i + offset_n)]``.

**Affinity** (AFA Eq. 8-9 as released). For an image ``I`` (B x 3 x h x w, values in [0, 1]),
per pixel ``i`` and channel ``c``::

    sigma_ci = std_n(I_c[shift_n i])                        (unbiased, over the N neighbours)
    kappa_ni = -(1/3) sum_c ( |I_c[shift_n i] - I_ci| / (sigma_ci + 1e-8) / w1 )^2
    rho_n    = -( p_n / (std_n(p) + 1e-8) / w1 )^2          (p_n = d axial, sqrt(2) d diagonal)
    A_ni     = softmax_n(kappa_.i)_n + w2 * softmax_n(rho)_n

so ``sum_n A_ni = 1 + w2`` (not renormalised, as released). **Propagation**: ``num_iter``
times ``M_i <- sum_n A_ni M[shift_n i]`` for every channel of the masks independently
(the centre pixel is not a neighbour). PAR is linear in ``M`` per channel, so a channel that
is 0 everywhere stays 0, and a constant image gives ``kappa = 0`` (``0 / 1e-8``), i.e. the
image term is uniform ``1/N`` and a constant mask is multiplied by ``(1 + w2)^num_iter``.

:func:`refine_cams_with_background` and :func:`pseudo_labels_high_low` are the batched form
of the release's ``refine_cams_with_bkg_v2`` (ToCo/SeCo): a constant background channel,
softmax over background + present classes, PAR, argmax; two background scores (high /
low) give foreground / background / uncertain pseudo labels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PAR", "dilated_neighbours", "refine_cams_with_background", "pseudo_labels_high_low"]

# (dy, dx) in units of the dilation: TL, T, TR, L, R, BL, B, BR (the release's kernel order).
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 (AMP-safe: half inputs are computed in float32)."""
    return torch.promote_types(x.dtype, torch.float32)


def _shifted_views(x: torch.Tensor, d: int) -> list[torch.Tensor]:
    """The 8 neighbour views of ``x`` (B, C, H, W) at dilation ``d``, replicate padding (one pad)."""
    H, W = x.shape[-2:]
    xp = F.pad(x, [d, d, d, d], mode="replicate")
    return [xp[..., d + dy * d: d + dy * d + H, d + dx * d: d + dx * d + W] for dy, dx in _OFFSETS]


def dilated_neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """All neighbours of every pixel: (B, C, H, W) -> (B, C, 8 * len(dilations), H, W).

    Neighbour ``8 * j + k`` is offset ``_OFFSETS[k] * dilations[j]`` (TL, T, TR, L, R, BL, B, BR),
    with replicate padding (coordinates clamped to the image).
    """
    return torch.stack([v for d in dilations for v in _shifted_views(x, int(d))], dim=2)


def neighbour_distances(dilations: Sequence[int], dtype: torch.dtype = torch.float64,
                        device: torch.device | None = None) -> torch.Tensor:
    """Distances ``p_n`` of the neighbours: ``d`` for axial, ``sqrt(2) d`` for diagonal ones."""
    unit = [math.sqrt(2.0) if dy != 0 and dx != 0 else 1.0 for dy, dx in _OFFSETS]
    return torch.tensor([u * float(d) for d in dilations for u in unit], dtype=dtype, device=device)


class PAR(nn.Module):
    """Pixel-adaptive refinement of masks by image-dependent local affinities (AFA/ToCo).

    ``forward(image (B, 3, h, w) in [0, 1], masks (B, C, h', w')) -> (B, C, h, w)``. Masks
    of another size are first resized bilinearly with ``align_corners=True`` (as released).
    See the module docstring for the formula. Computed in at least float32 (the input's
    dtype if wider); no parameters, no buffers. Memory: the affinity is (B, N, h, w) and the
    neighbour stack of the image (B, 3, N, h, w); the propagation never stacks the masks.
    """

    def __init__(self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10,
                 w1: float = 0.3, w2: float = 0.01):
        super().__init__()
        dilations = tuple(int(d) for d in dilations)
        if not dilations or min(dilations) < 1:
            raise ValueError(f"PAR needs at least one dilation >= 1, got {dilations}")
        if num_iter < 0:
            raise ValueError(f"PAR needs num_iter >= 0, got {num_iter}")
        if w1 <= 0:
            raise ValueError(f"PAR needs w1 > 0, got {w1}")
        self.dilations = dilations
        self.num_iter = int(num_iter)
        self.w1 = float(w1)
        self.w2 = float(w2)

    def extra_repr(self) -> str:
        return f"dilations={self.dilations}, num_iter={self.num_iter}, w1={self.w1}, w2={self.w2}"

    def position_weights(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """``softmax_n(rho)`` (N,), the same at every pixel (computed in float64)."""
        p = neighbour_distances(self.dilations, dtype=torch.float64)
        rho = -(p / (p.std() + 1e-8) / self.w1) ** 2
        return torch.softmax(rho, dim=0).to(dtype=dtype, device=device)

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """``A`` (B, N, h, w): ``softmax_n(kappa) + w2 * softmax_n(rho)`` (module docstring)."""
        if image.dim() != 4:
            raise ValueError(f"PAR needs a (B, C, h, w) image, got shape {tuple(image.shape)}")
        img = image.to(_float_dtype(image))
        nb = dilated_neighbours(img, self.dilations)                 # B, 3, N, h, w
        sigma = nb.std(dim=2, keepdim=True)                          # unbiased, over neighbours
        kappa = -((nb - img.unsqueeze(2)).abs() / (sigma + 1e-8) / self.w1).pow(2).mean(dim=1)
        pos = self.position_weights(img.dtype, img.device).view(1, -1, 1, 1)
        return torch.softmax(kappa, dim=1) + self.w2 * pos

    def propagate(self, masks: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
        """One step ``M_i <- sum_n A_ni M[shift_n i]``: one padding per dilation, no mask stack."""
        out = torch.zeros_like(masks)
        n = 0
        for d in self.dilations:
            for view in _shifted_views(masks, d):
                out = out + view * aff[:, n: n + 1]
                n += 1
        return out

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if masks.dim() != 4 or masks.shape[0] != image.shape[0]:
            raise ValueError(f"PAR needs masks (B, C, h, w) with B = {image.shape[0]}, got {tuple(masks.shape)}")
        aff = self.affinity(image)
        masks = masks.to(aff.dtype)
        if masks.shape[-2:] != image.shape[-2:]:
            masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
        for _ in range(self.num_iter):
            masks = self.propagate(masks, aff)
        return masks


@torch.no_grad()
def refine_cams_with_background(par: PAR, image: torch.Tensor, cams: torch.Tensor, tags: torch.Tensor,
                                bg_score: float | torch.Tensor, *, valid: torch.Tensor | None = None,
                                out_size: tuple[int, int] | None = None,
                                ignore_index: int = 255) -> torch.Tensor:
    """Label map from CAMs with a constant background score, refined by PAR (no grad).

    Batched ``refine_cams_with_bkg_v2`` of ToCo/SeCo. ``image`` (B, 3, h, w) in [0, 1] at the
    resolution PAR runs at; ``cams`` (B, K, h', w') normalised foreground CAMs in [0, 1]
    (resized bilinearly, ``align_corners=False``, to (h, w) if different, as the release
    downsamples them before the softmax); ``tags`` (B, K) multi-hot; ``bg_score`` a float or
    a (B,) tensor (one background score per image). Steps::

        z = [bg, cam_1, ..., cam_K]            (channel 0 = bg_score everywhere)
        z_k = -inf for absent classes          (tags[k - 1] == 0; background is always kept)
        P = PAR(image, softmax_k(z))           (absent channels are 0 and stay 0)
        label = argmax_k P                     (0 = background, k = class k)

    With ``out_size`` the refined ``P`` is resized bilinearly (``align_corners=False``) to it
    before the argmax (the release runs PAR at half resolution and upsamples). ``valid``
    (B, H, W) bool at the output size: pixels outside become ``ignore_index`` (the release's
    image box). Returns int64 (B, H, W).
    """
    if cams.dim() != 4 or cams.shape[0] != image.shape[0]:
        raise ValueError(f"cams must be (B, K, h, w) with B = {image.shape[0]}, got {tuple(cams.shape)}")
    B, K = cams.shape[:2]
    tags = torch.as_tensor(tags, device=cams.device)
    if tuple(tags.shape) != (B, K):
        raise ValueError(f"tags must be (B, K) = {(B, K)}, got {tuple(tags.shape)}")
    dtype = _float_dtype(cams)
    h, w = image.shape[-2:]
    cams = cams.to(dtype)
    if cams.shape[-2:] != (h, w):
        cams = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)
    bg = torch.as_tensor(bg_score, dtype=dtype, device=cams.device).reshape(-1, 1, 1, 1).expand(B, 1, h, w)
    logits = torch.cat([bg, cams], dim=1)
    keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=cams.device), tags > 0], dim=1)
    logits = logits.masked_fill(~keep[:, :, None, None], float("-inf"))
    probs = par(image, torch.softmax(logits, dim=1))
    if out_size is not None and tuple(out_size) != tuple(probs.shape[-2:]):
        probs = F.interpolate(probs, size=tuple(out_size), mode="bilinear", align_corners=False)
    label = probs.argmax(dim=1)
    if valid is not None:
        label = label.masked_fill(~valid.to(device=label.device, dtype=torch.bool), ignore_index)
    return label


@torch.no_grad()
def pseudo_labels_high_low(par: PAR, image: torch.Tensor, cams: torch.Tensor, tags: torch.Tensor,
                           high: float = 0.7, low: float = 0.25, ignore_index: int = 255, *,
                           valid: torch.Tensor | None = None,
                           out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Segmentation pseudo labels from two background scores (ToCo/SeCo, one PAR call on 2B).

    ``label_high`` / ``label_low`` are :func:`refine_cams_with_background` with
    ``bg_score = high`` / ``low``. Final label (release step 5)::

        label_high        where label_high > 0          (foreground, confident)
        0                 where label_high == label_low == 0
        ignore_index      otherwise                     (uncertain)

    and ``ignore_index`` outside ``valid``. Defaults are SeCo's VOC values. Returns int64 (B, H, W).
    """
    B = cams.shape[0]
    dtype = _float_dtype(cams)
    bg = torch.cat([torch.full((B,), float(high), dtype=dtype, device=cams.device),
                    torch.full((B,), float(low), dtype=dtype, device=cams.device)])
    tags = torch.as_tensor(tags, device=cams.device)
    both = refine_cams_with_background(par, torch.cat([image, image]), torch.cat([cams, cams]),
                                       torch.cat([tags, tags]), bg, out_size=out_size)
    label_high, label_low = both[:B], both[B:]
    fill = torch.full_like(label_high, ignore_index)
    label = torch.where(label_high > 0, label_high, torch.where(label_low == 0, torch.zeros_like(fill), fill))
    if valid is not None:
        label = label.masked_fill(~valid.to(device=label.device, dtype=torch.bool), ignore_index)
    return label
