"""Where each ground-truth part's pixels go, per run: to the part itself, to a sibling (another part
of the same object), to a part of another object, or to background -- the measurement behind any
change of part mIoU between CoCal's Table 2 rows (e.g. Eq. 7 pulling sibling parts together).

    python bench/cocal_sibling_confusion.py --data parts:runs/cocal-ablation/testbed --split val \\
        kMaX=runs/cocal-ablation/kmax_pred dict=runs/cocal-ablation/dict_pred ... [--out PREFIX]

Each NAME=PRED is a ``labelwise infer --what parts`` folder. Prints, per run, the four rates
averaged over the foreground parts, then per object the row-normalised confusion among its parts
(rows: ground truth, columns: prediction; "other" = background or another object's part).
``PREFIX.md`` / ``PREFIX.json`` with ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rates(conf: np.ndarray, p2o: np.ndarray) -> dict[str, float]:
    """Mean over foreground parts with ground-truth pixels of the share of their pixels predicted
    as the part itself, a sibling, another object's part (or no part class) and background."""
    n = conf.shape[0]  # conf: (P, P + 1), the last column = predictions outside the part classes
    own = np.zeros_like(conf, dtype=bool)
    own[:, :n] = np.eye(n, dtype=bool)
    same_obj = np.zeros_like(own)
    same_obj[:, :n] = p2o[:, None] == p2o[None, :]
    bg = np.zeros_like(own)
    bg[:, 0] = True
    masks = {"own": own, "sibling": same_obj & ~own & ~bg, "other object": ~same_obj & ~bg, "background": bg}
    gt = conf.sum(1)
    keep = (gt > 0) & (p2o > 0)
    keep[0] = False
    return {k: float(((conf * m).sum(1) / np.maximum(gt, 1))[keep].mean()) if keep.any() else float("nan")
            for k, m in masks.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=PRED", help="a name and a --what parts prediction folder")
    p.add_argument("--data", required=True, help="the parts dataset the predictions are of (FORMAT:PATH)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args()

    from labelwise.data import build_dataset
    from labelwise.evaluation import evaluate

    ds = build_dataset(args.data, args.split)
    parts, objects = list(ds.part_names), list(ds.class_names)
    p2o = np.asarray(ds.part_to_object)
    lines, result = [], {}
    for spec in args.runs:
        if "=" not in spec:
            raise SystemExit(f"cocal_sibling_confusion: '{spec}' is not NAME=PRED_DIR")
        name, pred = spec.split("=", 1)
        r = evaluate("parts", Path(pred), args.data, args.split, progress=False)
        conf = np.asarray(r["part_confusion"], dtype=np.float64)
        rr = rates(conf, p2o)
        result[name] = {"part_miou": r["part_miou"], "part_mavg": r["part_mavg"], "rates": rr,
                        "per_part_sibling_confusion": r["per_part_sibling_confusion"]}
        lines += [f"## {name}", "",
                  f"part mIoU {r['part_miou']:.3f}, mAvg {r['part_mavg']:.3f}; share of a ground-truth part's "
                  "pixels predicted as (mean over foreground parts):", "",
                  "| own part | sibling part | another object's part | background |", "|---|---|---|---|",
                  "| " + " | ".join(f"{rr[k]:.3f}" for k in ("own", "sibling", "other object", "background")) + " |",
                  ""]
        for o in range(1, len(objects)):
            idx = [i for i in range(1, len(parts)) if p2o[i] == o]
            rows = [i for i in idx if conf[i].sum() > 0]
            if len(idx) < 2 or not rows:
                continue
            lines += [f"{objects[o]} (rows: ground truth, columns: prediction):", "",
                      "| | " + " | ".join(parts[j] for j in idx) + " | other |", "|---|" + "---|" * (len(idx) + 1)]
            for i in rows:
                share = conf[i] / conf[i].sum()
                lines.append(f"| {parts[i]} | " + " | ".join(f"{share[j]:.2f}" for j in idx)
                             + f" | {1 - share[idx].sum():.2f} |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
