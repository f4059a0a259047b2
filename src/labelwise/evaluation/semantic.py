"""Semantic segmentation metrics from a confusion matrix.

The state is a ``C x (C + 1)`` int64 confusion matrix (rows: ground-truth class, columns:
predicted class; the extra last column counts valid pixels predicted as 255 =
"unknown", which are wrong for their ground-truth class but a false positive for no
class). Ground-truth pixels equal to ``ignore_index`` are skipped.

Per class ``c`` with ``TP``, ``FP`` (predicted ``c``, ground truth another class),
``FN`` (ground truth ``c``, predicted something else or 255):

* ``IoU = TP / (TP + FP + FN)``; ``precision = TP / (TP + FP)``; ``recall = TP / (TP + FN)``.
* A class absent from both ground truth and prediction has NaN IoU/precision/recall and
  is excluded from every mean. A class present on one side only scores 0 where the ratio
  is 0/0 (never predicted -> precision 0; predicted but absent -> recall 0).
* ``miou``, ``precision``, ``recall``: means over the classes that are not NaN
  (background included, as is standard for VOC/COCO mIoU).
* ``pixel_acc = sum TP / #valid pixels``; ``mean_acc``: mean per-class accuracy
  ``TP / #gt pixels`` over the classes present in the ground truth (FCN definition).
* ``confusion_ratio`` (SeCo, Sec. 4.1: "the number of false positive pixels / that of
  true positives"): ``sum_c FP_c / sum_c TP_c`` pooled over all *foreground* classes
  (``c >= 1``); ``per_class_confusion_ratio`` holds ``FP_c / TP_c`` for each foreground
  class (inf when ``TP_c = 0 < FP_c``, NaN when both are 0). Lower is better.
"""

from __future__ import annotations

from typing import Any

import torch

from labelwise.errors import LabelwiseError
from labelwise.evaluation.base import Metric, as_tensor, format_table, nanmean, unique_names

__all__ = ["SemanticMetric", "check_labels"]


def check_labels(x: torch.Tensor, num: int, ignore_index: int, what: str) -> None:
    """Raise if ``x`` holds values outside ``[0, num)`` other than ``ignore_index``."""
    bad = (x < 0) | ((x >= num) & (x != ignore_index))
    if bool(bad.any()):
        v = int(x[bad].reshape(-1)[0])
        raise LabelwiseError(f"{what} holds value {v} outside 0..{num - 1} (and not the ignore value "
                             f"{ignore_index}); check the number of classes")


class SemanticMetric(Metric):
    """mIoU, accuracies, precision/recall and the SeCo confusion ratio over ``num_classes`` classes."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None, ignore_index: int = 255):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.class_names = unique_names(list(class_names) if class_names is not None
                                        else [str(i) for i in range(num_classes)])
        self.ignore_index = int(ignore_index)
        self.add_state("confusion", torch.zeros(num_classes, num_classes + 1, dtype=torch.int64))

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: ``pred`` (``[B x] H x W`` labels, or ``[B x] C x H x W`` scores -> argmax over C)
        and ``target`` (``[B x] H x W``); numpy or torch, any device."""
        pred = as_tensor(pred)
        target = as_tensor(target, pred.device)
        if pred.ndim == target.ndim + 1 and pred.is_floating_point():
            pred = pred.argmax(dim=-3)
        if pred.shape != target.shape:
            raise LabelwiseError(f"prediction of size {tuple(pred.shape)} does not match the ground truth "
                                 f"of size {tuple(target.shape)}; predict at the ground-truth resolution")
        self._follow(pred.device)
        self.confusion += self.confusion_of(pred, target)

    def confusion_of(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The ``C x (C + 1)`` confusion of one batch (torch.bincount, no loops)."""
        C, ig = self.num_classes, self.ignore_index
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        check_labels(pred, C, ig, "prediction")
        check_labels(target, C, ig, "ground truth")
        valid = target != ig
        p = torch.where(pred == ig, torch.full_like(pred, C), pred)[valid]
        t = target[valid]
        return torch.bincount(t * (C + 1) + p, minlength=C * (C + 1)).reshape(C, C + 1)

    @staticmethod
    def scores_from_confusion(cm: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-class TP/FP/FN, IoU, precision, recall, accuracy and confusion ratio (float64 tensors)."""
        cm = cm.double().cpu()
        C = cm.shape[0]
        tp = torch.diagonal(cm[:, :C])
        gt = cm.sum(1)
        pr = cm[:, :C].sum(0)
        fp, fn = pr - tp, gt - tp
        present = (gt + pr) > 0
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(present, tp / (tp + fp + fn).clamp(min=1), nan)
        prec = torch.where(present, tp / pr.clamp(min=1), nan)
        rec = torch.where(present, tp / gt.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        cr = torch.where(tp > 0, fp / tp.clamp(min=1), torch.where(fp > 0, torch.full_like(tp, float("inf")), nan))
        return {"tp": tp, "fp": fp, "fn": fn, "gt": gt, "iou": iou, "precision": prec, "recall": rec,
                "acc": acc, "cr": cr}

    def compute(self) -> dict[str, Any]:
        cm = self.reduced_states()["confusion"]
        s = self.scores_from_confusion(cm)
        names = self.class_names
        total = float(s["gt"].sum())
        tp_fg, fp_fg = float(s["tp"][1:].sum()), float(s["fp"][1:].sum())
        if tp_fg > 0:
            cr = fp_fg / tp_fg
        else:
            cr = float("inf") if fp_fg > 0 else float("nan")
        return {
            "miou": nanmean(s["iou"]),
            "pixel_acc": float(s["tp"].sum()) / total if total > 0 else float("nan"),
            "mean_acc": nanmean(s["acc"]),
            "precision": nanmean(s["precision"]),
            "recall": nanmean(s["recall"]),
            "confusion_ratio": cr,
            "num_pixels": int(total),
            "per_class_iou": {n: float(v) for n, v in zip(names, s["iou"])},
            "per_class_precision": {n: float(v) for n, v in zip(names, s["precision"])},
            "per_class_recall": {n: float(v) for n, v in zip(names, s["recall"])},
            "per_class_confusion_ratio": {n: float(v) for n, v in zip(names[1:], s["cr"][1:])},
        }

    def table(self, result: dict[str, Any] | None = None) -> str:
        r = self.compute() if result is None else result
        rows = []
        for n in self.class_names:
            rows.append([n, r["per_class_iou"].get(n), r["per_class_precision"].get(n),
                         r["per_class_recall"].get(n), r["per_class_confusion_ratio"].get(n)])
        head = format_table(rows, ["class", "IoU", "precision", "recall", "FP/TP"])
        summary = format_table([[k, r[k]] for k in ("miou", "pixel_acc", "mean_acc", "precision", "recall",
                                                    "confusion_ratio")], ["metric", "value"])
        return head + "\n\n" + summary
