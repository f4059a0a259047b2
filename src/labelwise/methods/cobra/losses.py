"""CoBra's losses (Sec. 3.3), vectorised over images, classes and patches.

Shapes: ``B`` images, ``K`` foreground classes, ``N = h x w`` patches of the ViT grid
(the CNN's maps are resized to it first), ``E`` embedding size. Embeddings are L2-normalised
``B x E x N``. Knowledge flows one way: the giving branch's signal (the ViT patch affinity for
L_cap, the CNN pseudo labels for L_sap) is detached here, so the giving branch gets no gradient
from the receiving branch's loss (Sec. 4.2, "Ensuring Branch Benefits").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labelwise.blocks.cam import max_norm
from labelwise.blocks.contrastive import info_nce_from_logits, topk_mask


def cls_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """L_cls-cnn / L_cls-tran: multi-label soft margin on the GAP logits (as released)."""
    return F.multilabel_soft_margin_loss(logits.float(), tags.float())


def cam_loss(m_cnn: torch.Tensor, m_tran: torch.Tensor, tags: torch.Tensor, form: str = "localisation") -> torch.Tensor:
    """CoBra Sec. 3.3.1: ``L_cam = ||M_cnn - M_tran||_1 + ||M_cnn^+ - M_tran^+||_1``.

    ``m_cnn`` / ``m_tran``: B x K x h x w CAMs on one grid; ``tags`` B x K. Each term is a mean
    absolute difference: over every class for the first, over the image's positive classes for the
    second. ``form``: ``localisation`` compares the localisation maps the seeds are made of (ReLU,
    max-normalised per image and class, absent classes zero), which ties the two branches' shapes
    but not their scales; ``raw`` compares the raw CAMs."""
    pos = (tags > 0).float()
    a, b = m_cnn.float(), m_tran.float()
    if form == "localisation":
        a = max_norm(a) * pos[..., None, None]
        b = max_norm(b) * pos[..., None, None]
    diff = (a - b).abs().mean(dim=(2, 3))  # B x K
    return diff.mean() + (diff * pos).sum() / pos.sum().clamp_min(1)


def _reduce(per_anchor: torch.Tensor, valid: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    total = (per_anchor * valid).sum()
    if reduction == "sum":  # Eq. 3 literally: a sum over target patches (per image)
        return total / batch
    return total / valid.sum().clamp_min(1)


def cap_loss(v_c: torch.Tensor, affinity: torch.Tensor, k_pos: int, k_neg: int, tau: float,
             reduction: str = "mean") -> torch.Tensor:
    """CoBra Eq. 1 (L_cap): for every target patch i of the CNN projection ``v_c`` (B x E x N),
    ``P_i^+`` = the ``k_pos`` patches with the highest ViT patch affinity ``P_i`` (B x N x N, row i),
    ``P_i^-`` = the ``k_neg`` lowest (i itself excluded); each positive competes with the negatives
    only: ``-log e^{v_i.v_j/tau} / (e^{v_i.v_j/tau} + sum_k e^{v_i.v_k/tau})``, averaged over P_i^+."""
    B, _, N = v_c.shape
    aff = affinity.detach().float()  # one way: the ViT gets nothing from L_cap
    not_self = ~torch.eye(N, dtype=torch.bool, device=v_c.device)[None]
    pos = topk_mask(aff, k_pos, largest=True, valid=not_self.expand(B, -1, -1))
    neg = topk_mask(aff, k_neg, largest=False, valid=not_self.expand(B, -1, -1))
    v = v_c.float()
    logits = torch.einsum("ben,bem->bnm", v, v) / tau
    per_anchor = info_nce_from_logits(logits, pos, neg, positives_in_denominator=False, reduction="none")
    return _reduce(per_anchor, pos.any(-1).float(), B, reduction)


def cnn_pseudo_labels(m_cnn: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.2, CAK 2: ``(probs B x K x N, labels B x N)``: the CNN CAMs softmaxed over classes at every
    patch; each patch's pseudo label is the positive (tagged) class of highest probability."""
    probs = torch.softmax(m_cnn.detach().float().flatten(2), dim=1)
    labels = probs.masked_fill(~(tags > 0)[..., None], float("-inf")).argmax(1)
    return probs, labels


def sap_loss(v_s: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, tags: torch.Tensor, k_pos: int,
             k_neg: int, tau: float, reduction: str = "mean") -> torch.Tensor:
    """CoBra Eq. 2 (L_sap) on the ViT projection ``v_s`` (B x E x N), guided by the CNN pseudo labels.

    For every positive class c of an image: ``P^+`` = the ``k_pos`` patches labelled c with the
    highest probability of c, ``P^-`` = the ``k_neg`` other patches with the lowest probability of c;
    every target i in P^+ pulls the other members of P^+ and pushes P^- away, each positive
    competing with the negatives only. ``probs`` / ``labels`` from :func:`cnn_pseudo_labels`
    (detached: the CNN gets nothing from L_sap)."""
    B, _, N = v_s.shape
    K = probs.shape[1]
    probs = probs.detach()
    is_c = labels[:, None, :] == torch.arange(K, device=labels.device)[None, :, None]  # B x K x N
    k = min(int(k_pos), N)
    top = probs.masked_fill(~is_c, float("-inf")).topk(k, dim=-1)  # B x K x k anchors
    anchor_ok = torch.isfinite(top.values) & (tags > 0)[..., None]
    idx = top.indices
    pos = torch.zeros_like(is_c).scatter_(-1, idx, anchor_ok)  # P^+ of each class, B x K x N
    # P^-: the lowest-scoring patches of c outside P^+ (in a single-class image every patch carries
    # that class as its pseudo label, so "labelled otherwise" would leave no negatives)
    neg = topk_mask(probs, k_neg, largest=False, valid=~pos)  # B x K x N
    v = v_s.float()
    sim = torch.einsum("ben,bem->bnm", v, v) / tau  # B x N x N
    rows = torch.gather(sim[:, None].expand(B, K, N, N), 2, idx[..., None].expand(B, K, k, N))  # B x K x k x N
    not_self = idx[..., None] != torch.arange(N, device=idx.device)
    pos_pair = pos[:, :, None, :] & not_self & anchor_ok[..., None]
    neg_pair = neg[:, :, None, :] & anchor_ok[..., None]
    per_anchor = info_nce_from_logits(rows, pos_pair, neg_pair, positives_in_denominator=False, reduction="none")
    return _reduce(per_anchor, pos_pair.any(-1).float(), B, reduction)


def fuse_seeds(m_cnn: torch.Tensor | None, m_tran: torch.Tensor | None, source: str) -> torch.Tensor:
    """Sec. 3.4 / Table 5: the seed a source names, from max-normalised M_cnn and M_tran.

    ``fuse``: ``M_fuse = max((M_cnn + M_tran) / 2, M_tran)``; ``mean``: ``(M_cnn + M_tran) / 2``;
    ``max``: ``max(M_cnn, M_tran)``; ``cnn`` / ``vit``: one branch."""
    if source == "cnn":
        return m_cnn
    if source == "vit":
        return m_tran
    if source == "mean":
        return (m_cnn + m_tran) / 2
    if source == "max":
        return torch.maximum(m_cnn, m_tran)
    if source == "fuse":
        return torch.maximum((m_cnn + m_tran) / 2, m_tran)
    raise ValueError(f"unknown seed source {source!r}")


def attention_bg_threshold(a_obj: torch.Tensor, quantile: float, snap: float, lo: float, hi: float,
                           norm: str = "max") -> torch.Tensor:
    """Supplement Secs. 9.1 / 11: a per-image background threshold from the semantic-agnostic
    attention map ``a_obj`` (B x H x W, >= 0) -- the threshold of IRN's IR labels (conf_bg; conf_fg
    about 0.5 above it). The supplement weighs the attention map by a factor searched like a
    conventional threshold; here (as the release) that weight is a ``quantile`` of the map, read on
    the map's ``norm`` scale: ``max`` (divided by its maximum), ``minmax`` (stretched to [0, 1]) or
    ``raw`` (the release: the summed attention as it is, whose scale depends on the ViT's depth, token
    count and number of passes). Snapped to a ``snap`` grid, clamped to ``[lo, hi]``; (B,). Uses no
    ground truth."""
    a = a_obj.float().flatten(1)
    if norm == "max":
        a = a / a.amax(dim=1, keepdim=True).clamp_min(1e-12)
    elif norm == "minmax":
        lo_a = a.amin(dim=1, keepdim=True)
        a = (a - lo_a) / (a.amax(dim=1, keepdim=True) - lo_a).clamp_min(1e-12)
    elif norm != "raw":
        raise ValueError(f"attention norm must be max, minmax or raw, got {norm!r}")
    t = torch.quantile(a, quantile, dim=1)
    if snap > 0:
        t = torch.round(t / snap) * snap
    return t.clamp(lo, hi)
