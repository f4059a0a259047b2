"""Contrastive losses shared by SeCo (LiL/LiG), CoBra (CAP/SAP) and CoCal, fully vectorised.

All similarities and log-softmaxes are computed in fp32 whatever the input dtype (AMP-safe);
gradients flow back to the inputs in their own dtype. No Python loops over anchors.

* :func:`masked_info_nce` is the general form: anchors (N, D), candidates (M, D), boolean
  positive/negative masks (N, M). Per anchor the loss is the mean over its positives of
  ``-log softmax``. Two denominators:

  - ``positives_in_denominator=True`` (default): the softmax runs over all positives and
    negatives of the anchor — SupCon (Khosla et al. 2020, L_out) and SeCo Eq. 4 / Eq. 8;
  - ``False``: each positive competes only with the negatives,
    ``-log(e^{s_ij} / (e^{s_ij} + sum_k e^{s_ik}))`` — CoBra Eq. 1 (CAP) and Eq. 2 (SAP).

  Anchors without any positive are excluded. ``reduction``: ``"mean"`` (mean over the
  included anchors of their per-anchor mean; SupCon), ``"pair_mean"`` (sum over all
  positive pairs divided by their number; SeCo's 1/N^+), ``"sum"`` (sum over anchors of the
  per-anchor mean; CoBra Eq. 3 literally), ``"none"`` (per-anchor (N,), 0 where excluded).
* :func:`info_nce` is MoCo's InfoNCE (one positive key, a queue or in-batch negatives).
* :func:`supcon_loss` is supervised contrast with positives = same label.
* :func:`topk_mask` / :func:`select_hard_negatives` pick top/bottom-k entries per row among
  valid ones (CoBra's k_cap/k_sap, CoCal's hard negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "supcon_loss", "masked_info_nce", "info_nce_from_logits", "select_hard_negatives", "topk_mask"]

REDUCTIONS = ("mean", "pair_mean", "sum", "none")


def _masked_lse(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise logsumexp over ``mask``; rows without any entry get 0 (and has=False).

    Rows that are fully masked are computed on zeros so neither value nor gradient is NaN.
    """
    has = mask.any(dim=-1, keepdim=True)
    filled = logits.masked_fill(~mask, float("-inf"))
    filled = torch.where(has, filled, torch.zeros_like(filled))
    return torch.logsumexp(filled, dim=-1, keepdim=True), has


def masked_info_nce(anchor: torch.Tensor, candidates: torch.Tensor, pos_mask: torch.Tensor,
                    neg_mask: torch.Tensor, temperature: float = 0.1, *, normalize: bool = False,
                    positives_in_denominator: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Generic InfoNCE with positives and negatives given by boolean masks (N, M). See module doc.

    Leading batch dimensions are allowed: anchors (..., N, D), candidates (..., M, D), masks
    (..., N, M) (broadcast); "mean" / "sum" / "pair_mean" then reduce over all of them."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    a, c = anchor.float(), candidates.float()
    if normalize:
        a, c = F.normalize(a, dim=-1), F.normalize(c, dim=-1)
    sim = a @ c.transpose(-2, -1) / temperature  # (..., N, M)
    return info_nce_from_logits(sim, pos_mask, neg_mask, positives_in_denominator=positives_in_denominator,
                                reduction=reduction)


def info_nce_from_logits(logits: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor, *,
                         positives_in_denominator: bool = True, reduction: str = "mean") -> torch.Tensor:
    """:func:`masked_info_nce` on precomputed logits (similarity / temperature, (..., N, M), fp32):
    for callers that gather rows of one similarity matrix (CoBra's top-k anchors) instead of
    recomputing it. Masks broadcast against ``logits``. No host synchronisation."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    sim = logits.float()
    pos_mask = pos_mask.bool().expand_as(sim)
    neg_mask = neg_mask.bool().expand_as(sim) & ~pos_mask

    if positives_in_denominator:  # SupCon L_out, SeCo Eq. 4/8
        lse, _ = _masked_lse(sim, pos_mask | neg_mask)
        pair = lse - sim
    else:  # CoBra Eq. 1/2: each positive against the negatives only
        lse_neg, has_neg = _masked_lse(sim, neg_mask)
        lse_neg = torch.where(has_neg, lse_neg, torch.full_like(lse_neg, float("-inf")))
        pair = torch.logaddexp(sim, lse_neg) - sim
    pair = torch.where(pos_mask, pair, torch.zeros_like(pair))

    n_pos = pos_mask.sum(dim=-1)
    valid = n_pos > 0
    if reduction == "pair_mean":  # an empty set gives a 0 that stays on the graph
        return pair.sum() / n_pos.sum().clamp_min(1)
    per_anchor = pair.sum(dim=-1) / n_pos.clamp_min(1)
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / valid.sum().clamp_min(1)


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.2, normalize: bool = True) -> torch.Tensor:
    """MoCo InfoNCE: ``query[i]`` vs its positive ``key[i]`` and negatives, mean over i.

    ``negatives``: (K, D) shared (a queue) or (N, K, D) per query. When ``None`` the other
    keys of the batch are the negatives (in-batch / SimCLR-style). fp32 inside.
    """
    q, k = query.float(), key.float()
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if negatives is None:
        logits = q @ k.t()
        target = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits / temperature, target)
    n = negatives.float()
    if normalize:
        n = F.normalize(n, dim=-1)
    l_pos = (q * k).sum(-1, keepdim=True)
    l_neg = q @ n.t() if n.dim() == 2 else torch.einsum("nd,nkd->nk", q, n)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def supcon_loss(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.1,
                mask: torch.Tensor | None = None, ignore_label: int = -1, normalize: bool = True) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out), positives = same label.

    ``features``: (N, D), or (N, V, D) for V views (flattened; labels repeated). Every other
    valid sample is in the denominator; self-pairs are excluded; samples with
    ``label == ignore_label`` take no part. ``mask`` (N, N) bool overrides label-equality
    positives (it is combined with validity and the self-exclusion). Anchors without
    positives are excluded. Without the original paper's ``T / base_T`` scale.
    """
    if features.dim() == 3:
        n, v, d = features.shape
        features = features.transpose(0, 1).reshape(v * n, d)
        if labels is not None:
            labels = labels.repeat(v)
        if mask is not None:
            mask = mask.repeat(v, v)
    n = features.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    if labels is not None:
        labels = labels.to(features.device).reshape(-1)
        valid = labels != ignore_label
    else:
        valid = torch.ones(n, dtype=torch.bool, device=features.device)
    pair_valid = valid[:, None] & valid[None, :] & ~eye
    if mask is not None:
        pos = mask.to(features.device).bool()
    elif labels is not None:
        pos = labels[:, None] == labels[None, :]
    else:
        raise ValueError("supcon_loss needs labels or mask")
    pos = pos & pair_valid
    return masked_info_nce(features, features, pos, pair_valid & ~pos, temperature, normalize=normalize,
                           positives_in_denominator=True, reduction="mean")


def topk_mask(scores: torch.Tensor, k: int, largest: bool = True, valid: torch.Tensor | None = None,
              dim: int = -1) -> torch.Tensor:
    """Boolean mask of the ``k`` largest (or smallest) entries per row among ``valid`` ones.

    Rows with fewer than ``k`` valid entries select all their valid entries. ``k <= 0`` selects
    nothing. Ties are broken by ``torch.topk``.
    """
    dim = dim % scores.dim()
    size = scores.shape[dim]
    k = min(int(k), size)
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return out
    s = scores.float()
    if valid is not None:
        valid = valid.bool()
        s = s.masked_fill(~valid, float("-inf") if largest else float("inf"))
    idx = s.topk(k, dim=dim, largest=largest).indices
    out.scatter_(dim, idx, True)
    return out & valid if valid is not None else out


def select_hard_negatives(sim: torch.Tensor, neg_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (N, M) of the ``k`` most similar negatives of each anchor (hard negatives)."""
    return topk_mask(sim, k, largest=True, valid=neg_mask)
