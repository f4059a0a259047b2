"""Unsupervised segmentation: Hungarian matching of clusters to classes, then mIoU.

The state is a ``K x C`` confusion matrix (rows: predicted cluster, columns: ground-truth
class; pixels with ground truth ``ignore_index`` skipped; a predicted ``unassigned`` id --
255 by default, -1 for maps read with :func:`labelwise.io.read_cluster_map`, which also holds
16-bit maps of more than 255 clusters -- counts as a wrong pixel for its ground-truth class). At :meth:`compute` the clusters are matched
one-to-one to classes maximising the number of agreeing pixels (scipy
``linear_sum_assignment`` via :func:`labelwise.blocks.matching.hungarian_match`). With more
clusters than classes (``K > C``) the surplus clusters stay unmatched and all their
pixels count as wrong (false negatives of their true class, false positives of none),
as in STEGO / U2Seg; with ``K < C`` the unmatched classes get IoU 0 when present.

``num_clusters=None`` lets the number of clusters grow with the largest id seen (the
CLI's ``--num-clusters`` default); ranks then agree on the size before reducing.

Result: ``miou`` and ``pixel_acc`` over the matched labelling, ``per_class_iou``, and
``assignment`` (list of length K: class index of each cluster, -1 when unmatched).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from labelwise.blocks.matching import hungarian_match
from labelwise.dist import all_gather_object, all_reduce_sum, is_dist
from labelwise.errors import LabelwiseError
from labelwise.evaluation.base import Metric, as_tensor, format_table, nanmean, unique_names
from labelwise.evaluation.semantic import check_labels

__all__ = ["UnsupervisedMetric"]


class UnsupervisedMetric(Metric):
    def __init__(self, num_clusters: int | None, num_classes: int, class_names: Sequence[str] | None = None,
                 ignore_index: int = 255, unassigned: int | None = None):
        super().__init__()
        self.unassigned_id = int(ignore_index if unassigned is None else unassigned)
        self.fixed = num_clusters is not None
        self.num_classes = int(num_classes)
        self.class_names = unique_names(list(class_names) if class_names is not None
                                        else [str(i) for i in range(num_classes)])
        self.ignore_index = int(ignore_index)
        self.add_state("confusion", torch.zeros(int(num_clusters or 0), num_classes, dtype=torch.int64))
        # Valid pixels predicted 255 (unassigned): wrong for their ground-truth class.
        self.add_state("unassigned", torch.zeros(num_classes, dtype=torch.int64))

    @property
    def num_clusters(self) -> int:
        return int(self.confusion.shape[0])

    def _grow(self, k: int) -> None:
        if k > self.num_clusters:
            pad = torch.zeros(k - self.num_clusters, self.num_classes, dtype=torch.int64, device=self.device)
            self.confusion = torch.cat([self.confusion, pad], 0)

    def update(self, pred: Any, target: Any) -> None:
        """Add ``[B x] H x W`` cluster ids (0..K-1, ``unassigned`` = none) and ground-truth classes."""
        pred = as_tensor(pred)
        target = as_tensor(target, pred.device)
        if pred.shape != target.shape:
            raise LabelwiseError(f"prediction of size {tuple(pred.shape)} does not match the ground truth "
                                 f"of size {tuple(target.shape)}")
        self._follow(pred.device)
        ig, C = self.ignore_index, self.num_classes
        p, t = pred.reshape(-1).long(), target.reshape(-1).long()
        check_labels(t, C, ig, "ground truth")
        none = p == self.unassigned_id
        real = p[~none]
        if not self.fixed and real.numel():
            if int(real.min()) < 0:
                raise LabelwiseError(f"prediction holds negative cluster id {int(real.min())}")
            self._grow(int(real.max()) + 1)
        K = self.num_clusters
        check_labels(real, K, self.unassigned_id, "cluster prediction")
        valid = (t != ig) & ~none
        self.confusion += torch.bincount(p[valid] * C + t[valid], minlength=K * C).reshape(K, C)
        miss = (t != ig) & none
        self.unassigned += torch.bincount(t[miss], minlength=C)

    def reset(self) -> None:
        super().reset()
        if not self.fixed:
            self.confusion = self.confusion[:0]

    def reduced_states(self) -> dict[str, torch.Tensor]:
        cm = self.confusion
        if is_dist() and not self.fixed:
            k = max(all_gather_object(self.num_clusters))
            self._grow(k)
            cm = self.confusion
        return {"confusion": all_reduce_sum(cm), "unassigned": all_reduce_sum(self.unassigned)}

    def compute(self) -> dict[str, Any]:
        st = self.reduced_states()
        cm = st["confusion"].double().cpu()  # K x C
        una = st["unassigned"].double().cpu()
        K, C = cm.shape
        rows, cols = hungarian_match(cm, maximize=True) if K else (torch.zeros(0, dtype=torch.long),) * 2
        assignment = [-1] * K
        for r, c in zip(rows.tolist(), cols.tolist()):
            assignment[r] = c
        gt = cm.sum(0) + una                      # pixels of each class
        tp = torch.zeros(C, dtype=torch.float64)
        pr = torch.zeros(C, dtype=torch.float64)  # pixels of the cluster matched to each class
        tp[cols] = cm[rows, cols]
        pr[cols] = cm[rows].sum(1)
        present = (gt + pr) > 0
        iou = torch.where(present, tp / (gt + pr - tp).clamp(min=1), torch.full_like(tp, float("nan")))
        total = float(gt.sum())
        return {
            "miou": nanmean(iou),
            "pixel_acc": float(tp.sum()) / total if total > 0 else float("nan"),
            "num_clusters": K,
            "per_class_iou": {n: float(v) for n, v in zip(self.class_names, iou)},
            "assignment": assignment,
        }

    def table(self, result: dict[str, Any] | None = None) -> str:
        r = self.compute() if result is None else result
        owner = {c: k for k, c in enumerate(r["assignment"]) if c >= 0}
        rows = [[n, owner.get(i, "-"), r["per_class_iou"][n]] for i, n in enumerate(self.class_names)]
        return (format_table(rows, ["class", "cluster", "IoU"]) + "\n\n"
                + format_table([[k, r[k]] for k in ("miou", "pixel_acc", "num_clusters")], ["metric", "value"]))
