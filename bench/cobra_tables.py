"""CoBra's Table 3, Table 5 and pipeline figures from ``labelwise run cobra-ablation`` outputs.

    python bench/cobra_tables.py runs/cobra-ablation [more output folders ...] > tables.md

Every folder is a recipe output (``OUT/<stage>/metrics.json`` of the ``evaluate`` stages); several
folders are merged by stage name (the same recipe split over parallel runners). Columns: mIoU,
precision, recall, confusion ratio (FP/TP) and the mean IoU of the ``cooc`` testbed's co-occurring
classes and of its control classes.
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
            ("eval_segmentation", "DeepLabV3+ on the IRN + CRF masks (val)")]


def collect(folders: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in folders:
        for p in sorted(Path(f).glob("*/metrics.json")):
            out[p.parent.name] = json.loads(p.read_text())
    return out


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


def tables(metrics: dict[str, dict]) -> str:
    groups = _groups()
    head = ["mIoU", "precision", "recall", "FP/TP", *[f"{k} IoU" for k in groups]]

    def table(title: str, rows: list[tuple[str, dict | None]]) -> list[str]:
        lines = [f"### {title}", "", "| row | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        lines += [f"| {name} | " + " | ".join(_cells(m, groups)) + " |" for name, m in rows]
        return lines + [""]

    out = table("Table 3: seed mIoU (train), each image's attention-derived background (CNN-only: 0.5), no CRF",
                [(n, metrics.get(f"t3_{k}")) for k, n in T3])
    out += table("Table 3, the same seeds at the fixed background 0.5 (one protocol for every row)",
                 [(n, metrics.get(f"t3_{k}_fixed")) for k, n in T3])
    out += table("Table 5: seeds of each source (train), attention-derived background, no CRF",
                 [(n, metrics.get("t3_cobra" if k == "fuse" else f"t5_seed_{k}")) for k, n in T5])
    out += table("Table 5: IRN masks trained on each source (train)", [(n, metrics.get(f"t5_irn_{k}")) for k, n in T5])
    out += table("Pipeline on M_fuse", [(n, metrics.get(k)) for k, n in PIPELINE])
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="labelwise run cobra-ablation output folders")
    args = p.parse_args(argv)
    sys.stdout.write(tables(collect(args.folders)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
