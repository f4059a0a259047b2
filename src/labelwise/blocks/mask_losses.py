"""Point-sampled mask losses and matching costs of Mask2Former (vectorised).

References
----------
* Mask2Former (Cheng et al., CVPR 2022), Sec. 3.3 "Improving training efficiency": mask
  losses on ``K = 112 * 112 = 12544`` points; for the loss, importance sampling as PointRend
  (Kirillov et al., CVPR 2020): ``oversample_ratio * K`` uniform candidates, the
  ``importance_ratio * K`` most uncertain (``-|logit|``) kept, the rest uniform; for the
  matching cost, the same ``K`` uniform points for every prediction / target pair.
  Official code: facebookresearch/Mask2Former ``modeling/criterion.py`` and
  ``modeling/matcher.py``; detectron2 ``projects/PointRend/point_rend/point_features.py``
  (``point_sample``, ``get_uncertain_point_coords_with_randomness``).

All functions take per-mask tensors with masks on the first axis; nothing loops over masks
or points in Python. Point coordinates are (x, y) in ``[0, 1]`` of the whole map
(``grid_sample`` with ``align_corners=False``), so predictions and targets of different
resolutions are sampled at the same image locations. Sampling and losses run in float32
even under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "dice_loss",
    "mask_losses",
    "point_sample",
    "shared_point_sample",
    "sigmoid_ce_loss",
    "uncertain_point_coords",
]


def point_sample(input: torch.Tensor, coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear values of ``input`` (N, C, H, W) at ``coords`` (N, P, 2) or (N, Hp, Wp, 2),
    (x, y) in ``[0, 1]``; returns (N, C, P) or (N, C, Hp, Wp). Outside the map the values
    are zero-padded (``grid_sample``'s default), as detectron2's ``point_sample``."""
    add_dim = coords.dim() == 3
    if add_dim:
        coords = coords.unsqueeze(2)
    out = F.grid_sample(input, 2.0 * coords.to(input.dtype) - 1.0, mode="bilinear", padding_mode="zeros",
                        align_corners=align_corners)
    return out.squeeze(3) if add_dim else out


def _as_n1hw(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4 and x.shape[1] == 1:
        return x
    raise ValueError(f"expected (N, H, W) or (N, 1, H, W) masks, got {tuple(x.shape)}")


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_ratio: float = 0.75, generator: torch.Generator | None = None) -> torch.Tensor:
    """PointRend / Mask2Former training points for mask logits (N, H, W) or (N, 1, H, W).

    Draws ``int(num_points * oversample_ratio)`` uniform candidates per mask, keeps the
    ``int(importance_ratio * num_points)`` with the highest uncertainty ``-|logit|`` (closest
    to the decision boundary) and adds ``num_points - that`` fresh uniform points. Returns
    (N, num_points, 2) coordinates in ``[0, 1]`` (no gradient). ``generator`` must live on
    the logits' device.
    """
    if oversample_ratio < 1 or not 0 <= importance_ratio <= 1:
        raise ValueError("need oversample_ratio >= 1 and 0 <= importance_ratio <= 1")
    logits = _as_n1hw(logits).detach().float()
    n, dev = logits.shape[0], logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    num_random = num_points - num_uncertain
    cand = torch.rand(n, num_sampled, 2, device=dev, generator=generator)
    uncertainty = -point_sample(logits, cand).abs()[:, 0]  # (N, num_sampled)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    coords = torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=dev, generator=generator)], dim=1)
    return coords


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """Binary cross-entropy of point logits ``inputs`` (N, P) vs ``targets`` (N, P) in [0, 1],
    mean over points, summed over masks, divided by ``num_masks`` (default N, at least 1)."""
    num_masks = max(float(inputs.shape[0] if num_masks is None else num_masks), 1.0)
    loss = F.binary_cross_entropy_with_logits(inputs.float(), targets.float(), reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` per mask, ``p = sigmoid(inputs)``,
    over the last axis of (N, P) tensors (or flattened (N, ...)), summed over masks and
    divided by ``num_masks`` (default N, at least 1)."""
    num_masks = max(float(inputs.shape[0] if num_masks is None else num_masks), 1.0)
    p = inputs.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def mask_losses(pred_logits_matched: torch.Tensor, target_masks: torch.Tensor, num_points: int = 12544,
                oversample: float = 3.0, importance: float = 0.75, generator: torch.Generator | None = None,
                num_masks: float | None = None) -> dict[str, torch.Tensor]:
    """Mask2Former's ``loss_masks`` for matched pairs: mask logits (M, H, W) vs targets
    (M, H', W') (binary or soft, any resolution) on importance-sampled points (chosen on the
    predictions, without gradient). Returns ``{"loss_mask": sigmoid CE, "loss_dice": dice}``,
    each summed over masks / ``num_masks`` (default M; pass the batch-wide count, as
    Mask2Former's all-reduced ``num_masks``). Unweighted: multiply by 5.0 / 5.0 for OAP's
    settings. With M = 0 both are zeros that still depend on the predictions."""
    if pred_logits_matched.shape[0] != target_masks.shape[0]:
        raise ValueError("pred_logits_matched and target_masks need the same number of masks")
    if pred_logits_matched.shape[0] == 0:
        zero = pred_logits_matched.float().sum() * 0.0
        return {"loss_mask": zero, "loss_dice": zero.clone()}
    src = _as_n1hw(pred_logits_matched).float()
    tgt = _as_n1hw(target_masks).float()
    with torch.no_grad():
        coords = uncertain_point_coords(src, num_points, oversample, importance, generator=generator)
        point_labels = point_sample(tgt, coords)[:, 0]
    point_logits = point_sample(src, coords)[:, 0]
    return {"loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks)}


def shared_point_sample(pred_logits: torch.Tensor, target_masks: torch.Tensor, num_points: int = 12544,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former matcher's sampling: the same ``num_points`` uniform points for all
    predictions (Q, H, W) and targets (T, H', W'); returns (Q, P) logits and (T, P) targets
    (float32), inputs for :func:`batch_dice_cost` / :func:`batch_sigmoid_ce_cost`."""
    coords = torch.rand(1, num_points, 2, device=pred_logits.device, generator=generator)
    p = point_sample(_as_n1hw(pred_logits).float(), coords.expand(pred_logits.shape[0], -1, -1))[:, 0]
    t = point_sample(_as_n1hw(target_masks).float().to(pred_logits.device),
                     coords.expand(target_masks.shape[0], -1, -1))[:, 0]
    return p, t


def batch_dice_cost(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss between every prediction (Q, P) logits and every target (T, P):
    ``cost[q, t] = 1 - (2 sum(p_q t_t) + 1) / (sum p_q + sum t_t + 1)`` -> (Q, T)."""
    p = pred_logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    numerator = 2 * p @ t.T
    denominator = p.sum(-1)[:, None] + t.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pairwise mean-over-points binary cross-entropy, (Q, P) logits vs (T, P) targets -> (Q, T)
    (Mask2Former's ``batch_sigmoid_ce_loss``)."""
    x = pred_logits.float().flatten(1)
    t = target.float().flatten(1)
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    return (pos @ t.T + neg @ (1 - t).T) / x.shape[1]
