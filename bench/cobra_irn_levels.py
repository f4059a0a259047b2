"""Does IRN refine its seeds? The M_fuse seeds and IRN's walked maps scored at the same background levels.

    python bench/cobra_irn_levels.py runs/cobra-ablation [--stages irn_fuse irn_fuse_release] > levels.md

For a ``labelwise run cobra-ablation`` output: writes each IRN stage's walked maps of the train split
(``labelwise infer RUN --what seeds --seeds OUT/seeds_cobra``, into ``OUT/levels/<stage>``; resumed
when present), then scores them and the seeds they refine with ``evaluate semantic --bg-threshold L``
at each level L. The table is a diagnostic, not a choice: the recipe's rows keep the seeds at the cobra
preset's background and IRN's masks at the release's walk level 0.25. It also reports each IRN's
walk length and the median over images of the boundary map's 50 / 90 / 99th percentiles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from labelwise.engine import api
from labelwise.evaluation.api import evaluate

LEVELS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a cobra-ablation recipe output folder")
    ap.add_argument("--stages", nargs="+", default=["irn_fuse", "irn_fuse_release"])
    ap.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    args = ap.parse_args()
    spec = json.loads((args.out / ".stages" / "testbed.json").read_text())["outputs"]["spec"]
    seeds = args.out / "seeds_cobra"
    rows = {"M_fuse seeds": seeds}
    for stage in args.stages:
        walked = args.out / "levels" / stage
        api.infer(args.out / stage, spec, "train", walked, what="seeds", seeds=seeds, show_progress=False)
        rows[f"{stage}: walked maps"] = walked
    print("| maps | " + " | ".join(f"bg {lv:g}" for lv in args.levels) + " |")
    print("|---|" + "---:|" * len(args.levels))
    for name, folder in rows.items():
        vals = [evaluate("semantic", folder, spec, "train", bg_threshold=lv)["miou"] for lv in args.levels]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print()
    for stage in args.stages:
        files = sorted((args.out / "levels" / stage).glob("*.npz"))
        q = np.stack([np.load(f)["boundary_quantiles"] for f in files])
        steps = sorted({int(np.load(f)["walk_exp_times"]) for f in files})
        print(f"- {stage}: walk 2^{'/'.join(map(str, steps))} steps; boundary map p50 / p90 / p99 (median over images): "
              + " / ".join(f"{v:.3f}" for v in np.median(q, 0)))


if __name__ == "__main__":
    main()
