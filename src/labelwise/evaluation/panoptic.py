"""Panoptic quality (PQ = SQ x RQ, Kirillov et al. 2019) with things and stuff.

Accumulator
-----------
:class:`PanopticMetric` keeps, per category, TP / FP / FN counts and the IoU sum of the
matched pairs (tensors, so they sum over ranks). For each image, ``update`` receives the
predicted and ground-truth *segment-id maps* (``H x W`` ints) with their segment lists
(``[{"id", "category_id", "iscrowd"?}]``). Id 0 (or any id not in the ground-truth list)
is VOID in the ground truth; id 0 in a prediction is "no segment". Matching follows the
COCO panoptic reference:

* a predicted and a ground-truth segment of the same category match when
  ``IoU > 0.5`` (unique by construction), where the union leaves out the predicted
  pixels that fall on VOID;
* crowd ground-truth segments (``iscrowd: 1``) are never matched; an unmatched
  prediction is a false positive unless more than half of it lies on VOID or on crowd
  regions of its own category (then it is ignored);
* unmatched non-crowd ground-truth segments are false negatives.

Per category ``PQ_c = sum IoU / (TP + FP/2 + FN/2)``, ``SQ_c = sum IoU / TP``,
``RQ_c = TP / (TP + FP/2 + FN/2)``; ``pq``, ``sq``, ``rq`` average over the categories
with ``TP + FP + FN > 0``; ``pq_th``/``sq_th``/``rq_th`` over things (``isthing: 1``),
``pq_st``/``sq_st``/``rq_st`` over stuff. ``per_class_pq`` maps category name -> PQ.

Prediction formats read by ``labelwise evaluate panoptic --pred PRED``
--------------------------------------------------------------------
1. A COCO-panoptic folder: ``PRED/panoptic.json`` holding
   ``{"annotations": [{"image_id"?, "file_name": "x.png", "segments_info":
   [{"id": int, "category_id": int}, ...]}, ...]}`` and the PNGs it names, looked up as
   ``PRED/<file_name>`` or ``PRED/panoptic/<file_name>``. A pixel's segment id is
   ``R + 256 G + 256^2 B`` (0 = no segment). An annotation is matched to a ground-truth
   image by ``image_id`` or else by the file stem of ``file_name`` (``x.png`` <-> ``x.jpg``).
   Every ground-truth image needs an annotation.
2. An instance results json (the ``pseudo-masks``/COCO results list): the masks of an
   image are painted in ascending ``score`` order into one segment map (higher scores
   end up on top), each result one segment of its ``category_id``; masks fully covered
   by higher-scoring ones vanish. ``score_thresh`` drops low-scoring masks first. Images
   without results have an empty prediction.

Ground truth for the CLI comes from a ``coco:`` dataset: annotations of categories with
``isthing: 0`` are stuff segments, the others thing segments (missing ``isthing`` ->
thing). Stuff is painted first, then things in decreasing area (so small objects stay
visible where annotations overlap); unannotated pixels are VOID. ``class_agnostic=True``
maps every category (ground truth and prediction) to one thing category "object".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from labelwise.errors import LabelwiseError
from labelwise.evaluation.base import Metric, as_tensor, format_table, nanmean, unique_names

__all__ = ["PanopticMetric", "rgb2id", "id2rgb", "paint_instances"]



def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 COCO-panoptic PNG -> ``H x W`` int64 segment ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        return rgb.astype(np.int64)
    rgb = rgb[..., :3].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """``H x W`` segment ids -> ``H x W x 3`` uint8 (inverse of :func:`rgb2id`)."""
    ids = np.asarray(ids).astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def paint_instances(masks: np.ndarray, scores: Sequence[float], category_ids: Sequence[int]):
    """Paint ``N x H x W`` masks by ascending score into ``(ids H x W, segments)``; segment k+1 = mask k."""
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    ids = np.zeros((h, w), dtype=np.int64)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    for k in order:  # one vectorised assignment per mask, not per pixel
        ids[masks[k]] = k + 1
    segments = [{"id": int(k + 1), "category_id": int(category_ids[k]), "iscrowd": 0} for k in range(n)]
    return ids, segments


class PanopticMetric(Metric):
    """Accumulates per-category TP/FP/FN/IoU-sum; ``categories``: ``[{"id", "name", "isthing"}]``."""

    def __init__(self, categories: Sequence[dict]):
        super().__init__()
        if not categories:
            raise LabelwiseError("panoptic evaluation needs at least one category")
        self.categories = [dict(c) for c in categories]
        self.cat_index = {int(c["id"]): i for i, c in enumerate(self.categories)}
        self.names = unique_names([str(c.get("name", c["id"])) for c in self.categories])
        self.isthing = torch.tensor([int(c.get("isthing", 1)) == 1 for c in self.categories])
        n = len(self.categories)
        self.add_state("tp", torch.zeros(n, dtype=torch.int64))
        self.add_state("fp", torch.zeros(n, dtype=torch.int64))
        self.add_state("fn", torch.zeros(n, dtype=torch.int64))
        self.add_state("iou_sum", torch.zeros(n, dtype=torch.float64))

    def _segments(self, segments: Sequence[dict], what: str):
        ids, cats, crowd = [], [], []
        for s in segments:
            cid = int(s["category_id"])
            if cid not in self.cat_index:
                raise LabelwiseError(f"{what} segment {s['id']} has category_id {cid}, which the ground truth "
                                     "does not define")
            ids.append(int(s["id"]))
            cats.append(self.cat_index[cid])
            crowd.append(bool(s.get("iscrowd", 0)))
        if len(set(ids)) != len(ids):
            raise LabelwiseError(f"{what} lists a segment id twice")
        if 0 in ids:
            raise LabelwiseError(f"{what} uses segment id 0, which is reserved for VOID / no segment")
        return ids, cats, crowd

    @staticmethod
    def _compact(id_map: torch.Tensor, ids: list[int], what: str, strict: bool) -> torch.Tensor:
        """Segment ids -> 1..N in list order, 0 for 0/unknown (error for unknown ids when ``strict``)."""
        flat = id_map.reshape(-1).long()
        if not ids:
            if strict and bool((flat != 0).any()):
                raise LabelwiseError(f"{what} has segment id {int(flat[flat != 0][0])} in the map but not in "
                                     "segments_info")
            return torch.zeros_like(flat)
        table = torch.tensor(ids, dtype=torch.int64, device=flat.device)
        order = torch.argsort(table)
        st = table[order]
        pos = torch.searchsorted(st, flat).clamp(max=len(ids) - 1)
        found = st[pos] == flat
        if strict:
            bad = (~found) & (flat != 0)
            if bool(bad.any()):
                raise LabelwiseError(f"{what} has segment id {int(flat[bad][0])} in the map but not in "
                                     "segments_info")
        return torch.where(found, order[pos] + 1, torch.zeros_like(flat))

    def update(self, pred_ids: Any, pred_segments: Sequence[dict], gt_ids: Any, gt_segments: Sequence[dict]) -> None:
        """Add one image: segment-id maps (``H x W``) and their segment lists."""
        pm = as_tensor(pred_ids)
        gm = as_tensor(gt_ids, pm.device)
        if pm.shape != gm.shape:
            raise LabelwiseError(f"panoptic prediction of size {tuple(pm.shape)} does not match the ground truth "
                                 f"of size {tuple(gm.shape)}")
        self._follow(pm.device)
        dev = pm.device
        p_ids, p_cat, _ = self._segments(pred_segments, "prediction")
        g_ids, g_cat, g_crowd = self._segments(gt_segments, "ground truth")
        P, G = len(p_ids), len(g_ids)
        pi = self._compact(pm, p_ids, "prediction", strict=True)
        gi = self._compact(gm, g_ids, "ground truth", strict=False)
        m = torch.bincount(gi * (P + 1) + pi, minlength=(G + 1) * (P + 1)).reshape(G + 1, P + 1).double()
        inter = m[1:, 1:]                          # G x P
        g_area, p_area = m[1:].sum(1), m[:, 1:].sum(0)
        p_void = m[0, 1:]                          # predicted pixels on VOID
        pc = torch.tensor(p_cat, dtype=torch.int64, device=dev)
        gc = torch.tensor(g_cat, dtype=torch.int64, device=dev)
        crowd = torch.tensor(g_crowd, dtype=torch.bool, device=dev)
        same = gc[:, None] == pc[None, :]
        union = g_area[:, None] + p_area[None, :] - inter - p_void[None, :]
        iou = inter / union.clamp(min=1)
        match = (iou > 0.5) & same & ~crowd[:, None] & (p_area[None, :] > 0)
        g_matched, p_matched = match.any(1), match.any(0)
        n = len(self.categories)
        zeros_l = torch.zeros(n, dtype=torch.int64, device=dev)
        self.tp += zeros_l.scatter_add(0, gc[g_matched], torch.ones_like(gc[g_matched]))
        self.iou_sum += torch.zeros(n, dtype=torch.float64, device=dev).scatter_add(
            0, gc[g_matched], (iou * match).sum(1)[g_matched])
        fn_sel = ~g_matched & ~crowd
        self.fn += zeros_l.scatter_add(0, gc[fn_sel], torch.ones_like(gc[fn_sel]))
        crowd_inter = (inter * (same & crowd[:, None])).sum(0)
        ignored = (p_void + crowd_inter) > 0.5 * p_area
        fp_sel = ~p_matched & (p_area > 0) & ~ignored
        self.fp += zeros_l.scatter_add(0, pc[fp_sel], torch.ones_like(pc[fp_sel]))

    def compute(self) -> dict[str, Any]:
        st = {k: v.double().cpu() for k, v in self.reduced_states().items()}
        tp, fp, fn, s = st["tp"], st["fp"], st["fn"], st["iou_sum"]
        valid = (tp + fp + fn) > 0
        nan = torch.full_like(tp, float("nan"))
        denom = (tp + 0.5 * fp + 0.5 * fn).clamp(min=1e-12)
        pq = torch.where(valid, s / denom, nan)
        sq = torch.where(valid, torch.where(tp > 0, s / tp.clamp(min=1), torch.zeros_like(tp)), nan)
        rq = torch.where(valid, tp / denom, nan)
        out: dict[str, Any] = {}
        for suffix, sel in (("", torch.ones_like(valid)), ("_th", self.isthing), ("_st", ~self.isthing)):
            out["pq" + suffix] = nanmean(pq[sel])
            out["sq" + suffix] = nanmean(sq[sel])
            out["rq" + suffix] = nanmean(rq[sel])
            out["n" + (suffix or "_all")] = int((valid & sel).sum())
        out["per_class_pq"] = {n: float(v) for n, v in zip(self.names, pq)}
        out["per_class_sq"] = {n: float(v) for n, v in zip(self.names, sq)}
        out["per_class_rq"] = {n: float(v) for n, v in zip(self.names, rq)}
        return out

    def table(self, result: dict[str, Any] | None = None) -> str:
        r = self.compute() if result is None else result
        rows = [[n, "thing" if bool(t) else "stuff", r["per_class_pq"][n], r["per_class_sq"][n], r["per_class_rq"][n]]
                for n, t in zip(self.names, self.isthing.tolist())]
        summary = [[name, r["pq" + s], r["sq" + s], r["rq" + s], r["n" + (s or "_all")]]
                   for name, s in (("all", ""), ("things", "_th"), ("stuff", "_st"))]
        return (format_table(rows, ["category", "kind", "PQ", "SQ", "RQ"]) + "\n\n"
                + format_table(summary, ["", "PQ", "SQ", "RQ", "#cat"]))
