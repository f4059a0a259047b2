"""Where OAP's time goes: wall time per OAP layer and per part, on the inputs of ``labelwise bench oap``.

    python bench/oap_layer_profile.py [--grids 28,56] [--content smooth,rough] [--threads 1]
                                      [--images 3] [--passes 3] [--keys-cache /tmp/oap_keys.pt]
                                      [--md OUT.md] [--json OUT.json]

Inputs: the same keys as ``labelwise bench oap`` (objects testbed, seed 0, ``--train 24 --val 24``,
224 px images, EfficientNet-Lite0 at the native grid, the first ``--images`` val images; ``rough`` =
+ Gaussian noise of ``--rough-noise`` x the RMS of the centred features, drawn in the bench's order)
and the bench's OAP settings (``labelwise pseudo-masks oap`` defaults + ``min_area_frac``).

Per content and grid: one warm-up call, then ``--passes`` passes over the images with profiling off
(``total``: median [min-max] ms per image — what the bench times), then the same passes with
``OnlineAgglomerativePooling.profile`` on: every part's wall time per call (``Laps``), median over
the calls. Parts: ``affinity`` (F and A = F Fᵀ), per layer and level (instance / semantic) ``S^f``
(Eq. 2, semantic: all pairs), ``setup`` (the compact path's per-forward state), ``S^s bound`` (exact pruning before Eq. 3), ``S^s`` (Eq. 3 on the
pairs left, Eq. 4), ``components``, ``merge`` (sizes, maps), ``edges`` (Eq. 5), ``profiles``,
``votes`` (Eq. 6), ``stats`` (score terms), and ``finalise`` (dedup, scores, masks). Threads are
pinned (torch and every BLAS / OpenMP pool) with ``labelwise.benchmarks.oap.pinned_threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PARTS = ("S^f", "S^s bound", "S^s", "components", "merge", "edges", "profiles", "votes", "stats")


def build_keys(args) -> dict[tuple[str, int], torch.Tensor]:
    """``{(content, grid): keys (n, g, g, D)}`` exactly as ``labelwise bench oap`` builds them."""
    from labelwise.benchmarks import oap as bo
    from labelwise.io import read_image
    from labelwise.pseudo.common import FeatureExtractor

    p = argparse.ArgumentParser()
    bo.add_arguments(p)
    bargs = p.parse_args(["--train", str(args.train), "--val", str(args.val), "--seed", str(args.seed),
                          "--rough-noise", str(args.rough_noise)])
    with tempfile.TemporaryDirectory() as tmp:
        _, _, images, _ = bo._dataset(bargs, Path(tmp))
        arrays = [read_image(im["path"]) for im in images[:args.images]]
        fe = FeatureExtractor(bargs.backbone, bargs.weights, 256, "cpu")
        stride = bo._native_stride(fe)
        keys = {}
        with bo.pinned_threads(bo.num_cores()):
            for g in sorted(args.grids):
                fe.resolution = g * stride
                keys[g] = torch.cat([fe([a]).cpu() for a in arrays])
    gen = torch.Generator().manual_seed(args.seed)             # the bench draws the noise grid by grid
    out = {}
    for g in sorted(args.grids):
        for c in ("smooth", "rough"):
            out[c, g] = keys[g] if c == "smooth" else bo.add_noise(keys[g], args.rough_noise, gen)
    return out


def build_oap(min_area_frac: float):
    from labelwise.pseudo.common import resolve_pseudo_config
    from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling

    cfg = resolve_pseudo_config("oap", [], {"features": {"backbone": "efficientnet_lite0"},
                                            "oap": {"min_area_frac": float(min_area_frac)}})
    return OnlineAgglomerativePooling(cfg.oap)


def profile_case(oap, keys: torch.Tensor, passes: int) -> dict:
    items = [keys[i:i + 1] for i in range(keys.shape[0])]
    oap(items[0])                                                  # warm-up
    total, parts, nodes = [], [], []
    for _ in range(passes):
        for it in items:
            t0 = time.perf_counter()
            oap(it)
            total.append(1000.0 * (time.perf_counter() - t0))
            nodes.append((oap.last_stats["instance_nodes"], oap.last_stats["semantic_nodes"]))
    for _ in range(passes):
        for it in items:
            oap.profile = {}
            t0 = time.perf_counter()
            oap(it)
            wall = time.perf_counter() - t0
            prof, oap.profile = oap.profile, None
            prof[("-", "-", "(untracked)")] = wall - sum(prof.values())
            parts.append(prof)
    keys_all = sorted({k for p in parts for k in p}, key=str)
    med = {k: 1000.0 * statistics.median(p.get(k, 0.0) for p in parts) for k in keys_all}
    T = len(nodes[0][0])
    return {"total_ms": {"median": statistics.median(total), "min": min(total), "max": max(total)},
            "profiled_ms": 1000.0 * statistics.median(sum(p.values()) for p in parts),
            "parts_ms": {"|".join(map(str, k)): v for k, v in med.items()},
            "instance_nodes": [statistics.mean(n[0][t] for n in nodes) for t in range(T)],
            "semantic_nodes": [statistics.mean(n[1][t] for n in nodes) for t in range(T)],
            "calls": len(total)}


def _f(v: float) -> str:
    return "" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def markdown(res: dict, threads: int) -> str:
    lines = ["Where OAP's time goes, per layer and part (`python bench/oap_layer_profile.py`; the inputs and OAP "
             "settings of `labelwise bench oap`, batch 1). A part's time runs from the previous part's end; "
             "`(untracked)` = wall time outside the parts.", ""]
    for case, r in res.items():
        T = len(r["instance_nodes"])
        pm = {tuple(k.split("|")): v for k, v in r["parts_ms"].items()}
        tot = r["total_ms"]
        lines += [f"### {case}: {_f(tot['median'])} ms per image [{_f(tot['min'])}-{_f(tot['max'])}] "
                  f"({threads} thread(s), {r['calls']} calls, profiling off); parts: median ms per call, profiling on "
                  f"(sum {_f(r['profiled_ms'])})", "",
                  "| level | part | " + " | ".join(f"layer {t}" for t in range(T)) + " | all layers |",
                  "|---|---|" + "---:|" * (T + 1)]
        lines.append("| | nodes after the layer (instance / semantic) | " + " | ".join(
            f"{r['instance_nodes'][t]:.0f} / {r['semantic_nodes'][t]:.0f}" for t in range(T)) + " | |")
        for k in ("affinity", "setup", "(untracked)"):
            if ("-", "-", k) in pm:
                lines.append(f"| | {k} | " + " | " * T + f"{_f(pm['-', '-', k])} |")
        for level in ("instance", "semantic"):
            rows = [p for p in PARTS if any((level, str(t), p) in pm for t in range(T))]
            level_sum = [0.0] * T
            for p in rows:
                vals = [pm.get((level, str(t), p), 0.0) for t in range(T)]
                level_sum = [a + b for a, b in zip(level_sum, vals)]
                lines.append(f"| {level} | {p} | " + " | ".join(_f(v) for v in vals) + f" | {_f(sum(vals))} |")
            lines.append(f"| {level} | **sum of the layers** | " + " | ".join(f"**{_f(v)}**" for v in level_sum)
                         + f" | **{_f(sum(level_sum))}** |")
            for p, name in (("votes", "votes, all layers in one call after the loop"), ("finalise", "finalise")):
                if (level, "-", p) in pm:
                    lines.append(f"| {level} | {name} | " + " | " * T + f"{_f(pm[level, '-', p])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--grids", default="28,56", help="token grids (default 28,56)")
    ap.add_argument("--content", default="smooth,rough", help="content cases: smooth, rough (default both)")
    ap.add_argument("--threads", type=int, default=1, help="torch + BLAS threads (default 1)")
    ap.add_argument("--images", type=int, default=3, help="val images (default 3, as the bench)")
    ap.add_argument("--passes", type=int, default=3, help="passes over the images, each mode (default 3)")
    ap.add_argument("--train", type=int, default=24, help="testbed train images (default 24, as bench/README)")
    ap.add_argument("--val", type=int, default=24, help="testbed val images (default 24, as bench/README)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rough-noise", type=float, default=1.0, help="rough noise / RMS (default 1.0 = 0 dB)")
    ap.add_argument("--min-area-frac", type=float, default=5 / 784, help="OAP phi as a fraction (default 5/784)")
    ap.add_argument("--keys-cache", default=None, metavar="PATH",
                    help="load the keys from PATH if it exists, else build and save them there")
    ap.add_argument("--md", default=None, help="also write the markdown tables here")
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    args = ap.parse_args(argv)
    args.grids = [int(g) for g in str(args.grids).split(",") if g.strip()]
    contents = [c.strip() for c in str(args.content).split(",") if c.strip()]
    os.environ.setdefault("LABELWISE_NO_PROGRESS", "1")
    from labelwise.benchmarks.oap import pinned_threads

    cache = Path(args.keys_cache) if args.keys_cache else None
    if cache is not None and cache.exists():
        keys = torch.load(cache)
    else:
        keys = build_keys(args)
        if cache is not None:
            torch.save(keys, cache)
    oap = build_oap(args.min_area_frac)
    res = {}
    with pinned_threads(args.threads):
        for c in contents:
            for g in args.grids:
                res[f"{c} {g}x{g}"] = profile_case(oap, keys[c, g][:args.images], args.passes)
                print(f"[oap profile] {c} {g}x{g}: {res[f'{c} {g}x{g}']['total_ms']['median']:.1f} ms",
                      file=sys.stderr, flush=True)
    md = markdown(res, args.threads)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "cases": res}, indent=1))


if __name__ == "__main__":
    main()
