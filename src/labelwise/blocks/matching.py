"""Hungarian (optimal one-to-one) matching on a cost or score matrix.

Used by the unsupervised evaluation (clusters -> classes, as in STEGO / U2Seg) and by
set-prediction losses. Rectangular matrices are allowed: ``min(R, C)`` pairs are
returned and the surplus rows (or columns) stay unmatched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    import torch

__all__ = ["hungarian_match", "hungarian_match_batch", "hungarian_match_per_group", "crop_masks_to_view",
           "match_per_level"]


def hungarian_match(cost: Any, maximize: bool = False):
    """Optimal assignment of rows to columns of a 2-D ``cost`` (numpy array or torch tensor).

    Returns ``(row_idx, col_idx)`` sorted by row, ``min(R, C)`` pairs, minimising the summed
    cost (maximising it with ``maximize=True``). A torch input gives ``int64`` tensors on the
    input's device, a numpy/list input gives ``int64`` arrays.
    """
    is_torch = hasattr(cost, "detach")
    arr = cost.detach().cpu().double().numpy() if is_torch else np.asarray(cost, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"hungarian_match expects a 2-D cost matrix, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("hungarian_match: the cost matrix contains NaN")
    if arr.size == 0:
        rows = cols = np.zeros(0, dtype=np.int64)
    else:
        rows, cols = linear_sum_assignment(arr, maximize=maximize)
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    if is_torch:
        import torch

        return (torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device))
    return rows, cols


def hungarian_match_batch(costs: Sequence[Any], maximize: bool = False) -> list[tuple[Any, Any]]:
    """:func:`hungarian_match` for each matrix of a list (matrices may differ in shape)."""
    return [hungarian_match(c, maximize=maximize) for c in costs]


def hungarian_match_per_group(cost: "torch.Tensor", pred_group: "torch.Tensor", target_group: "torch.Tensor"
                              ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Hungarian matching of a (Q, T) ``cost`` separately within each group: prediction ``q`` may
    only take targets with ``target_group == pred_group[q]``. Returns ``(pred_idx, target_idx)``,
    group after group in ascending group id (empty when no group has both predictions and targets)."""
    import torch

    rows, cols = [], []
    for g in torch.unique(target_group).tolist():
        qi = torch.nonzero(pred_group == g).squeeze(1)
        ti = torch.nonzero(target_group == g).squeeze(1)
        if qi.numel() == 0 or ti.numel() == 0:
            continue
        r, c = hungarian_match(cost[qi][:, ti])
        rows.append(qi[r])
        cols.append(ti[c])
    if not rows:
        z = torch.zeros(0, dtype=torch.long, device=cost.device)
        return z, z.clone()
    return torch.cat(rows), torch.cat(cols)


def crop_masks_to_view(masks: "torch.Tensor", box: Sequence[float], out_size: tuple[int, int],
                       flip: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Cropped bipartite matching, step 1 (OAP Sec. 4.3): the teacher's masks ``(T, H, W)`` on the
    global view, cut to a student view's region ``box = (x0, y0, x1, y1)`` (pixels of the mask's
    grid, floats allowed) and resampled to the student's mask size ``out_size = (h, w)``
    (``roi_align``, bilinear, pixel-centre aligned), mirrored when the view was flipped.

    Returns ``(cropped (T', h, w) float in [0, 1], keep (T,) bool)``: a mask is kept when it
    overlaps the view, i.e. some student pixel is mostly inside it (``> 0.5``); the others are
    dropped, with their embeddings, by the caller through ``keep``."""
    import torch
    from torchvision.ops import roi_align

    T = masks.shape[0]
    if T == 0:
        return masks.new_zeros((0,) + tuple(out_size), dtype=torch.float32), torch.zeros(
            0, dtype=torch.bool, device=masks.device)
    boxes = torch.tensor([[0.0, *map(float, box)]], device=masks.device)
    m = masks.float()[None]                                        # one "image" with T channels
    out = roi_align(m, boxes, output_size=tuple(out_size), spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]
    if flip:
        out = out.flip(-1)
    keep = (out > 0.5).flatten(1).any(1)
    return out[keep], keep


def match_per_level(pred_logits: "torch.Tensor", pred_level: "torch.Tensor", target_masks: "torch.Tensor",
                    target_level: "torch.Tensor", num_points: int | None = None,
                    generator: "torch.Generator | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Cropped bipartite matching, step 2: Hungarian matching on the Dice cost, separately within
    each segmentation level (semantic queries only to semantic masks, instance to instance).

    ``pred_logits (Q, h, w)``, ``pred_level (Q,)``, ``target_masks (T, h, w)`` in [0, 1],
    ``target_level (T,)``. With ``num_points`` the cost is computed on that many shared random
    points (as Mask2Former's matcher), else on every pixel. Returns ``(pred_idx, target_idx)``."""
    import torch

    from labelwise.blocks.mask_losses import batch_dice_cost

    if pred_logits.shape[1:] != target_masks.shape[1:]:
        # the point sampling below indexes both with the same flat indices: different grids would
        # silently pair unrelated pixels
        raise ValueError(f"match_per_level: predictions {tuple(pred_logits.shape[1:])} and targets "
                         f"{tuple(target_masks.shape[1:])} must share a mask size; resample the targets to the "
                         "predictions' (h, w) first (crop_masks_to_view does)")
    p = pred_logits.flatten(1).float()
    t = target_masks.flatten(1).float()
    if num_points is not None and num_points < p.shape[1]:
        idx = torch.randperm(p.shape[1], generator=generator, device="cpu")[:num_points].to(p.device)
        p, t = p[:, idx], t[:, idx]
    with torch.no_grad():
        cost = batch_dice_cost(p, t)
    return hungarian_match_per_group(cost, pred_level, target_level)
