"""Where each SeCo ablation row's false positives fall: on background or on another class.

The confusion ratio of Table 2 / 3 is FP / TP over foreground classes; this splits FP into the
pixels whose ground truth is background (the object's mask spreads into its context) and those
whose ground truth is another object class (co-occurring classes confused). Computed from the
label PNGs a ``labelwise run seco-ablation`` wrote (Mask column on train, segmentation on val).

    python bench/seco_fp_split.py RUN_DIR [RUN_DIR ...]    # the recipe's --out folders
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seco_tables import ROW_NAMES, ROWS  # noqa: E402  (a sibling bench script)


def fp_split(pred_dir: Path, gt_dir: Path) -> tuple[float, float, int]:
    """(FP on background / TP, FP on another class / TP, images) over the PNGs of ``pred_dir``."""
    from labelwise.io import read_label

    tp = fp_bg = fp_cls = 0
    files = sorted(pred_dir.glob("*.png"))
    for f in files:
        p, g = read_label(f), read_label(gt_dir / f.name)
        fg = (p > 0) & (p != 255) & (g != 255)
        tp += int((fg & (p == g)).sum())
        fp_bg += int((fg & (g == 0)).sum())
        fp_cls += int((fg & (g > 0) & (p != g)).sum())
    return fp_bg / max(tp, 1), fp_cls / max(tp, 1), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="seco-ablation output folders (each holds testbed/ and pred_*)")
    args = ap.parse_args()
    print("| run | row | Mask (train): FP on bg / TP | Mask: FP on class / TP | seg (val): FP on bg / TP | "
          "seg: FP on class / TP |")
    print("|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        gt = run / "testbed" / "SegmentationClass"
        for row in ROWS:
            cells = []
            for split in ("train", "val"):
                d = run / f"pred_{row}_{split}"
                if not d.is_dir():
                    cells += ["-", "-"]
                    continue
                bg, cls, _ = fp_split(d, gt)
                cells += [f"{bg:.3f}", f"{cls:.3f}"]
            print(f"| `{run.name}` | {ROW_NAMES[row]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
