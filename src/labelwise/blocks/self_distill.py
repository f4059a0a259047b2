"""Self-distillation between matched teacher and student codes (DINO, Caron et al. 2021; OAP's
query-wise self-distillation).

OAP paper Eq. 1: ``SD(p_t, p_s) = - Σ_k p_t^k log p_s^k`` with ``p_t`` the teacher's softmax code
(centred, sharpened) and ``p_s`` the student's; Eq. 7 sums it over the L bipartite-matched query
pairs. Symbols -> code: ``p_t = softmax((g_t - c) / τ_t)`` (``teacher_logits``, ``center``,
``teacher_temp``), ``p_s = softmax(g_s / τ_s)`` (``student_logits``, ``student_temp``).

The centre ``c`` is an EMA of the teacher's mean code (DINO's collapse prevention): it lives in the
method's state (never in the model, never broadcast) and is updated identically on every rank from
the all-reduced sum and count of this step's teacher codes, so a rank with fewer matched pairs
weighs less — the centre is the mean over all pairs of the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["self_distillation_loss", "update_center"]


def self_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                           teacher_temp: float = 0.04, student_temp: float = 0.1,
                           reduction: str = "mean") -> torch.Tensor:
    """Eq. 1 for every row pair (Eq. 7 over the matched queries).

    ``reduction="sum"`` is Eq. 7 literally (a sum over pairs); ``"mean"`` divides by the number of
    pairs so the loss scale does not depend on how many queries matched. Computed in float32 (the
    sharp teacher softmax underflows in half precision). No pairs -> a zero that keeps the graph.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    p_t = F.softmax((teacher_logits.detach().float() - center.float()) / teacher_temp, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    loss = -(p_t * log_p_s).sum(-1)
    return loss.sum() if reduction == "sum" else loss.mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """``c <- m c + (1 - m) mean(g_t)`` in place, the mean taken over all ranks' rows; a step
    without rows anywhere leaves ``c`` unchanged. Returns ``center``."""
    stats = torch.cat([teacher_logits.detach().float().sum(0),
                       torch.tensor([teacher_logits.shape[0]], dtype=torch.float32, device=center.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    total, count = stats[:-1], stats[-1]
    # count == 0: keep c (written without a host sync: the blend weight becomes 0)
    w = (1.0 - momentum) * (count > 0).float()
    center.mul_(1.0 - w).add_(w * total / count.clamp(min=1.0))
    return center
