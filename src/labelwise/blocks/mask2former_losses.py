"""Mask2Former's set criterion for semantic segments with query groups, and its dictionary mode
(CoCal Table 5: "CoCal (Mask2Former)").

References
----------
* Mask2Former (Cheng et al., CVPR 2022), Sec. 3.3 and the official ``modeling/matcher.py`` /
  ``modeling/criterion.py``: Hungarian matching on ``w_class * (-p(c)) + w_mask * BCE +
  w_dice * dice`` (mask terms on ``num_points`` uniform points shared by every pair);
  cross-entropy over ``C + 1`` classes with the no-object class weighted ``no_object`` (0.1);
  sigmoid BCE + dice on importance-sampled points (:func:`labelwise.blocks.mask_losses.mask_losses`)
  summed over matched pairs and divided by ``num_masks``, the batch-wide pair count averaged
  over ranks. Weights 2.0 / 5.0 / 5.0.
* CoCal, Sec. 2.1 and Table 5: the queries become a dictionary, component ``i`` of a level is
  class ``i`` (``blocks.kmax_losses.fixed_match``), no class head. Our reading for a decoder
  with sigmoid masks (the paper gives no more): a component whose class is absent from the
  image is a negative everywhere -- it gets the BCE term against an empty mask (no dice term:
  the dice of an empty target is not defined by Mask2Former), the counterpart of kMaX's absent
  components competing only as negatives in the mask-ID softmax.

Targets per image: ``(masks (M, H, W) bool, classes (M,), group (M,))`` at any resolution (the
points are sampled at the same image locations in predictions and targets); ``groups`` splits
the queries (e.g. ``[part queries, object queries]``) and a target is matched only within its
group. Loops run over images and the (two) groups only; everything is float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from labelwise.blocks.kmax_losses import query_groups
from labelwise.blocks.mask_losses import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    mask_losses,
    point_sample,
    shared_point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords,
)
from labelwise.blocks.matching import hungarian_match_per_group

__all__ = ["MASK2FORMER_WEIGHTS", "mask2former_losses", "mask2former_match"]

#: Mask2Former's loss / matching-cost weights (class, mask BCE, dice) and its no-object weight.
MASK2FORMER_WEIGHTS: dict[str, float] = {"class": 2.0, "mask": 5.0, "dice": 5.0, "no_object": 0.1}


def _target(target: Any, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(target) != 3:
        raise ValueError("a target is (masks (M, H, W), classes (M,), group (M,))")
    masks = torch.as_tensor(target[0], device=device)
    classes = torch.as_tensor(target[1], device=device).long().reshape(-1)
    group = torch.as_tensor(target[2], device=device).long().reshape(-1)
    if masks.dim() != 3 or masks.shape[0] != classes.numel() or group.numel() != classes.numel():
        raise ValueError(f"target masks {tuple(masks.shape)}, {classes.numel()} classes and {group.numel()} "
                         "group ids disagree")
    return masks, classes, group


@torch.no_grad()
def mask2former_match(pred_logits: torch.Tensor | None, pred_masks: torch.Tensor, targets: Sequence[Any], *,
                      groups: Sequence[int] | None = None, weights: Mapping[str, float] | None = None,
                      num_points: int = 12544, generator: torch.Generator | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mask2Former's Hungarian matcher, per image and per query group.

    ``cost[q, t] = w_class * -softmax(pred_logits[q])[c_t] + w_mask * BCE(q, t) + w_dice * dice(q, t)``,
    the mask terms on ``num_points`` uniform points shared by all pairs of the image
    (:func:`~labelwise.blocks.mask_losses.shared_point_sample`). ``pred_logits`` (B, Q, C + 1)
    or ``None`` (no class term); ``pred_masks`` (B, Q, h, w) logits. Returns
    ``[(query_idx, target_idx)]`` sorted by query; no gradient.
    """
    w = {**MASK2FORMER_WEIGHTS, **(weights or {})}
    B, Q = pred_masks.shape[:2]
    if len(targets) != B:
        raise ValueError(f"{len(targets)} targets for a batch of {B}")
    dev = pred_masks.device
    qg = query_groups(Q, groups, dev)
    cls_prob = pred_logits.detach().float().softmax(-1) if pred_logits is not None else None
    out = []
    for b in range(B):
        masks, classes, tg = _target(targets[b], dev)
        if masks.shape[0] == 0:
            z = torch.zeros(0, dtype=torch.long, device=dev)
            out.append((z, z.clone()))
            continue
        p, t = shared_point_sample(pred_masks[b].detach(), masks, num_points, generator=generator)
        cost = w["mask"] * batch_sigmoid_ce_cost(p, t) + w["dice"] * batch_dice_cost(p, t)   # (Q, M)
        if cls_prob is not None:
            cost = cost - w["class"] * cls_prob[b][:, classes]
        rows, cols = hungarian_match_per_group(cost, qg, tg)   # a query only takes targets of its own group
        order = torch.argsort(rows)
        out.append((rows[order], cols[order]))
    return out


def mask2former_losses(outputs: Mapping[str, Any], targets: Sequence[Any],
                       matches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int | None,
                       num_masks: torch.Tensor | float, no_object: float = 0.1, num_points: int = 12544,
                       oversample: float = 3.0, importance: float = 0.75, absent_negative: bool = False,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Mask2Former's losses of one prediction (unweighted; see the module doc).

    ``outputs``: ``pred_masks`` (B, Q, h, w) logits and, when ``num_classes`` is given,
    ``pred_logits`` (B, Q, num_classes + 1). ``matches`` from :func:`mask2former_match` or
    ``fixed_match``. ``num_masks``: the normaliser (a tensor is fine: no host sync).
    ``absent_negative`` (dictionary mode): unmatched queries get BCE against an empty mask.
    Returns ``loss_mask``, ``loss_dice`` and, with classes, ``loss_ce``.
    """
    pm = outputs["pred_masks"]
    B, Q = pm.shape[:2]
    dev = pm.device
    matched = torch.zeros(B, Q, dtype=torch.bool, device=dev)
    src, tgt = [], []
    for b, (qi, ti) in enumerate(matches):
        masks = torch.as_tensor(targets[b][0], device=dev)
        matched[b, qi] = True
        src.append(pm[b, qi])
        tgt.append(masks[ti])
    src_t = torch.cat(src) if src else pm.new_zeros((0,) + tuple(pm.shape[-2:]))
    tgt_t = torch.cat(tgt).float() if tgt else pm.new_zeros((0,) + tuple(pm.shape[-2:]))
    terms = mask_losses(src_t, tgt_t, num_points=num_points, oversample=oversample, importance=importance,
                        generator=generator, num_masks=1.0)            # sums over pairs
    loss_mask, loss_dice = terms["loss_mask"], terms["loss_dice"]
    if absent_negative:
        absent = pm[~matched]                                          # (A, h, w)
        if absent.shape[0]:
            coords = uncertain_point_coords(absent, num_points, oversample, importance, generator=generator)
            logits = point_sample(absent.float()[:, None], coords)[:, 0]
            loss_mask = loss_mask + sigmoid_ce_loss(logits, torch.zeros_like(logits), 1.0)
    out = {"loss_mask": loss_mask / num_masks, "loss_dice": loss_dice / num_masks}
    if num_classes is not None:
        logits = outputs["pred_logits"].float()
        target = torch.full((B, Q), num_classes, dtype=torch.long, device=dev)    # no-object by default
        for b, (qi, ti) in enumerate(matches):
            target[b, qi] = torch.as_tensor(targets[b][1], device=dev).long()[ti]
        weight = torch.ones(num_classes + 1, device=dev)
        weight[-1] = no_object
        out["loss_ce"] = F.cross_entropy(logits.transpose(1, 2), target, weight=weight)
    return out
