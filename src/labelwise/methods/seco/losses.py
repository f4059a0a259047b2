"""SeCo's losses and knowledge updates, vectorised (no loops over patches, anchors or pixels).

=====================  ==========================================================================
symbol                 paper
=====================  ==========================================================================
``token_labels``       the auxiliary pseudo mask M_aux at token resolution (Sec. 3.3, Eq. 1), with
                       the CAM thresholds: > high class, <= low background, between uncertain
``ptc_loss``           ToCo's patch token contrast (Ru et al. 2023), SeCo Sec. 3.6 regulariser
``update_prototypes``  SeCo Eq. 3 (adaptive, similarity-weighted prototype update)
``lig_loss``           SeCo Eq. 4 (L_LiG: patches vs category prototypes, co-categories as negatives;
                       ``lig_pairs`` gives its positive and negative pairs)
``rectify_tags``       SeCo Eqs. 6-7 (similarity-based rectification of noisy tags)
``lil_loss``           SeCo Eq. 8 (L_LiL: tag-guided contrast against the reservoir)
``seg_loss``           L_seg (Sec. 3.6): cross-entropy on the refined pseudo labels, background and
                       foreground pixels weighted equally (as released)
=====================  ==========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labelwise.blocks.contrastive import masked_info_nce

__all__ = ["token_labels", "ptc_loss", "update_prototypes", "lig_pairs", "lig_loss", "rectify_tags", "lil_loss",
           "seg_loss", "IGNORE"]

IGNORE = 255


def token_labels(cams: torch.Tensor, tags: torch.Tensor, size: tuple[int, int], high: float, low: float,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Labels ``B x h x w`` at token resolution from normalised CAMs ``B x K x H x W``.

    v = max over the image's classes of the CAM (bilinearly resized to ``size``): class
    ``argmax + 1`` where v > high, 0 (background) where v <= low, 255 (uncertain) in between
    and where the token centre is outside ``valid`` (``B x H x W`` bool, crop padding).
    """
    c = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False) * tags[:, :, None, None]
    v, idx = c.max(dim=1)
    lab = torch.full_like(idx, IGNORE)
    lab = torch.where(v > high, idx + 1, lab)
    lab = torch.where(v <= low, torch.zeros_like(lab), lab)
    if valid is not None:
        inside = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
        lab = torch.where(inside, lab, torch.full_like(lab, IGNORE))
    return lab


def ptc_loss(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ToCo patch token contrast: pull together tokens with the same label, push apart the rest.

    ``tokens`` B x D x h x w (final layer, with grad), ``labels`` B x h x w (0..K, 255 ignored).
    With S = |cos(t_i, t_j)| over token pairs of one image (i != j, both labelled):
    ``L = 0.5 * (1 - sum_pos S / (N_pos + 1)) + 0.5 * sum_neg S / (N_neg + 1)``, sums and counts over
    the batch (ToCo's released form).
    """
    B, D = tokens.shape[:2]
    f = F.normalize(tokens.float().flatten(2).transpose(1, 2), dim=-1, eps=1e-8)  # B x N x D
    sim = (f @ f.transpose(1, 2)).abs()
    lab = labels.flatten(1)
    ok = lab != IGNORE
    pair = ok[:, :, None] & ok[:, None, :] & ~torch.eye(lab.shape[1], dtype=torch.bool, device=lab.device)
    same = lab[:, :, None] == lab[:, None, :]
    pos, neg = pair & same, pair & ~same
    pos_term = (sim * pos).sum() / (pos.sum() + 1)
    neg_term = (sim * neg).sum() / (neg.sum() + 1)
    return 0.5 * (1.0 - pos_term) + 0.5 * neg_term


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, seen: torch.Tensor, tokens: torch.Tensor, tags: torch.Tensor,
                      momentum: float, mode: str = "adaptive") -> None:
    """SeCo Eq. 3, in place: ``P_l <- Norm(eta P_l + W_l (1 - eta) Z)`` for every class l of an image.

    ``prototypes`` K x D (unit rows), ``seen`` K bool, ``tokens`` B x D class tokens Z of the
    global teacher (the shared encoder; used as they are, as Eq. 3 and the release do),
    ``tags`` B x K multi-hot. W_l = softmax over the image's classes of cos(Z, P_l) for a
    multi-class image and 1 for a single-class one (``mode="adaptive"``, the paper);
    ``mode="single"`` updates from single-class images only (the release). A prototype's
    first update sets it to ``Norm(W Z)`` (its initial value carries no information).

    The B images of a step are consecutive updates in sample order, applied in closed form:
    class l updated by images j_1 < ... < j_n becomes
    ``Norm(eta^n P_l + (1 - eta) sum_m eta^(n-m) W_{j_m l} Z_{j_m})``, with every W computed from
    the prototypes before the step (a literal loop would renormalise in between, which only
    rescales the intermediate values, and recompute W from them).
    """
    tags = tags.float()
    n_cls = tags.sum(1)
    Z = tokens.float()
    if mode == "single":
        tags = tags * (n_cls == 1)[:, None].float()
    present = tags > 0
    sim = F.normalize(Z, dim=-1) @ F.normalize(prototypes.float(), dim=-1).t()  # B x K
    W = torch.softmax(sim.masked_fill(~present, float("-inf")), dim=1).nan_to_num(0.0)
    W = torch.where((n_cls == 1)[:, None], tags, W * tags)  # single-class images: W = 1
    rank = torch.cumsum(tags, dim=0) - tags  # image b is the (rank+1)-th update of class l in this step
    n = tags.sum(0)  # K: updates of each class in this step
    coef = (1 - momentum) * momentum ** (n[None] - 1 - rank)
    first = present & (rank == 0) & ~seen[None]  # the first update of an unseen prototype: weight 1
    coef = torch.where(first, momentum ** (n[None] - 1 - rank), coef) * W * present
    old = torch.where(seen[:, None], prototypes.float() * momentum ** n[:, None], torch.zeros_like(prototypes.float()))
    new = F.normalize(old + coef.t() @ Z, dim=-1)
    upd = n > 0
    prototypes.copy_(torch.where(upd[:, None], new, prototypes.float()).to(prototypes.dtype))
    seen.logical_or_(upd)


def lig_pairs(tags: torch.Tensor, seen: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative (anchor, prototype) pairs of Eq. 4, each M x K bool: an anchor is a
    foreground-tagged patch whose class prototype has been seen; its negatives are the seen
    prototypes ``allowed`` in its P_s other than its own class."""
    K = seen.shape[0]
    fg = tags > 0
    pos = F.one_hot((tags - 1).clamp(min=0), K).bool() & fg[:, None] & seen[None]
    neg = allowed & seen[None] & ~pos
    return pos, neg


def lig_loss(q: torch.Tensor, tags: torch.Tensor, prototypes: torch.Tensor, seen: torch.Tensor,
             allowed: torch.Tensor, tau: float,
             pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SeCo Eq. 4: ``-(1/N_g^+) sum_i log exp(q_i.P_l+ / tau) / sum_{P_l in P_s} exp(q_i.P_l / tau)``.

    ``q`` M x D unit patch embeddings, ``tags`` M (1..K foreground class, 0 background, -1 uncertain:
    only foreground-tagged patches are anchors), ``prototypes`` K x D (detached), ``seen`` K bool,
    ``allowed`` M x K bool: the prototypes P_s of each anchor's denominator, "the knowledge with the
    appeared categories" (``seco.lig_negatives``: those of the batch, or of the anchor's image).
    Unseen prototypes take no part. ``pairs``: :func:`lig_pairs` if already computed.
    """
    pos, neg = lig_pairs(tags, seen, allowed) if pairs is None else pairs
    return masked_info_nce(q, prototypes.detach(), pos, neg, tau, reduction="pair_mean")


@torch.no_grad()
def rectify_tags(q: torch.Tensor, tags: torch.Tensor, bank: torch.Tensor, bank_tags: torch.Tensor,
                 sigma: float) -> torch.Tensor:
    """SeCo Eqs. 6-7: tags of anchors whose positive similarities are abnormal become -1.

    For anchor i with tag t_i >= 0 and positives R+ = reservoir entries with tag t_i:
    mu_i = mean_{k in R+} q_i.k (Eq. 6); N_v = #{k in R+ : q_i.k < mu_i}; ``t_i <- -1`` if
    N_v / |R+| > sigma (Eq. 7). A correctly tagged patch resembles most of its positives (its
    similarities have a long *low* tail: few below the mean); a mis-tagged one resembles only a
    few of them (long *high* tail: most below the mean). Returns the rectified tags.
    """
    sim = q.float() @ bank.float().t()  # M x N
    pos = (bank_tags[None] == tags[:, None]) & (tags[:, None] >= 0)
    n_pos = pos.sum(1)
    mu = (sim * pos).sum(1) / n_pos.clamp(min=1)
    below = ((sim < mu[:, None]) & pos).sum(1)
    noisy = (n_pos > 0) & (below.float() / n_pos.clamp(min=1) > sigma)
    return torch.where(noisy, torch.full_like(tags, -1), tags)


def lil_loss(q: torch.Tensor, tags: torch.Tensor, candidates: torch.Tensor, cand_tags: torch.Tensor,
             self_index: torch.Tensor | None, tau: float, form: str = "paper") -> torch.Tensor:
    """SeCo Eq. 8: ``-(1/N_l^+) sum_i sum_{k+} M_f log exp(q_i.k+ / tau) / sum_{k' in R} exp(q_i.k' / tau)``.

    ``q`` M x D anchors (with grad), ``tags`` M after rectification (M_f = tags != -1),
    ``candidates`` C x D = the reservoir R(x, t) of Eq. 5 (current queries, current keys and the
    queue; no grad) with ``cand_tags`` C. Positives: candidates with the anchor's tag; entries
    tagged -1 take no part (noisy, Sec. 3.3). ``self_index`` M: the column of each anchor's own
    query among the candidates (excluded), or None.

    ``form="release"`` keeps the terms and normalises as the authors' release does:
    ``-(1 / (M N+)) sum_i (sum_{k+} q_i.k+/tau - C_i log sum_{k'} exp(q_i.k'/tau))``, M = number of
    anchors (12B there), N+ = all positive pairs, C_i = the anchor's candidates: the pull term is
    divided by M and the log-denominator counted once per candidate, which makes the loss and its
    gradient one to two orders of magnitude smaller than Eq. 8 at the same weight beta.
    """
    valid_c = cand_tags >= 0
    same = (cand_tags[None] == tags[:, None]) & (tags[:, None] >= 0) & valid_c[None]
    keep = valid_c[None].expand(q.shape[0], -1).clone()
    if self_index is not None:
        rows = torch.arange(q.shape[0], device=q.device)
        keep[rows, self_index] = False
    pos = same & keep
    neg = keep & ~same & (tags[:, None] >= 0)
    if form == "paper":
        return masked_info_nce(q, candidates.detach(), pos, neg, tau, reduction="pair_mean")
    if form != "release":
        raise ValueError(f"form must be 'paper' or 'release', got {form!r}")
    sim = q.float() @ candidates.detach().float().t() / tau
    cols = pos | neg
    lse = torch.logsumexp(sim.masked_fill(~cols, float("-inf")), dim=1)
    anchors = pos.any(1)
    n_pos = pos.sum()
    if n_pos == 0:
        return (q.float().sum() * 0.0)
    per_anchor = (sim * pos).sum(1) - cols.sum(1) * torch.where(anchors, lse, torch.zeros_like(lse))
    return -(per_anchor * anchors).sum() / (q.shape[0] * n_pos)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` B x K+1 x H x W against ``labels`` (255 ignored), the mean over
    background pixels and the mean over foreground pixels weighted equally (as released)."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    bg, fg = labels == 0, (labels > 0) & (labels != IGNORE)
    return 0.5 * ((ce * bg).sum() / (bg.sum() + 1e-6) + (ce * fg).sum() / (fg.sum() + 1e-6))
