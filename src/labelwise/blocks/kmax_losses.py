"""kMaX-DeepLab's training losses and Hungarian matching, and CoCal's fixed (dictionary) matching.

References
----------
* kMaX-DeepLab (Yu et al., ECCV 2022), losses inherited from MaX-DeepLab (Wang et al., CVPR
  2021) and CMT-DeepLab (Yu et al., CVPR 2022). Official code: google-research/deeplab2
  ``model/loss/max_deeplab_loss.py`` (TF) and its PyTorch port bytedance/kmax-deeplab
  ``kmax_deeplab/modeling/criterion.py`` / ``matcher.py`` (defaults in ``config.py``).
* CoCal (dictionary-based part parsing), Sec. 2.1: the learnable queries become a dictionary
  whose component ``i`` is the cluster centre of class ``i``; the alignment is fixed, so no
  Hungarian matching is needed, and ``L_kMaX`` keeps the official weights.

Terms (returned separately by :func:`kmax_losses` / :func:`loss_aux_semantic`; default
weights ``KMAX_LOSS_WEIGHTS`` = the port's ``CLASS_WEIGHT / DICE_WEIGHT / MASK_WEIGHT /
INSDIS_WEIGHT / AUX_SEMANTIC_WEIGHT``):

=====================  ==========================================================  ======
key                    kMaX-DeepLab term                                           weight
=====================  ==========================================================  ======
``loss_pq_class``      PQ-style loss, class term (focal CE, alpha 0.75, gamma 0)  3.0
``loss_pq_dice``       PQ-style loss, mask dice term                               3.0
``loss_mask``          mask-ID cross-entropy (softmax over mask slots per pixel)  0.3
``loss_instdisc``      pixel-wise instance discrimination (CMT-DeepLab's pixel      1.0
                       contrast; MaX-DeepLab's pixel-vs-mask-mean form optional)
``loss_aux_semantic``  auxiliary semantic cross-entropy of the semantic head        1.0
=====================  ==========================================================  ======

Matching: :func:`kmax_match` solves the Hungarian problem on ``-(dice x p(class))`` per image
(and per query group), :func:`fixed_match` is CoCal's dictionary mode: each target goes to the
component of its class. Both return ``[(query_idx, target_idx)]`` per image, consumed by
:func:`kmax_losses`.

How CoCal's dictionary mode uses them: the decoder's ``P`` part components and ``P~`` object
components are two query *groups* (``groups=[P, P~]``); the mask softmax (dice, mask-ID CE)
runs within each group, each level's semantic segments are matched by :func:`fixed_match`
(``component_of_class`` = one map per level) and, without a class head, ``loss_pq_class`` is
dropped and the dice term is weighted 1 per matched component. Components whose class is
absent from the image stay unmatched: they get no dice term and their pixels compete only as
negatives in the mask-ID softmax. ``loss_instdisc`` and ``loss_aux_semantic`` are unchanged.

Conventions: ``pred_masks`` (B, Q, h, w) mask logits, ``pred_logits`` (B, Q, C + 1) with the
void class last (optional), ``pixel_feature`` (B, D, h, w) pixel embeddings (re-normalised
here). Targets per image: ``(masks (M, h, w), classes (M,))`` or ``(masks, classes, group
(M,))`` — binary masks (bool, or float binarised at 0.5; resized nearest to the prediction's
size if needed). With several query groups a target's group is its third element, or, in the
mask losses, the group of the query it is matched to. Everything is computed in float32 with
autocast disabled; Python loops run only over images (targets differ per image) and over the
(few) query groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from labelwise.blocks.contrastive import info_nce_from_logits
from labelwise.blocks.matching import hungarian_match

__all__ = [
    "KMAX_LOSS_WEIGHTS",
    "fixed_match",
    "group_softmax",
    "kmax_losses",
    "kmax_match",
    "loss_aux_semantic",
    "mask_similarity",
    "query_groups",
]

#: Official loss weights of the kMaX-DeepLab PyTorch port (``config.py``); CoCal keeps them.
KMAX_LOSS_WEIGHTS: dict[str, float] = {
    "loss_pq_class": 3.0,
    "loss_pq_dice": 3.0,
    "loss_mask": 0.3,
    "loss_instdisc": 1.0,
    "loss_aux_semantic": 1.0,
}

_NEG = -99999.0        # added to the sampling logits of void pixels (finite: no NaN after Gumbel)
_SIM_EPS = 1e-5        # denominator epsilon of the matching dice similarity / void ratio


def _fp32(device: torch.device):
    """Context that disables autocast on ``device`` (losses are computed in float32)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def query_groups(num_queries: int, groups: Sequence[int] | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Group index (Q,) of every query: ``groups`` are consecutive group sizes summing to
    ``num_queries`` (e.g. ``[P, P~]`` part then object components); ``None`` = one group."""
    if groups is None:
        return torch.zeros(num_queries, dtype=torch.long, device=device)
    sizes = [int(s) for s in groups]
    if any(s <= 0 for s in sizes) or sum(sizes) != num_queries:
        raise ValueError(f"groups {sizes} must be positive sizes summing to the {num_queries} queries")
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


def _group_sizes(num_queries: int, groups: Sequence[int] | None) -> list[int]:
    query_groups(num_queries, groups)  # validates
    return [num_queries] if groups is None else [int(s) for s in groups]


def group_softmax(mask_logits: torch.Tensor, groups: Sequence[int] | None = None, dim: int = 1,
                  log: bool = False) -> torch.Tensor:
    """kMaX's mask normalisation: softmax (or log-softmax) over the queries along ``dim``,
    separately within each consecutive query group; float32."""
    x = mask_logits.float()
    fn = F.log_softmax if log else F.softmax
    with _fp32(x.device):
        if groups is None:
            return fn(x, dim=dim)
        chunks = x.split(_group_sizes(x.shape[dim], groups), dim=dim)
        return torch.cat([fn(c, dim=dim) for c in chunks], dim=dim)


def mask_similarity(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Matching dice similarity of kMaX / MaX-DeepLab between mask probabilities (N, P) and
    binary targets (M, P): ``sum(p t) / ((sum p + sum t) / 2 + 1e-5)`` -> (N, M). The caller
    zeroes the probabilities on void pixels first."""
    p, t = probs.float(), targets.float()
    inter = p @ t.T
    den = (p.sum(-1)[:, None] + t.sum(-1)[None, :]) / 2
    return inter / (den + _SIM_EPS)


def _unpack_target(target: Any, size: tuple[int, int], device: torch.device):
    if len(target) not in (2, 3):
        raise ValueError("a target is (masks, classes) or (masks, classes, group)")
    masks, classes = target[0], target[1]
    group = target[2] if len(target) == 3 else None
    masks = torch.as_tensor(masks, device=device)
    m = masks if masks.dtype == torch.bool else masks.float() > 0.5
    if m.dim() != 3:
        raise ValueError(f"target masks must be (M, h, w), got {tuple(m.shape)}")
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[None].float(), size=tuple(size), mode="nearest")[0] > 0.5
    classes = torch.as_tensor(classes, device=device).long().reshape(-1)
    if classes.numel() != m.shape[0]:
        raise ValueError(f"{m.shape[0]} target masks but {classes.numel()} classes")
    if group is not None:
        group = torch.as_tensor(group, device=device).long().reshape(-1)
        if group.numel() != m.shape[0]:
            raise ValueError(f"{m.shape[0]} target masks but {group.numel()} group ids")
    return m, classes, group


def _empty_pair(device):
    z = torch.zeros(0, dtype=torch.long, device=device)
    return z, z.clone()


@torch.no_grad()
def kmax_match(pred_logits: torch.Tensor | None, pred_masks_prob: torch.Tensor, targets: Sequence[Any], *,
               groups: Sequence[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """kMaX-DeepLab's Hungarian matching, per image (and per query group).

    ``cost[q, t] = -dice(q, t) * p_q(c_t)`` where ``dice`` is :func:`mask_similarity` of the
    query's mask probability (``pred_masks_prob`` (B, Q, h, w), already softmax-normalised over
    the queries of its group, e.g. by :func:`group_softmax`; zeroed on pixels no target of the
    group covers) and ``p_q(c_t)`` the softmax class probability (void excluded) of the target's
    class. ``pred_logits=None`` (no class head) matches on ``-dice`` alone. With several
    ``groups`` each target needs its group id (third tuple element) and is matched only to
    queries of that group. Returns ``[(query_idx, target_idx)]`` (int64, sorted by query,
    ``min(Q_g, M_g)`` pairs per group); no gradient.
    """
    B, Q = pred_masks_prob.shape[:2]
    if len(targets) != B:
        raise ValueError(f"{len(targets)} targets for a batch of {B}")
    device = pred_masks_prob.device
    qg = query_groups(Q, groups, device)
    G = int(qg.max()) + 1 if Q else 1
    out = []
    with _fp32(device):
        probs = pred_masks_prob.detach().float().flatten(2)
        cls_prob = None
        if pred_logits is not None:
            cls_prob = pred_logits.detach().float().softmax(-1)[..., :-1]
        for b in range(B):
            masks, classes, tg = _unpack_target(targets[b], pred_masks_prob.shape[-2:], device)
            if masks.shape[0] == 0:
                out.append(_empty_pair(device))
                continue
            if tg is None:
                if G > 1:
                    raise ValueError("kmax_match with several query groups needs a group id per target")
                tg = torch.zeros_like(classes)
            t = masks.flatten(1).float()
            rows, cols = [], []
            for g in range(G):
                qi = torch.nonzero(qg == g).squeeze(1)
                ti = torch.nonzero(tg == g).squeeze(1)
                if qi.numel() == 0 or ti.numel() == 0:
                    continue
                tt = t[ti]
                p = probs[b, qi] * (tt.sum(0) > 0)          # void pixels of the group removed
                sim = mask_similarity(p, tt)
                if cls_prob is not None:
                    sim = sim * cls_prob[b, qi][:, classes[ti]]
                r, c = hungarian_match(-sim)
                rows.append(qi[r])
                cols.append(ti[c])
            if not rows:
                out.append(_empty_pair(device))
                continue
            rows_t, cols_t = torch.cat(rows), torch.cat(cols)
            order = torch.argsort(rows_t)
            out.append((rows_t[order], cols_t[order]))
    return out


def fixed_match(targets: Sequence[Any],
                component_of_class: torch.Tensor | Sequence[int] | Sequence[torch.Tensor | Sequence[int]]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CoCal's dictionary mode: each target matched to the component of its class.

    ``component_of_class`` is either one map class -> (global) query index (a 1-D tensor or a
    list of ints), or a list of such maps, one per target group, indexed by the targets' group
    id (third tuple element; e.g. ``[part_map, object_map]``, object components offset by
    ``P``). A negative entry means "no component": that target stays unmatched. Two targets of
    one image may not share a component (semantic segments: one mask per class). Returns
    ``[(query_idx, target_idx)]`` sorted by query; no Hungarian step, no predictions needed.
    """
    maps: list[torch.Tensor]
    per_group = (not isinstance(component_of_class, torch.Tensor) and len(component_of_class) > 0
                 and all(isinstance(m, (list, tuple)) or (hasattr(m, "ndim") and m.ndim == 1)
                         for m in component_of_class))
    if per_group:
        maps = [torch.as_tensor(m, dtype=torch.long).reshape(-1) for m in component_of_class]
    else:
        maps = [torch.as_tensor(component_of_class, dtype=torch.long).reshape(-1)]
    out = []
    for target in targets:
        if len(target) not in (2, 3):
            raise ValueError("a target is (masks, classes) or (masks, classes, group)")
        classes = torch.as_tensor(target[1]).long().reshape(-1)
        device = classes.device
        M = classes.numel()
        if per_group:
            if len(target) < 3:
                raise ValueError("per-group component maps need a group id per target")
            tg = torch.as_tensor(target[2], device=device).long().reshape(-1)
            q = torch.full((M,), -1, dtype=torch.long, device=device)
            for g, cmap in enumerate(maps):
                sel = tg == g
                if sel.any():
                    q[sel] = _lookup(cmap.to(device), classes[sel])
            if ((tg < 0) | (tg >= len(maps))).any():
                raise ValueError(f"target group ids must lie in [0, {len(maps)})")
        else:
            q = _lookup(maps[0].to(device), classes)
        keep = q >= 0
        qk, tk = q[keep], torch.nonzero(keep).squeeze(1)
        if torch.unique(qk).numel() != qk.numel():
            raise ValueError("fixed_match: two targets of one image map to the same component")
        order = torch.argsort(qk)
        out.append((qk[order], tk[order]))
    return out


def _lookup(cmap: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= cmap.numel()):
        raise ValueError(f"target class outside the component map (size {cmap.numel()})")
    return cmap[classes]


def _gumbel_topk(logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices (B, k) of ``k`` draws without replacement from ``softmax(logits)`` per row
    (Gumbel-top-k, as deeplab2's pixel sampling)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(1e-10, 1.0 - 1e-7)
    return (logits - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def _pixel_contrast(feat: torch.Tensor, onehot: torch.Tensor, sample_k: int, sample_temperature: float,
                    temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """CMT-DeepLab / kMaX pixel-wise instance discrimination for one group -> (B,)."""
    _, M, P = onehot.shape
    pvalid = onehot.sum(1) > 0                                        # (B, P)
    area = onehot.sum(-1)                                             # (B, M)
    pix_area = torch.einsum("bmp,bm->bp", onehot, area)
    sample_logits = torch.log(P / pix_area.clamp_min(1.0)) * sample_temperature
    sample_logits = sample_logits + (~pvalid).float() * _NEG
    k = min(int(sample_k), P)
    idx = _gumbel_topk(sample_logits, k, generator)                   # (B, K)
    s_oh = onehot.gather(2, idx[:, None, :].expand(-1, M, -1))        # (B, M, K)
    s_valid = pvalid.gather(1, idx)                                   # (B, K)
    pair_valid = s_valid[:, :, None] & s_valid[:, None, :]
    pos = (torch.einsum("bmk,bmj->bkj", s_oh, s_oh) > 0) & pair_valid
    s_f = feat.gather(1, idx[..., None].expand(-1, -1, feat.shape[-1]))  # (B, K, D)
    sim = s_f @ s_f.transpose(1, 2) / temperature
    per = info_nce_from_logits(sim, pos, pair_valid & ~pos, reduction="none")   # (B, K)
    has = pos.any(-1)
    return (per * has).sum(1) / has.sum(1).clamp_min(1)


def _mean_contrast(feat: torch.Tensor, onehot: torch.Tensor, temperature: float) -> torch.Tensor:
    """MaX-DeepLab's original instance discrimination (pixel vs mask-mean features) -> (B,)."""
    area = onehot.sum(-1)                                             # (B, M)
    means = torch.einsum("bmp,bpd->bmd", onehot, feat) / area.clamp_min(1.0)[..., None]
    means = F.normalize(means, dim=-1)
    sim = feat @ means.transpose(1, 2) / temperature                  # (B, P, M)
    pos = onehot.transpose(1, 2) > 0
    neg = (area > 0)[:, None, :].expand_as(pos) & ~pos
    per = info_nce_from_logits(sim, pos, neg, reduction="none")       # (B, P)
    has = pos.any(-1)
    return (per * has).sum(1) / has.sum(1).clamp_min(1)


def kmax_losses(outputs: Mapping[str, torch.Tensor | None], targets: Sequence[Any],
                matches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
                weights: Mapping[str, float] | None = KMAX_LOSS_WEIGHTS, focal_alpha: float = 0.75,
                focal_gamma: float = 0.0, void_weight: float = 1e-5, groups: Sequence[int] | None = None,
                insdis_mode: str = "pixels", insdis_sample_k: int = 4096, insdis_sample_temperature: float = 1.5,
                insdis_temperature: float = 0.3, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
    """kMaX-DeepLab's mask-transformer losses for given ``matches`` (:func:`kmax_match` or
    :func:`fixed_match`). Returns float32 scalars, each multiplied by ``weights[key]``
    (default :data:`KMAX_LOSS_WEIGHTS`; ``None`` = unweighted; a missing key = weight 1).

    Notation per image: ``Q`` queries, ``p_q(x)`` the mask probability (softmax of
    ``pred_masks`` over the queries of q's group), ``t_q`` the target mask matched to q (zero
    when unmatched; normalised so the targets of a group sum to at most 1 per pixel), a pixel
    is *labelled* in group g when a matched target of g covers it (other pixels — ignore,
    unmatched segments — are void for g), ``V_g`` the void pixels of q's group, ``A = alpha``.
    Each term is a per-image mean, then averaged over the batch.

    * ``loss_pq_class`` (only with ``pred_logits``): PQ-style class term,
      ``1/Q sum_q a_q w_q (1 - pt_q)^gamma (-log softmax(l_q)[y_q])`` with ``y_q`` the matched
      target's class or void (index ``num_classes``), ``a_q = A`` (matched) / ``1 - A`` (void)
      and the detached weight ``w_q = max(dice_q, void_weight)`` for matched queries,
      ``max(sum_x p_q V / (sum_x p_q + 1e-5), void_weight)`` (mask overlap with void) for the
      others; ``dice_q = sum p_q' t_q / ((sum p_q' + sum t_q) / 2 + 1e-5)`` with ``p' = p``
      zeroed on ``V``.
    * ``loss_pq_dice``: ``A / Q sum_{q matched} v_q (1 - (2 sum p_q' t_q + 1) /
      (sum p_q' + sum t_q + 1))`` with the detached ``v_q = max(p_q(class of t_q),
      void_weight)``, or ``v_q = 1`` without a class head (dictionary mode). ``A / Q`` is
      deeplab2's dice-term modifier (0.75 / Q in the port); with ``focal_alpha < 0`` it is 1/Q.
    * ``loss_mask``: mask-ID cross-entropy, ``mean over labelled (pixel, group) of
      -sum_{q in g} t_q(x) log p_q(x)`` (pixels void in a group are skipped there).
    * ``loss_instdisc`` (with ``pixel_feature``): ``insdis_mode="pixels"`` (kMaX's default,
      CMT-DeepLab): ``insdis_sample_k`` labelled pixels drawn without replacement with
      probability ∝ ``(HW / area of their segment) ** insdis_sample_temperature`` (Gumbel-top-k;
      ``generator`` seeds it), then ``mean over anchors k of mean over same-segment samples j of
      -log softmax_j(f_k . f_j / tau)`` (the anchor itself counts as positive).
      ``insdis_mode="means"`` (MaX-DeepLab's original): every labelled pixel against the
      L2-normalised mean features of the image's segments, ``-log softmax_i(f_x . m_i / tau)``
      at its own segment. Features are L2-normalised here; segments are all targets of the
      group (matched or not); with several groups the term is averaged over groups.
      Port defaults: ``tau = 0.3``, ``sample_k = 4096``, sampling temperature 1.5.

    ``groups``: consecutive query-group sizes (``None`` = one group). ``void_weight`` is the
    port's ``NO_OBJECT_WEIGHT`` (1e-5, a floor of the PQ weights). ``focal_gamma = 0`` as kMaX.
    """
    if insdis_mode not in ("pixels", "means"):
        raise ValueError(f"insdis_mode must be 'pixels' or 'means', got {insdis_mode!r}")
    mask_logits = outputs["pred_masks"]
    pred_logits = outputs.get("pred_logits")
    pixel_feature = outputs.get("pixel_feature")
    B, Q, h, w = mask_logits.shape
    P = h * w
    if len(targets) != B or len(matches) != B:
        raise ValueError(f"need one target and one match per image ({B}), got {len(targets)} and {len(matches)}")
    device = mask_logits.device
    qg = query_groups(Q, groups, device)
    G = len(_group_sizes(Q, groups))
    C = int(num_classes)
    wts = {} if weights is None else dict(weights)

    with _fp32(device):
        logp = group_softmax(mask_logits.flatten(2), groups, dim=1, log=True)     # (B, Q, P)
        # dense targets in query order (the port's permuted masks)
        tgt = torch.zeros(B, Q, P, device=device)
        matched = torch.zeros(B, Q, dtype=torch.bool, device=device)
        tcls = torch.full((B, Q), C, dtype=torch.long, device=device)
        unpacked = []
        for b in range(B):
            masks, classes, tg = _unpack_target(targets[b], (h, w), device)
            qi, ti = (torch.as_tensor(x, device=device).long().reshape(-1) for x in matches[b])
            if qi.numel() != ti.numel():
                raise ValueError("a match needs as many query as target indices")
            if qi.numel():
                if torch.unique(qi).numel() != qi.numel():
                    raise ValueError("a query is matched twice")
                if pred_logits is not None and (int(classes[ti].max()) >= C or int(classes[ti].min()) < 0):
                    raise ValueError(f"matched target classes must lie in [0, {C})")
                tgt[b, qi] = masks[ti].flatten(1).float()
                matched[b, qi] = True
                tcls[b, qi] = classes[ti]
            unpacked.append((masks, tg, qi, ti))
        cover = torch.zeros(B, G, P, device=device).index_add_(1, qg, tgt)        # (B, G, P)
        labelled = cover > 0.5
        tgt = tgt / cover.clamp_min(1.0)[:, qg]
        valid_q = labelled[:, qg]                                                  # (B, Q, P)
        prob = logp.exp()

        with torch.no_grad():
            pd = prob.detach()
            pm = pd * valid_q
            dice_sim = (pm * tgt).sum(-1) / ((pm.sum(-1) + tgt.sum(-1)) / 2 + _SIM_EPS)
            void_ratio = (pd * ~valid_q).sum(-1) / (pd.sum(-1) + _SIM_EPS)
            class_w = torch.where(matched, dice_sim, void_ratio).clamp_min(void_weight)
            if pred_logits is not None:
                cp = pred_logits.detach().float().softmax(-1)
                cp = cp.gather(-1, tcls[..., None].clamp_max(cp.shape[-1] - 1))[..., 0]
                dice_w = torch.where(matched, cp.clamp_min(void_weight), torch.zeros_like(cp))
            else:
                dice_w = matched.float()

        losses: dict[str, torch.Tensor] = {}
        if pred_logits is not None:
            if pred_logits.shape[:2] != (B, Q) or pred_logits.shape[-1] != C + 1:
                raise ValueError(f"pred_logits must be (B, Q, num_classes + 1) = ({B}, {Q}, {C + 1}), "
                                 f"got {tuple(pred_logits.shape)}")
            lpc = F.log_softmax(pred_logits.float(), dim=-1)
            ce = -lpc.gather(-1, tcls[..., None])[..., 0]                         # (B, Q)
            if focal_gamma:
                ce = (1.0 - torch.exp(-ce)).pow(focal_gamma) * ce
            if focal_alpha >= 0:
                ce = ce * torch.where(matched, torch.full_like(ce, focal_alpha), torch.full_like(ce, 1 - focal_alpha))
            losses["loss_pq_class"] = (ce * class_w).sum(1).div(Q).mean()

        pv = prob * valid_q
        dice = 1.0 - (2 * (pv * tgt).sum(-1) + 1.0) / (pv.sum(-1) + tgt.sum(-1) + 1.0)   # (B, Q)
        modifier = (focal_alpha if focal_alpha >= 0 else 1.0) / Q
        losses["loss_pq_dice"] = ((dice * dice_w).sum(1) * modifier).mean()

        ce_pix = torch.zeros(B, G, P, device=device).index_add_(1, qg, -(tgt * logp))
        ce_pix = torch.where(labelled, ce_pix, torch.zeros_like(ce_pix))
        n_lab = labelled.flatten(1).sum(1).clamp_min(1)
        losses["loss_mask"] = (ce_pix.flatten(1).sum(1) / n_lab).mean()

        if pixel_feature is not None:
            if pixel_feature.shape[0] != B or tuple(pixel_feature.shape[-2:]) != (h, w):
                raise ValueError("pixel_feature must be (B, D, h, w) at the mask resolution")
            feat = F.normalize(pixel_feature.float().flatten(2), dim=1).transpose(1, 2)   # (B, P, D)
            seg, grp = _segments(unpacked, qg, P, device)                         # (B, M, P), (B, M)
            per_group = []
            for g in range(G):
                oh = (seg & (grp == g)[..., None]).float()
                if insdis_mode == "pixels":
                    lg = _pixel_contrast(feat, oh, insdis_sample_k, insdis_sample_temperature,
                                         insdis_temperature, generator)
                else:
                    lg = _mean_contrast(feat, oh, insdis_temperature)
                per_group.append(lg.mean())
            losses["loss_instdisc"] = torch.stack(per_group).mean()

    return {k: v * float(wts.get(k, 1.0)) for k, v in losses.items()}


def _segments(unpacked, qg: torch.Tensor, P: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """All targets of the batch padded to (B, M_max, P) bool with their group (B, M_max)
    (-1 = padding, or a target of unknown group that is unmatched while G > 1)."""
    B = len(unpacked)
    M = max([u[0].shape[0] for u in unpacked] + [1])
    seg = torch.zeros(B, M, P, dtype=torch.bool, device=device)
    grp = torch.full((B, M), -1, dtype=torch.long, device=device)
    single = int(qg.max()) == 0 if qg.numel() else True
    for b, (masks, tg, qi, ti) in enumerate(unpacked):
        m = masks.shape[0]
        if m == 0:
            continue
        seg[b, :m] = masks.flatten(1)
        if tg is not None:
            grp[b, :m] = tg
        elif single:
            grp[b, :m] = 0
        elif qi.numel():
            grp[b, ti] = qg[qi]
    return seg, grp


def _downsample_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth label (B, H, W) to (B, h, w): the port's corner-aligned stride
    ``(H - 1) // (h - 1)`` when it lands exactly, else nearest."""
    H, W = label.shape[-2:]
    h, w = size
    if h > 1 and w > 1 and (H - 1) % (h - 1) == 0 and (W - 1) % (w - 1) == 0 \
            and (H - 1) // (h - 1) == (W - 1) // (w - 1):
        s = (H - 1) // (h - 1)
        return label[:, ::s, ::s]
    return F.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()


def loss_aux_semantic(aux_logits: torch.Tensor, semantic_label: torch.Tensor, ignore_index: int = 255, *,
                      sample_k: int = 0, sample_temperature: float = 2.0, top_k_percent: float = 1.0,
                      weight: float = KMAX_LOSS_WEIGHTS["loss_aux_semantic"],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """kMaX-DeepLab's auxiliary semantic loss: per-pixel cross-entropy of ``aux_logits``
    (B, C, h', w') against ``semantic_label`` (B, H, W) (downsampled to (h', w') as the port:
    corner-aligned stride, else nearest), ``ignore_index`` and labels outside ``[0, C)``
    skipped; ``mean over kept pixels of -log softmax(z_x)[y_x]`` per image, averaged over the
    batch, times ``weight`` (1.0).

    Options: ``sample_k > 0`` draws that many labelled pixels without replacement with
    probability ∝ ``(HW / area of their class) ** sample_temperature`` (the port's
    ``AUX_SEMANTIC_SAMPLE_K = 4096``, temperature 2.0; Gumbel-top-k seeded by ``generator``);
    ``top_k_percent < 1`` keeps only the hardest fraction of the (sampled) pixels per image
    (deeplab2's top-k pixel mining). Defaults: plain cross-entropy on every labelled pixel.
    """
    if not 0.0 < top_k_percent <= 1.0:
        raise ValueError("top_k_percent must lie in (0, 1]")
    B, C, h, w = aux_logits.shape
    label = semantic_label.long().to(aux_logits.device)
    if label.dim() != 3 or label.shape[0] != B:
        raise ValueError(f"semantic_label must be (B, H, W), got {tuple(label.shape)}")
    if tuple(label.shape[-2:]) != (h, w):
        label = _downsample_label(label, (h, w))
    with _fp32(aux_logits.device):
        x = aux_logits.float().flatten(2)                                        # (B, C, P)
        y = label.flatten(1)
        valid = (y != ignore_index) & (y >= 0) & (y < C)
        ys = torch.where(valid, y, torch.zeros_like(y))
        ce = F.cross_entropy(x, ys, reduction="none") * valid                     # (B, P)
        P = ce.shape[1]
        if sample_k > 0:
            cnt = torch.zeros(B, C, device=ce.device).scatter_add_(1, ys, valid.float())
            pix_area = cnt.gather(1, ys)
            logits = torch.log(P / pix_area.clamp_min(1.0)) * sample_temperature + (~valid).float() * _NEG
            idx = _gumbel_topk(logits, min(int(sample_k), P), generator)
            ce, valid = ce.gather(1, idx), valid.gather(1, idx)
        if top_k_percent < 1.0:
            k = max(1, round(top_k_percent * ce.shape[1]))
            ce, idx = ce.topk(k, dim=1)
            valid = valid.gather(1, idx)
        loss = (ce * valid).sum(1) / valid.sum(1).clamp_min(1)
    return loss.mean() * float(weight)
