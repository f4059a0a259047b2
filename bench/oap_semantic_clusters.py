"""How the semantic clusters of `labelwise run oap` runs use their K codes (a diagnostic, not a metric).

    python bench/oap_semantic_clusters.py runs/oap-s0 runs/oap-s1

For each run: the raw pseudo-mask clusters of the initial teacher (k-means, K = model.out_dim), the trained
model's clusters (argmax of the DINO codes; final teacher and student) and the control's: the Hungarian mIoU
of the protocol, the clusters that hold any val pixel, and the share of val pixels in the largest cluster.
A collapse of the online clustering onto few codes shows as few used clusters and one large share; with a
one-to-one Hungarian mapping, at most as many classes as used clusters can score.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROWS = (("(a) raw pseudo-masks, initial teacher", "raw/pseudo_clusters"),
        ("(b) trained model, teacher", "trained/clusters"),
        ("(b) trained model, student", "trained_student/clusters"),
        ("(d) control, teacher", "control_pred/clusters"))


def cluster_usage(run: Path, sub: str) -> dict:
    from labelwise.evaluation.api import run_evaluation

    res, metric = run_evaluation("unsupervised", str(run / sub), f"coco:{run / 'testbed'}", "val")
    pixels = metric.confusion.sum(1).double()
    used = pixels > 0
    return {"miou": float(res["miou"]), "clusters_used": int(used.sum()),
            "largest_share": float(pixels.max() / pixels.sum()) if pixels.numel() else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="output folders of `labelwise run oap`")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("LABELWISE_NO_PROGRESS", "1")
    out: dict = {}
    print("| run | clusters | Hungarian mIoU | clusters used | largest cluster's pixel share |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        for label, sub in ROWS:
            if not (run / sub).is_dir():
                continue
            r = cluster_usage(run, sub)
            out.setdefault(run.name, {})[label] = r
            print(f"| {run.name} | {label} | {r['miou']:.3f} | {r['clusters_used']} | {r['largest_share']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
