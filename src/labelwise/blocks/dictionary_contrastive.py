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

Fig. 1's "and vice versa" (object components pulled towards their parts' components) has no
equation in the paper; :func:`logic_loss` with ``reverse=True`` gives it the form of Eq. 7 with
the levels swapped: object components C~(y) against the *part* bank B, positives = the stored
components of every part class of that object (``anchor_classes`` may be an (M, P) membership
matrix for this).

``similarity="dot"`` is the paper's ``C(y)_i . B_j`` on the raw components; ``"cosine"``
L2-normalises both first. Similarities and log-softmaxes are computed in fp32. Anchors whose
class has no valid positive in the bank (or a negative class id) contribute nothing.
``reduction="sum"`` is the paper's literal :math:`\sum_{x \in M}`; ``"mean"`` averages over
the contributing anchors; ``"none"`` returns (M,) with 0 for excluded anchors. Fully vectorised:
one (M, P*S) similarity matrix, no loops over anchors or bank entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labelwise.blocks.contrastive import info_nce_from_logits, select_hard_negatives

__all__ = ["dictionary_contrastive_loss", "logic_loss", "reverse_logic_loss", "SIMILARITIES"]

_REDUCTIONS = ("mean", "sum", "none")
SIMILARITIES = ("dot", "cosine")


def dictionary_contrastive_loss(anchors: torch.Tensor, anchor_classes: torch.Tensor, bank_feats: torch.Tensor,
                                bank_valid: torch.Tensor, tau: float, hard_negatives: int | None,
                                reduction: str = "sum", similarity: str = "dot") -> torch.Tensor:
    """Eq. 5 / Eq. 6 of CoCal. See module doc.

    anchors (M, D), anchor_classes (M,) long in [0, P) (negative = skip) or an (M, P) bool matrix
    of each anchor's positive classes, bank_feats (P, S, D), bank_valid (P, S) bool, tau > 0 (not
    given in the paper), hard_negatives k (None = all negatives; CoCal uses k = 100 with S = 100).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
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
    M = anchors.shape[0]
    if anchor_classes.dim() == 2:  # a membership matrix: the positive classes of each anchor
        if anchor_classes.shape != (M, P):
            raise ValueError(f"an anchor class matrix must be ({M}, {P}), got {tuple(anchor_classes.shape)}")
        member = anchor_classes.to(anchors.device).bool()
    else:
        cls = anchor_classes.reshape(-1).to(anchors.device, torch.long)
        if cls.shape[0] != M:
            raise ValueError(f"{M} anchors but {cls.shape[0]} anchor classes")
        member = cls[:, None] == torch.arange(P, device=anchors.device)[None]  # negative ids match nothing

    a = anchors.float()
    b = bank_feats.detach().to(anchors.device).float().reshape(P * S, D)
    if similarity == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.t() / tau  # (M, P*S)
    valid = bank_valid.to(a.device).bool().reshape(P * S)
    pos = member.repeat_interleave(S, dim=1) & valid[None, :]  # B(x)
    neg = valid[None, :] & ~pos
    if hard_negatives is not None:
        neg = select_hard_negatives(logits.detach(), neg, hard_negatives)  # N_k(i): k most similar negatives
    return info_nce_from_logits(logits, pos, neg, positives_in_denominator=True, reduction=reduction)


def logic_loss(part_anchors: torch.Tensor, part_classes: torch.Tensor, part_to_object: torch.Tensor,
               obj_bank_feats: torch.Tensor, obj_bank_valid: torch.Tensor, tau: float,
               hard_negatives: int | None, reduction: str = "sum", similarity: str = "dot") -> torch.Tensor:
    """Eq. 7 of CoCal (L_logic): part components C(y)_i against the object bank B~, positives
    B~(x) with x = ``part_to_object[part class]``. ``part_to_object`` (P,) long; a part class
    < 0, or one mapped to an object < 0, contributes nothing."""
    p2o = part_to_object.reshape(-1).to(part_anchors.device, torch.long)
    cls = part_classes.reshape(-1).to(part_anchors.device, torch.long)
    ok = cls >= 0
    obj = torch.where(ok, p2o[cls.clamp_min(0)], torch.full_like(cls, -1))
    return dictionary_contrastive_loss(part_anchors, obj, obj_bank_feats, obj_bank_valid, tau, hard_negatives,
                                       reduction, similarity)


def reverse_logic_loss(object_anchors: torch.Tensor, object_classes: torch.Tensor, part_to_object: torch.Tensor,
                       part_bank_feats: torch.Tensor, part_bank_valid: torch.Tensor, tau: float,
                       hard_negatives: int | None, reduction: str = "sum", similarity: str = "dot") -> torch.Tensor:
    """Fig. 1's "vice versa" in the form of Eq. 7 with the levels swapped: object components
    C~(y)_i against the part bank B, positives = the stored components of every part class whose
    parent is that object (see the module doc: the paper gives no equation for it)."""
    p2o = part_to_object.reshape(-1).to(object_anchors.device, torch.long)
    cls = object_classes.reshape(-1).to(object_anchors.device, torch.long)
    member = (cls[:, None] == p2o[None, :]) & (cls[:, None] >= 0)  # (M, P): the object's parts
    return dictionary_contrastive_loss(object_anchors, member, part_bank_feats, part_bank_valid, tau, hard_negatives,
                                       reduction, similarity)
