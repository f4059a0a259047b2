"""OAP's training losses (OAP Sec. 4.3, Eq. 1, Eq. 7): cropped bipartite matching of the teacher's
pseudo-masks to each local view's queries, Mask2Former mask losses against the matched teacher
masks and query-wise self-distillation between matched teacher and student codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labelwise.blocks.mask_losses import mask_losses
from labelwise.blocks.matching import crop_masks_to_view, match_per_level
from labelwise.blocks.self_distill import self_distillation_loss


@dataclass
class ViewTargets:
    """The teacher's masks cut to one local view (OAP Sec. 4.3, cropped bipartite matching, step 1)."""

    masks: torch.Tensor   # (T', h, w) float in [0, 1], at the student's mask resolution
    level: torch.Tensor   # (T',) long
    logits: torch.Tensor  # (T', K) teacher DINO logits


def crop_targets(masks: torch.Tensor, level: torch.Tensor, logits: torch.Tensor, box: torch.Tensor,
                 global_size: int, global_flip: bool, local_flip: bool, out_size: tuple[int, int]) -> ViewTargets:
    """``masks`` (T, h, w) on the teacher's key grid of the global view (as the teacher saw it, i.e.
    mirrored when ``global_flip``); ``box`` (x0, y0, x1, y1) the local view's region in pixels of
    the *unflipped* global view (side ``global_size``). Masks that do not overlap the view are dropped
    with their level and logits."""
    h, w = masks.shape[-2:]
    if global_flip:
        masks = masks.flip(-1)
    sx, sy = w / global_size, h / global_size
    b = box.float().tolist()
    grid_box = (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)
    cropped, keep = crop_masks_to_view(masks, grid_box, out_size, flip=local_flip)
    return ViewTargets(masks=cropped, level=level[keep], logits=logits[keep])


def match_views(pred_masks: torch.Tensor, pred_level: torch.Tensor, targets: list[ViewTargets],
                num_points: int | None, generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cropped bipartite matching, step 2 (Dice cost, per level) for every view:
    ``pred_masks`` (V, Q, h, w) -> ``[(query_idx, target_idx)]`` per view."""
    return [match_per_level(pred_masks[v].detach(), pred_level, t.masks, t.level, num_points=num_points,
                            generator=generator) for v, t in enumerate(targets)]


def gather_pairs(pred_masks: torch.Tensor, targets: list[ViewTargets], matches) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched ``(pred logits (M, h, w), target masks (M, h, w))`` over all views."""
    preds = [pred_masks[v, q] for v, (q, _) in enumerate(matches)]
    tgts = [targets[v].masks[t] for v, (_, t) in enumerate(matches)]
    return torch.cat(preds), torch.cat(tgts).to(pred_masks.dtype)


def oap_mask_loss(pred_masks: torch.Tensor, targets: list[ViewTargets], matches, num_masks: float, *,
                  num_points: int, oversample: float, importance: float,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Mask2Former's BCE + Dice on importance-sampled points for the matched pairs of every view
    (summed over pairs / ``num_masks``, the batch-wide pair count)."""
    p, t = gather_pairs(pred_masks, targets, matches)
    return mask_losses(p, t, num_points=num_points, oversample=oversample, importance=importance,
                       generator=generator, num_masks=num_masks)


def objectness_loss(pred_logits: torch.Tensor, matches, no_object: float) -> torch.Tensor:
    """Mask2Former's class loss with one class: ``pred_logits`` (V, Q, 2) (object, no-object) of
    every view; a query matched to a teacher mask is an object, every other query no-object;
    cross-entropy weighted ``[1, no_object]`` (Mask2Former's ``empty_weight``), weighted mean."""
    V, Q = pred_logits.shape[:2]
    target = torch.ones(V, Q, dtype=torch.long, device=pred_logits.device)
    for v, (q, _) in enumerate(matches):
        target[v, q] = 0
    weight = pred_logits.new_tensor([1.0, no_object]).float()
    return F.cross_entropy(pred_logits.float().flatten(0, 1), target.flatten(), weight=weight)


def query_distillation(student_logits: torch.Tensor, targets: list[ViewTargets], matches, center: torch.Tensor,
                       teacher_temp: float, student_temp: float, reduction: str = "mean"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """OAP Eq. 7: Eq. 1 (``SD(p_t, p_s)``, teacher centred by ``center`` and sharpened by
    ``teacher_temp``) over the matched (teacher mask, student query) pairs of every view.
    ``student_logits`` (V, Q, K). Returns ``(loss, matched teacher logits (M, K))`` (the latter for
    the centre update)."""
    s = torch.cat([student_logits[v, q] for v, (q, _) in enumerate(matches)])
    t = torch.cat([targets[v].logits[ti] for v, (_, ti) in enumerate(matches)])
    return self_distillation_loss(s, t, center, teacher_temp, student_temp, reduction=reduction), t
