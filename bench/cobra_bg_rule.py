"""Choose CoBra's attention-derived background rule on a DEVELOPMENT testbed seed.

    python bench/cobra_bg_rule.py RUN --data voc:TESTBED --split train [--scales 1.0 1.5] [--json OUT.json]

CoBra's supplement (Secs. 9.1 / 11) derives a per-image background threshold from the ViT's
semantic-agnostic attention A_obj "by assigning a certain weight" to it, the weight "determined
similarly to conventional threshold-setting methods" -- i.e. searched. The release takes the
93rd percentile of the raw summed attention, a number found by a search against VOC train
ground truth. The paper leaves open the scale of the map (raw summed attention has no fixed
scale across ViT depth, token count and the number of passes) and the weight. This script
scores the candidate rules on one trained run's seeds:

* ``max q``: the q-quantile of A_obj / max(A_obj) (scale-free version of the release's rule);
* ``minmax q``: the q-quantile of (A_obj - min) / (max - min);
* ``fixed t``: the conventional constant, for reference.

Every rule is snapped to a 0.05 grid and clamped to [0.05, 0.95] (the release's snapping).
Scores: seed mIoU of M_fuse, M_cnn and M_tran thresholded with the rule, and the spread of the
per-image thresholds. It reads the ground truth of the split it is given, so it must only be
run on a development testbed seed that is never reported (the CoBra ablation's development
seed is 5; bench/cobra_ablation.md reports seeds 0 and 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from labelwise.blocks.cam import cam_to_label
from labelwise.data.spec import build_dataset
from labelwise.engine.api import load_run
from labelwise.evaluation import SemanticMetric
from labelwise.methods.cobra import losses as L
from labelwise.methods.cobra.method import seed_maps

QUANTILES = (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95)
FIXED = (0.2, 0.3, 0.4, 0.5, 0.6)


def rule_threshold(a: torch.Tensor, norm: str, q: float) -> float:
    """One image's threshold from its attention map ``a`` (H x W) under a candidate rule: the
    method's own :func:`attention_bg_threshold`, snapped to 0.05, clamped to [0.05, 0.95]."""
    return float(L.attention_bg_threshold(a[None], q, 0.05, 0.05, 0.95, norm)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a trained cobra run (both branches)")
    ap.add_argument("--data", required=True, help="the DEVELOPMENT testbed, e.g. voc:runs/dev/testbed/data")
    ap.add_argument("--split", default="train")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_run(args.run, device="cpu")
    ds = build_dataset(args.data, args.split)
    nc, names = loaded.info.num_classes, loaded.info.class_names
    rules = [("max", q) for q in QUANTILES] + [("minmax", q) for q in QUANTILES] + [("fixed", t) for t in FIXED]
    metrics = {(r, s): SemanticMetric(nc, names) for r in rules for s in ("fuse", "cnn", "vit")}
    thresholds = {r: [] for r in rules}
    for i in range(len(ds)):
        item = ds[i]
        x = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float().div(255)[None]
        maps = seed_maps(loaded.model, x, args.scales, True)
        keys = np.flatnonzero(np.asarray(item["tags"]) > 0) + 1
        gt = item["mask"]
        for r in rules:
            t = r[1] if r[0] == "fixed" else rule_threshold(maps["a_obj"][0, 0], r[0], r[1])
            thresholds[r].append(t)
            for s in ("fuse", "cnn", "vit"):
                cams = L.fuse_seeds(maps["cnn"], maps["vit"], s)[0, torch.as_tensor(keys - 1)]
                pred = cam_to_label(cams, keys=torch.as_tensor(keys), bg_threshold=t).numpy().astype(np.uint8)
                metrics[(r, s)].update(pred, gt)
    rows = []
    for r in rules:
        t = np.asarray(thresholds[r])
        rows.append({"rule": f"{r[0]} {r[1]}", **{s: round(float(metrics[(r, s)].compute()["miou"]), 4)
                                                  for s in ("fuse", "cnn", "vit")},
                     "t_min": float(t.min()), "t_median": float(np.median(t)), "t_max": float(t.max())})
    print("| rule | M_fuse | M_cnn | M_tran | threshold min / median / max |\n|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['rule']} | {row['fuse']:.3f} | {row['cnn']:.3f} | {row['vit']:.3f} | "
              f"{row['t_min']:.2f} / {row['t_median']:.2f} / {row['t_max']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
