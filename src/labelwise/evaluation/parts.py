"""Part segmentation metrics: part and object mIoU, part mAvg and part/object consistency.

Inputs per image: predicted and ground-truth *part* maps (part indices, 0 = background,
255 = ignore/unknown) and predicted and ground-truth *object* maps (object indices).
``part_to_object[p]`` is the object index part ``p`` belongs to (``part_to_object[0] = 0``).

* ``part_miou`` / ``object_miou``: mIoU over all part / object classes, background
  included, with the conventions of :class:`~labelwise.evaluation.semantic.SemanticMetric`
  (classes absent from both sides are NaN and excluded).
* ``part_mavg``: for every foreground object that has parts, the mean IoU of its parts
  (NaN parts excluded); then the mean over those objects (objects whose parts are all
  NaN are excluded). Background is not part of it.
* ``consistency``: over the pixels whose ground-truth part label is not ignore and which
  the prediction calls foreground (predicted part != 0 or predicted object != 0), the
  fraction whose predicted part belongs to the predicted object
  (``part_to_object[pred_part] == pred_object``). A 255 ("unknown") on either
  predicted map counts as inconsistent.
* ``sibling_confusion``: for every foreground part class with ground-truth pixels, the
  fraction of them predicted as a *sibling* (another part of the same object); the mean over
  those parts. ``part_confusion`` is the count matrix it comes from, (P, P + 1): rows ground
  truth, columns prediction, the last column predictions outside the part classes (255);
  ``per_part_sibling_confusion`` the per-part fractions.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from labelwise.errors import LabelwiseError
from labelwise.evaluation.base import Metric, as_tensor, format_table, nanmean
from labelwise.evaluation.semantic import SemanticMetric

__all__ = ["PartsMetric"]


class PartsMetric(Metric):
    def __init__(self, part_names: Sequence[str], object_names: Sequence[str],
                 part_to_object: Sequence[int | str], ignore_index: int = 255):
        super().__init__()
        if len(part_to_object) != len(part_names):
            raise ValueError(f"part_to_object has {len(part_to_object)} entries for {len(part_names)} parts")
        obj_index = {n: i for i, n in enumerate(object_names)}
        p2o = []
        for p, o in zip(part_names, part_to_object):
            if isinstance(o, str):
                if o not in obj_index:
                    raise LabelwiseError(f"part '{p}' belongs to unknown object '{o}'")
                o = obj_index[o]
            if not 0 <= int(o) < len(object_names):
                raise LabelwiseError(f"part '{p}' maps to object index {o} outside 0..{len(object_names) - 1}")
            p2o.append(int(o))
        self.ignore_index = int(ignore_index)
        self.part = SemanticMetric(len(part_names), list(part_names), ignore_index)
        self.object = SemanticMetric(len(object_names), list(object_names), ignore_index)
        self.part_names, self.object_names = self.part.class_names, self.object.class_names
        self.part_to_object = p2o
        # Lookup with a sentinel for 255: index len(parts) -> -1 (belongs to no object).
        self._p2o = torch.tensor(p2o + [-1], dtype=torch.int64)
        self.add_state("part_confusion", torch.zeros_like(self.part.confusion))
        self.add_state("object_confusion", torch.zeros_like(self.object.confusion))
        self.add_state("consistent", torch.zeros(2, dtype=torch.int64))  # [consistent, foreground]

    def update(self, part_pred: Any, part_gt: Any, object_pred: Any, object_gt: Any) -> None:
        """Add a batch of ``[B x] H x W`` part/object predictions and ground truths."""
        pp = as_tensor(part_pred)
        dev = pp.device
        pg, op, og = as_tensor(part_gt, dev), as_tensor(object_pred, dev), as_tensor(object_gt, dev)
        for name, t in (("part ground truth", pg), ("object prediction", op), ("object ground truth", og)):
            if t.shape != pp.shape:
                raise LabelwiseError(f"{name} of size {tuple(t.shape)} does not match the part prediction "
                                     f"of size {tuple(pp.shape)}")
        self._follow(dev)
        self.part_confusion += self.part.confusion_of(pp, pg)
        self.object_confusion += self.object.confusion_of(op, og)
        ig, P = self.ignore_index, len(self.part_names)
        pp, pg, op = pp.reshape(-1).long(), pg.reshape(-1).long(), op.reshape(-1).long()
        fg = (pg != ig) & ((pp != 0) | (op != 0))
        p_idx = torch.where(pp == ig, torch.full_like(pp, P), pp)
        owner = self._p2o.to(dev)[p_idx]
        ok = fg & (owner == op) & (op != ig)
        self.consistent += torch.stack([ok.sum(), fg.sum()])

    def compute(self) -> dict[str, Any]:
        st = self.reduced_states()
        sp = SemanticMetric.scores_from_confusion(st["part_confusion"])
        so = SemanticMetric.scores_from_confusion(st["object_confusion"])
        p2o = torch.tensor(self.part_to_object)
        per_object_mavg = {}
        for o in range(1, len(self.object_names)):
            sel = (p2o == o)
            sel[0] = False
            if sel.any():
                per_object_mavg[self.object_names[o]] = nanmean(sp["iou"][sel])
        mavg = torch.tensor(list(per_object_mavg.values()), dtype=torch.float64)
        c, n = st["consistent"].tolist()
        conf = st["part_confusion"].to(torch.float64)  # (P, P + 1): the last column = unknown (255)
        P = len(p2o)
        sibling = torch.zeros(P, P + 1, dtype=torch.bool)
        sibling[:, :P] = (p2o[:, None] == p2o[None, :]) & ~torch.eye(P, dtype=torch.bool)
        sibling[0, :] = sibling[:, 0] = False  # background has no siblings
        gt_px = conf.sum(1)
        rate = (conf * sibling).sum(1) / gt_px.clamp_min(1)
        has = (gt_px > 0) & (p2o > 0)
        per_part_sibling = {self.part_names[i]: float(rate[i]) for i in range(len(p2o)) if has[i]}
        return {
            "part_miou": nanmean(sp["iou"]),
            "object_miou": nanmean(so["iou"]),
            "part_mavg": nanmean(mavg) if mavg.numel() else float("nan"),
            "consistency": c / n if n > 0 else float("nan"),
            "part_pixel_acc": float(sp["tp"].sum() / sp["gt"].sum()) if sp["gt"].sum() > 0 else float("nan"),
            "object_pixel_acc": float(so["tp"].sum() / so["gt"].sum()) if so["gt"].sum() > 0 else float("nan"),
            "per_part_iou": {k: float(v) for k, v in zip(self.part_names, sp["iou"])},
            "per_object_iou": {k: float(v) for k, v in zip(self.object_names, so["iou"])},
            "per_object_part_mavg": per_object_mavg,
            "sibling_confusion": float(rate[has].mean()) if has.any() else float("nan"),
            "per_part_sibling_confusion": per_part_sibling,
            "part_confusion": st["part_confusion"].tolist(),
        }

    def table(self, result: dict[str, Any] | None = None) -> str:
        r = self.compute() if result is None else result
        parts = format_table([[p, self.object_names[self.part_to_object[i]], r["per_part_iou"][p]]
                              for i, p in enumerate(self.part_names)], ["part", "object", "IoU"])
        objs = format_table([[o, r["per_object_iou"][o], r["per_object_part_mavg"].get(o)]
                             for o in self.object_names], ["object", "IoU", "part mAvg"])
        summary = format_table([[k, r[k]] for k in ("part_miou", "object_miou", "part_mavg", "consistency")],
                               ["metric", "value"])
        return "\n\n".join([parts, objs, summary])
