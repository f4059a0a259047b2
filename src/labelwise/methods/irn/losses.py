"""IRN's training losses over the pairs of the stride-4 grid (vectorised: one gather per path length).

With ``P+_bg`` / ``P+_fg`` the pairs of equal IR labels in the background / a foreground
class and ``P-`` the pairs of different labels (pairs touching 255 in none; IRN Eq. 4):

* ``L_B`` (IRN Eq. 5): ``-sum_{P+_bg} log a / (2|P+_bg|) - sum_{P+_fg} log a / (2|P+_fg|)
  - sum_{P-} log(1 - a) / |P-|`` with ``a`` the path-max affinity of the boundary
  probabilities (IRN Eq. 2);
* ``L_D^fg`` (IRN Eq. 7): ``sum_{P+_fg} |delta(i, j) - delta_hat(i, j)|_1 / |P+_fg|`` with
  ``delta(i, j) = D(x_i) - D(x_j)`` and ``delta_hat(i, j) = x_j - x_i`` (IRN Eq. 6): two
  pixels of one object point at one centroid;
* ``L_D^bg`` (IRN Eq. 8): ``sum_{P+_bg} |delta(i, j)|_1 / |P+_bg|``;
* total (IRN Eq. 9): ``L_B + L_D^fg + L_D^bg`` (``loss.aff_weight`` / ``loss.disp_weight``
  scale the two parts; the release's total is ``0.5 L_B + 0.25 (L_D^fg + L_D^bg)``: it
  halves both and averages the displacement L1 over the two coordinates).

Each mean divides by ``count + 1e-5`` (the release), so a term with no pairs in the batch
is 0 without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from labelwise.modeling.irn import PairIndex, pair_displacement, pair_labels, path_max_affinity

__all__ = ["affinity_loss", "displacement_loss", "irn_losses"]

EPS = 1e-5


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum() / (m.sum() + EPS)


def affinity_loss(aff: Tensor, bg_pos: Tensor, fg_pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """IRN Eq. 5 as ``(positive term, negative term)``; ``L_B`` is their sum.

    ``aff``: ``B x P x n`` affinities in [0, 1]; the masks are boolean of the same shape.
    """
    pos_loss = -torch.log(aff + EPS)
    neg_loss = -torch.log(1.0 + EPS - aff)
    pos = _masked_mean(pos_loss, bg_pos) / 2 + _masked_mean(pos_loss, fg_pos) / 2
    return pos, _masked_mean(neg_loss, neg)


def displacement_loss(pair_disp: Tensor, offsets: Tensor, bg_pos: Tensor, fg_pos: Tensor) -> tuple[Tensor, Tensor]:
    """IRN Eqs. 7-8: ``(L_D^fg, L_D^bg)``.

    ``pair_disp``: ``B x 2 x P x n`` (``D(x_i) - D(x_j)``); ``offsets``: ``P x 2`` (dy, dx) =
    ``x_j - x_i``, the target of a foreground pair.
    """
    target = offsets.t().reshape(1, 2, -1, 1).to(pair_disp.dtype)
    fg = (pair_disp - target).abs().sum(1)  # L1 norm of the 2-vector
    bg = pair_disp.abs().sum(1)
    return _masked_mean(fg, fg_pos), _masked_mean(bg, bg_pos)


def irn_losses(edge_logits: Tensor, disp: Tensor, label: Tensor, index: PairIndex, *, aff_weight: float = 1.0,
               disp_weight: float = 1.0, pairs: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """All of IRN's terms for a batch: ``edge_logits`` ``B x 1 x h x w``, ``disp`` ``B x 2 x h x w``,
    ``label`` ``B x h x w`` IR labels on the same grid (255 = ignore). Returns ``loss`` and the
    four logged terms (``aff_pos``, ``aff_neg``, ``disp_fg``, ``disp_bg``, detached). ``pairs``: the
    ``pair_labels(label, index)`` masks when the caller has them already."""
    bg_pos, fg_pos, neg = pair_labels(label, index) if pairs is None else pairs
    aff = path_max_affinity(torch.sigmoid(edge_logits.float()), index)  # IRN Eq. 2
    pos, negl = affinity_loss(aff, bg_pos, fg_pos, neg)  # IRN Eq. 5
    dfg, dbg = displacement_loss(pair_displacement(disp.float(), index), index.offsets, bg_pos, fg_pos)  # Eqs. 7-8
    total = aff_weight * (pos + negl) + disp_weight * (dfg + dbg)  # IRN Eq. 9
    return {"loss": total, "aff_pos": pos.detach(), "aff_neg": negl.detach(), "disp_fg": dfg.detach(),
            "disp_bg": dbg.detach()}
