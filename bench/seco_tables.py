"""SeCo's Table 2 and Table 3 analogues from one or more ``labelwise run seco-ablation`` outputs.

    python bench/seco_tables.py runs/abl-seed0/table.json runs/abl-seed1/table.json > tables.md

Each ``table.json`` is one replicate (one testbed seed). Table 2: per ablation row, the paper's
columns: CAM mIoU and Mask mIoU on train (the release's ``infer_cam.py`` protocol, SeCo's infer
defaults), segmentation mIoU, precision, recall and confusion ratio (FP/TP) on val, as the mean
over replicates with every replicate's value beside it. Table 3: IoU and confusion ratio of the
co-occurring classes of the ``cooc`` testbed against its control groups, per row, on the val
segmentation (the paper's split) and on the train CAM and Mask (where co-occurrence enters).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

ROWS = ["baseline", "wo_lig", "wo_lil", "wo_rec", "seco"]
ROW_NAMES = {"baseline": "Baseline", "wo_lig": "w/o LiG", "wo_lil": "w/o LiL", "wo_rec": "w/o Tag Rec.",
             "seco": "SeCo"}


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ({' / '.join(f'{v:.3f}' for v in vals)})"


def tables(runs: list[list[dict]]) -> str:
    from labelwise.stages import load_recipe
    from labelwise.stages.table import group_means

    # synth cooc: the recipe's co-occurring pairs (70% of their images) and controls (10%)
    groups = load_recipe("seco-ablation").table_groups
    by_stage = [{r["stage"]: r for r in run} for run in runs]
    out = ["Table 2 analogue: mean over replicates (each replicate in brackets).", "",
           "| row | CAM mIoU (train) | Mask mIoU (train) | seg mIoU (val) | precision (val) | recall (val) "
           "| confusion ratio (val) |",
           "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        cells = []
        for stage, key in ((f"seeds_{row}", "miou"), (f"masks_{row}", "miou"), (f"seg_{row}", "miou"),
                           (f"seg_{row}", "precision"), (f"seg_{row}", "recall"), (f"seg_{row}", "confusion_ratio")):
            cells.append(_fmt([s[stage][key] if stage in s else None for s in by_stage]))
        out.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    for prefix, what in (("seg", "segmentation (val)"), ("seeds", "CAM (train)"), ("masks", "Mask (train)")):
        names = " and ".join(f"{g} ({', '.join(c)})" for g, c in groups.items())
        out += ["", f"Table 3 analogue, {what}: mean IoU and mean confusion ratio (FP/TP) of {names}.", "",
                "| row | " + " | ".join(f"{g} IoU | {g} FP/TP" for g in groups) + " |",
                "|---|" + "---|---|" * len(groups)]
        for row in ROWS:
            stage = f"{prefix}_{row}"
            means = [[group_means(s[stage], c) if stage in s else (None, None) for s in by_stage]
                     for c in groups.values()]
            cells = [_fmt([m[i] for m in g]) for g in means for i in (0, 1)]
            out.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="+", metavar="TABLE_JSON", help="table.json of labelwise run seco-ablation")
    args = p.parse_args(argv)
    runs = []
    for path in args.tables:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"seco_tables: {path}: {e}; pass the table.json of a finished labelwise run seco-ablation",
                  file=sys.stderr)
            return 2
    sys.stdout.write(tables(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
