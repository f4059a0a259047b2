"""CoBra's Table 3, Table 5 and pipeline figures from ``labelwise run cobra-ablation`` outputs.

    python bench/cobra_tables.py seed0=runs/abl-s0 seed1=runs/abl-s1 "dev seed 5=runs/abl-s5" > tables.md

Each argument is ``NAME=FOLDER`` (or a bare folder, named after itself): one recipe output per testbed
seed (``OUT/<stage>/metrics.json`` of the ``evaluate`` stages). First a compact mIoU table with a
column per folder, then each folder's full tables: mIoU, precision, recall, confusion ratio (FP/TP)
and the mean IoU of the ``cooc`` testbed's co-occurring classes and of its control classes. A stage
that has not run shows as "not run".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

T3 = [("cnn_only", "CAK only"), ("vit_only", "SAK only"), ("cam", "L_cam"), ("cap_sap", "L_cap + L_sap"),
      ("cam_cap", "L_cam + L_cap"), ("cam_sap", "L_cam + L_sap"), ("cobra", "CoBra (all three)")]
T5 = [("cnn", "M_cnn"), ("vit", "M_tran"), ("mean", "(M_cnn + M_tran)/2"), ("max", "max(M_cnn, M_tran)"),
      ("fuse", "M_fuse")]
PIPELINE = [("t3_cobra", "M_fuse seeds (train)"), ("eval_crf_fuse", "M_fuse + CRF masks (train)"),
            ("t5_irn_fuse", "IRN masks (train)"), ("eval_irn_crf_fuse", "IRN + CRF masks (train)"),
            ("eval_segmentation", "DeepLabV3+ on the IRN + CRF masks (val)"),
            ("t5_irn_fuse_release", "IRN masks, the IRN release's IR labels 0.30 / 0.05 (train)")]


def collect(folder: str | Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/metrics.json"))}


def _groups() -> dict[str, list[str]]:
    from labelwise.stages import load_recipe

    return load_recipe("cobra-ablation").table_groups


def _cells(m: dict | None, groups: dict[str, list[str]]) -> list[str]:
    if m is None:
        return ["not run"] + ["-"] * (3 + len(groups))
    per = m.get("per_class_iou", {})
    g = [sum(per[c] for c in cs) / len(cs) if all(c in per for c in cs) else float("nan") for cs in groups.values()]
    return [f"{m['miou']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['confusion_ratio']:.2f}",
            *[f"{v:.3f}" for v in g]]


def _rows(metrics: dict[str, dict]) -> list[tuple[str, str, dict | None]]:
    """(table, row, metrics) of every figure, in the order of the paper's tables."""
    out = [("Table 3: seed mIoU (train), the preset's fixed background, no CRF", n, metrics.get(f"t3_{k}"))
           for k, n in T3]
    out += [("Table 3, the same seeds at the conventional background 0.5", n, metrics.get(f"t3_{k}_fixed"))
            for k, n in T3]
    out += [("Table 5: seeds of each source (train), the preset's fixed background, no CRF", n,
             metrics.get("t3_cobra" if k == "fuse" else f"t5_seed_{k}")) for k, n in T5]
    out += [("Table 5: the same seeds at the conventional background 0.5", n,
             metrics.get("t3_cobra_fixed" if k == "fuse" else f"t5_seed_{k}_fixed")) for k, n in T5]
    out += [("Table 5: IRN masks trained on each source (train; IR labels from the attention threshold)", n,
             metrics.get(f"t5_irn_{k}")) for k, n in T5]
    out += [("Pipeline on M_fuse", n, metrics.get(k)) for k, n in PIPELINE]
    return out


def tables(metrics: dict[str, dict]) -> str:
    groups = _groups()
    head = ["mIoU", "precision", "recall", "FP/TP", *[f"{k} IoU" for k in groups]]
    lines, last = [], None
    for title, name, m in _rows(metrics):
        if title != last:
            lines += ([""] if last else []) + [f"#### {title}", "", "| row | " + " | ".join(head) + " |",
                                               "|---|" + "---:|" * len(head)]
            last = title
        lines.append(f"| {name} | " + " | ".join(_cells(m, groups)) + " |")
    return "\n".join(lines) + "\n"


def compact(runs: dict[str, dict[str, dict]]) -> str:
    """One mIoU column per folder, every figure of :func:`_rows`."""
    names = list(runs)
    lines, last = [], None
    for i, (title, name, _) in enumerate(_rows({})):
        if title != last:
            lines += ([""] if last else []) + [f"#### {title}", "", "| row | " + " | ".join(names) + " |",
                                               "|---|" + "---:|" * len(names)]
            last = title
        cells = []
        for r in runs.values():
            m = _rows(r)[i][2]
            cells.append("not run" if m is None else f"{m['miou']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


IRN_STAGES = [("irn_fuse", "M_fuse"), ("irn_cnn", "M_cnn"), ("irn_vit", "M_tran"), ("irn_mean", "(M_cnn + M_tran)/2"),
              ("irn_max", "max(M_cnn, M_tran)"), ("irn_fuse_release", "M_fuse, IR labels 0.30 / 0.05")]
IR_KEYS = ("ir_fg", "ir_bg", "ir_ignore", "ir_no_fg", "ir_neg_pairs")


def ir_label_table(folder: str | Path) -> str:
    """Each IRN stage's IR labels, averaged over its training log (``labelwise train irn`` logs them)."""
    lines = ["| IRN trained on | fg cells | bg cells | ignored | crops without fg | negative pairs / crop |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage, name in IRN_STAGES:
        log = Path(folder) / stage / "log.jsonl"
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        recs = [r for r in recs if all(k in r for k in IR_KEYS)]
        if not recs:
            lines.append(f"| {name} | not run | - | - | - | - |")
            continue
        m = {k: sum(r[k] for r in recs) / len(recs) for k in IR_KEYS}
        lines.append(f"| {name} | {m['ir_fg']:.3f} | {m['ir_bg']:.3f} | {m['ir_ignore']:.3f} | {m['ir_no_fg']:.2f} | "
                     f"{m['ir_neg_pairs']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="NAME=FOLDER: labelwise run cobra-ablation outputs, one per testbed seed")
    args = p.parse_args(argv)
    runs, folders = {}, {}
    for a in args.folders:
        name, _, folder = a.rpartition("=") if "=" in a else (a, "", a)
        runs[name], folders[name] = collect(folder), folder
    out = ["### mIoU of every figure, per testbed seed", "", compact(runs)]
    for name, folder in folders.items():
        out += [f"#### IR labels of each IRN, {name} (training-log means)", "", ir_label_table(folder)]
    for name, m in runs.items():
        out += [f"### {name}", "", tables(m)]
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
