r"""CoCal's component-wise contrastive losses against per-class memory banks (Eqs. 5-7).

Symbols (CoCal Sec. 2.2):

* ``C(y)_i`` — an *anchor*: the dictionary component of a class i present in the training
  sample y (part level C, object level C~); one row of ``anchors`` (M, D) with its class in
  ``anchor_classes`` (M,);
* ``B`` — the memory bank, (P, S, D): S stored samples for each of P classes
  (:class:`labelwise.blocks.class_bank.ClassMemoryBank`), with a (P, S) validity mask;
* ``B(x)`` — the valid stored samples of the anchor's own class x (the positives), ``B_j`` one
  of them;
* ``tau`` — the temperature; ``k`` — the number of hard negatives.

Eq. 5 (part level, :math:`\mathcal{L}_{p\_con}`), per anchor:

.. math::

    \ell(C(y)_i) = \frac{-1}{|B(x)|} \sum_{j \in B(x)}
        \log \frac{\exp(C(y)_i \cdot B_j / \tau)}{\sum_{k \in B(x) \cup N_k(i)} \exp(C(y)_i \cdot B_k / \tau)}

The paper writes the denominator over all of B and adds "hard negative mining": here
:math:`N_k(i)` are the ``k`` valid entries of *other* classes most similar to the anchor
(``hard_negatives=k``); ``hard_negatives=None`` keeps every negative, i.e. the denominator is
the whole valid bank, the literal Eq. 5 (Table 4, "all"). Positives always stay in the
denominator. Eq. 6 (:math:`\mathcal{L}_{o\_con}`) is the same function with object-level
anchors C~(y) and the object bank B~.

Eq. 7 (:math:`\mathcal{L}_{logic}`, cross-level): part-level anchors C(y)_i against the *object*
bank B~, positives B~(x) for x = the object the part belongs to — :func:`logic_loss` maps the
part classes through ``part_to_object`` and calls the same function.

Features and bank entries are L2-normalised inside (cosine similarity ``C(y)_i . B_j``);
similarities and log-softmaxes are computed in fp32. Anchors whose class has no valid
positive in the bank (or a negative class id) contribute nothing. ``reduction="mean"`` averages
over the contributing anchors; ``"sum"`` is the paper's literal :math:`\sum_{x \in M}`;
``"none"`` returns (M,) with 0 for excluded anchors. Fully vectorised: one (M, P*S) similarity
matrix, no loops over anchors or bank entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labelwise.blocks.contrastive import info_nce_from_logits, select_hard_negatives

__all__ = ["dictionary_contrastive_loss", "logic_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def dictionary_contrastive_loss(anchors: torch.Tensor, anchor_classes: torch.Tensor, bank_feats: torch.Tensor,
                                bank_valid: torch.Tensor, tau: float, hard_negatives: int | None,
                                reduction: str = "mean") -> torch.Tensor:
    """Eq. 5 / Eq. 6 of CoCal. See module doc.

    anchors (M, D), anchor_classes (M,) long in [0, P) (negative = skip), bank_feats (P, S, D),
    bank_valid (P, S) bool, tau > 0 (not given in the paper), hard_negatives k (None = all
    negatives; CoCal uses k = 100 with S = 100).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if hard_negatives is not None and hard_negatives < 0:
        raise ValueError(f"hard_negatives must be >= 0 or None, got {hard_negatives}")
    if bank_feats.dim() != 3 or bank_valid.shape != bank_feats.shape[:2]:
        raise ValueError(f"bank_feats must be (P, S, D) and bank_valid (P, S), got {tuple(bank_feats.shape)} "
                         f"and {tuple(bank_valid.shape)}")
    P, S, D = bank_feats.shape
    if anchors.dim() != 2 or anchors.shape[1] != D:
        raise ValueError(f"anchors must be (M, {D}), got {tuple(anchors.shape)}")
    cls = anchor_classes.reshape(-1).to(anchors.device, torch.long)
    if cls.shape[0] != anchors.shape[0]:
        raise ValueError(f"{anchors.shape[0]} anchors but {cls.shape[0]} anchor classes")

    a = F.normalize(anchors.float(), dim=-1)
    b = F.normalize(bank_feats.detach().to(anchors.device).float().reshape(P * S, D), dim=-1)
    logits = a @ b.t() / tau  # (M, P*S)
    entry_cls = torch.arange(P, device=a.device).repeat_interleave(S)  # (P*S,)
    valid = bank_valid.to(a.device).bool().reshape(P * S)
    pos = (cls[:, None] == entry_cls[None, :]) & valid[None, :]  # B(x); negative class ids match nothing
    neg = valid[None, :] & ~pos
    if hard_negatives is not None:
        neg = select_hard_negatives(logits.detach(), neg, hard_negatives)  # N_k(i): k most similar negatives
    return info_nce_from_logits(logits, pos, neg, positives_in_denominator=True, reduction=reduction)


def logic_loss(part_anchors: torch.Tensor, part_classes: torch.Tensor, part_to_object: torch.Tensor,
               obj_bank_feats: torch.Tensor, obj_bank_valid: torch.Tensor, tau: float,
               hard_negatives: int | None, reduction: str = "mean") -> torch.Tensor:
    """Eq. 7 of CoCal (L_logic): part components C(y)_i against the object bank B~, positives
    B~(x) with x = ``part_to_object[part class]``. ``part_to_object`` (P,) long; a part class
    < 0, or one mapped to an object < 0, contributes nothing."""
    p2o = part_to_object.reshape(-1).to(part_anchors.device, torch.long)
    cls = part_classes.reshape(-1).to(part_anchors.device, torch.long)
    ok = cls >= 0
    obj = torch.where(ok, p2o[cls.clamp_min(0)], torch.full_like(cls, -1))
    return dictionary_contrastive_loss(part_anchors, obj, obj_bank_feats, obj_bank_valid, tau, hard_negatives,
                                       reduction)
