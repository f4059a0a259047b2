"""Choose OAP's mask scoring rule and NMS on the `objects` *train* split (never val).

    python bench/oap_score_selection.py [--train 24] [--grid 28] [--out bench/oap_score_selection.md]

Generates the testbed (seed 0, 224 px) in a temporary folder, extracts EfficientNet-Lite0
features once at the native 28x28 grid (896 px input), runs OAP (instance masks, phi = 5/784 of
the grid) with every scoring rule and NMS threshold, and scores class-agnostic mask AP50 / AP /
AR100 against the train split's thing instances. Prints (and writes) a markdown table; the row
with the best AP50 (then AP) is the default in ``OAPConfig``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

import torch

from labelwise.benchmarks.oap import pinned_threads
from labelwise.data.synth import generate
from labelwise.evaluation import evaluate
from labelwise.io import atomic_write_text, list_images, read_image
from labelwise.pseudo.common import (
    FeatureExtractor,
    build_method,
    mask_records,
    resolve_pseudo_config,
    upsample_masks,
)
from labelwise.pseudo.oap.pooling import SCORES
from labelwise.pseudo.runner import _subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=24, help="generated train images (default 24)")
    ap.add_argument("--grid", type=int, default=28, help="native token grid (default 28 = 896 px input)")
    ap.add_argument("--nms", default="1.0,0.7,0.5", help="NMS IoU thresholds to try")
    ap.add_argument("--threads", type=int, default=2, help="torch and BLAS threads")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args()
    os.environ.setdefault("LABELWISE_NO_PROGRESS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, pinned_threads(args.threads):
        root = Path(tmp) / "objects"
        generate("objects", root, n_train=args.train, n_val=1, size=224, seed=0)
        files = list_images(root / "images" / "train")
        imgs = [read_image(p) for p in files]
        fe = FeatureExtractor("efficientnet_lite0", None, args.grid * 32, "cpu")
        keys = torch.cat([fe(imgs[i:i + 4]) for i in range(0, len(imgs), 4)])
        for score, nms in itertools.product(SCORES, [float(v) for v in args.nms.split(",")]):
            cfg = resolve_pseudo_config("oap", [f"oap.score={score}", f"oap.nms_iou={nms}",
                                                f"oap.min_area_frac={5 / 784}"],
                                        {"features": {"backbone": "efficientnet_lite0"}})
            run = build_method("oap", cfg)
            out = []
            for i, (f, img) in enumerate(zip(files, imgs)):
                pm = run(keys[i:i + 1])[0]
                sub = _subset(pm, [k for k, lv in enumerate(pm.levels) if lv == "instance"])
                for r in mask_records(sub, upsample_masks(sub.masks, img.shape[:2])):
                    r.pop("embedding")
                    out.append({"image_id": i + 1, "file_name": f.name, **r})
            pred = Path(tmp) / "pred.json"
            pred.write_text(json.dumps(out))
            ev = evaluate("instance", str(pred), f"coco:{root}", "train")
            rows.append((score, nms, ev["ap50"], ev["ap"], ev["ar100"], len(out) / len(imgs)))
            print(f"{score:22s} nms {nms}: AP50 {ev['ap50']:.3f} AP {ev['ap']:.3f} AR100 {ev['ar100']:.3f}", flush=True)
    best = max(rows, key=lambda r: (round(r[2], 3), round(r[3], 3)))
    lines = [f"OAP scoring rule on the objects train split ({args.train} images, {args.grid}x{args.grid} tokens, "
             "EfficientNet-Lite0, phi = 5/784 of the grid)", "",
             "| score | NMS IoU | AP50 | AP | AR100 | masks / image |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "**" if r is best else ""
        lines.append(f"| {mark}{r[0]}{mark} | {r[1]:g} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
