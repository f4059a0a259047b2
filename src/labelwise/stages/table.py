"""The comparison table of a recipe: one row per ``evaluate`` stage.

Columns are the headline metrics of each task (``semantic``: mIoU, confusion ratio FP/TP,
pixel accuracy, precision, recall; ``parts``: part / object mIoU, part mAvg, consistency;
``instance``: AP, AP50, AP75, AR100; ``panoptic``: PQ, SQ, RQ; ``unsupervised``: mIoU,
pixel accuracy). ``table.json`` holds every scalar metric of each row and the per-class ones
(``per_class_iou``, ``per_class_confusion_ratio``). A recipe's ``table: {classes: [...]}`` adds a
second table with the IoU and the confusion ratio (FP/TP) of those classes in every row that has
them, and ``table: {groups: {name: [...]}}`` a third with each group's mean IoU and mean FP/TP
(e.g. co-occurring pairs vs control groups, SeCo Table 3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from labelwise.io import atomic_write_json, atomic_write_text

HEADLINE = {
    "semantic": ("miou", "confusion_ratio", "pixel_acc", "precision", "recall"),
    "parts": ("part_miou", "object_miou", "part_mavg", "consistency"),
    "instance": ("ap", "ap50", "ap75", "ar100"),
    "panoptic": ("pq", "sq", "rq"),
    "unsupervised": ("miou", "pixel_acc"),
}


PER_CLASS = ("per_class_iou", "per_class_confusion_ratio")


def comparison_table(recipe, outputs: dict[str, dict]) -> list[dict]:
    """Rows ``{"stage", "label", "task", "split", <scalar metrics>}`` of the evaluate stages that ran."""
    rows = []
    for s in recipe.stages:
        if s.kind != "evaluate" or s.name not in outputs:
            continue
        res = json.loads(Path(outputs[s.name]["metrics"]).read_text())
        label = s.fields.get("label") or s.name
        row = {"stage": s.name, "label": str(label), "task": res.get("task"), "split": res.get("split")}
        row.update({k: v for k, v in res.items() if k not in row and k != "pred"
                    and (isinstance(v, (int, float)) or v is None) and not isinstance(v, bool)})
        row.update({k: res[k] for k in PER_CLASS if isinstance(res.get(k), dict)})
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3f}")
    return str(v)


def headline_columns(rows: list[dict]) -> list[str]:
    """The headline metrics of the tasks in ``rows``, in order, each once."""
    cols: list[str] = []
    for r in rows:
        for k in HEADLINE.get(r.get("task") or "", ()):
            if k not in cols:
                cols.append(k)
    return cols


def format_table(rows: list[dict]) -> str:
    """Markdown table; columns: stage label, task, split, then the headline metrics in use."""
    cols = headline_columns(rows)
    head = ["stage", "task", "split", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["label"], str(r.get("task")), str(r.get("split") or "-"), *(_fmt(r.get(k)) for k in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_class_table(rows: list[dict], classes: list[str]) -> str:
    """IoU and confusion ratio (FP/TP) of ``classes`` per row (rows without per-class metrics are left out)."""
    rows = [r for r in rows if isinstance(r.get("per_class_iou"), dict)]
    head = ["stage", "split"] + [f"{c} IoU (FP/TP)" for c in classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        iou, cr = r.get("per_class_iou") or {}, r.get("per_class_confusion_ratio") or {}
        cells = [f"{_fmt(iou.get(c))} ({_fmt(cr.get(c))})" for c in classes]
        lines.append("| " + " | ".join([r["label"], str(r.get("split") or "-"), *cells]) + " |")
    return "\n".join(lines)


def group_means(row: dict, classes: list[str]) -> tuple[float | None, float | None]:
    """Mean IoU and mean confusion ratio (FP/TP) of ``classes`` in one row, over the classes
    that have a finite value (a class absent from the split has none)."""
    out = []
    for key in PER_CLASS:
        vals = [(row.get(key) or {}).get(c) for c in classes]
        vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        out.append(sum(vals) / len(vals) if vals else None)
    return out[0], out[1]


def format_group_table(rows: list[dict], groups: dict[str, list[str]]) -> str:
    """Per row, each class group's mean IoU and, in brackets, its mean confusion ratio (FP/TP)."""
    rows = [r for r in rows if isinstance(r.get("per_class_iou"), dict)]
    head = ["stage", "split"] + [f"{g} mean IoU (FP/TP)" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [f"{_fmt(iou)} ({_fmt(cr)})" for iou, cr in (group_means(r, cls) for cls in groups.values())]
        lines.append("| " + " | ".join([r["label"], str(r.get("split") or "-"), *cells]) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict], out: Path, classes: list[str] | None = None,
                groups: dict[str, list[str]] | None = None) -> str:
    text = format_table(rows)
    if classes:
        text += "\n\n" + format_class_table(rows, classes)
    if groups:
        text += "\n\n" + format_group_table(rows, groups)
    atomic_write_text(Path(out) / "table.md", text + "\n")
    atomic_write_json(Path(out) / "table.json", rows)
    return text
