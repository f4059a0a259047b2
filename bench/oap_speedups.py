"""OAP's exact speed-ups one by one, and batching, on the same images (CPU, threads pinned).

    python bench/oap_speedups.py [--threads 1] [--grid 56] [--out bench/oap_speedups.md]

Same features as ``labelwise bench oap`` (objects testbed, seed 0, 224 px images, EfficientNet-Lite0
at the native grid), 3 images, one warm-up call, 3 timed passes; median [min-max] ms per image.
Rows: ``affinity=dense`` (one product), ``symmetric`` (upper triangle, BLAS ``syrk``), ``sparse`` (ReLU
keys split by channel: ``syrk`` of the channels most tokens use + a sparse x sparse product of the rest,
centring put back exactly) — all with identical masks (checked here too) — and the default config at
batch 1 vs all 3 images in one call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from labelwise.benchmarks.oap import pinned_threads
from labelwise.data.synth import generate
from labelwise.io import atomic_write_text, list_images, read_image
from labelwise.pseudo.common import FeatureExtractor
from labelwise.pseudo.oap import OnlineAgglomerativePooling


def _time(fn, items, passes=3):
    fn(items[0])
    t = []
    for _ in range(passes):
        for it in items:
            t0 = time.perf_counter()
            fn(it)
            t.append((time.perf_counter() - t0) * 1000 / it.shape[0])
    return statistics.median(t), min(t), max(t)


def _masks(res):
    return [sorted(tuple(m.reshape(-1).nonzero().squeeze(1).tolist()) for m in r.level(lv).masks)
            for r in res for lv in ("instance", "semantic")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=int, default=56)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("LABELWISE_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "objects"
        generate("objects", root, n_train=1, n_val=3, size=224, seed=0)
        imgs = [read_image(p) for p in list_images(root / "images" / "val")]
        keys = FeatureExtractor("efficientnet_lite0", None, args.grid * 32, "cpu")(imgs)
    rows, ref = [], None
    with pinned_threads(args.threads):
        for mode in ("dense", "symmetric", "sparse"):
            oap = OnlineAgglomerativePooling(center_features=True, affinity=mode)
            med, lo, hi = _time(oap, [keys[i:i + 1] for i in range(3)])
            m = _masks(oap(keys))
            ref = ref or m
            rows.append((f"affinity={mode}, batch 1", med, lo, hi, m == ref))
        oap = OnlineAgglomerativePooling(center_features=True)
        med, lo, hi = _time(oap, [keys])
        rows.append(("default (auto), batch 3", med, lo, hi, _masks(oap(keys)) == ref))
    lines = [f"OAP at {args.grid}x{args.grid}, {args.threads} thread(s), ms per image, median [min-max] "
             "(3 images x 3 passes)", "", "| variant | ms / image | same masks |", "|---|---:|---|"]
    lines += [f"| {r[0]} | {r[1]:.0f} [{r[2]:.0f}-{r[3]:.0f}] | {'yes' if r[4] else 'NO'} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
