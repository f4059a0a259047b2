"""How fast can an exact OAP be on one CPU thread? The work no exact implementation of Algorithm 1 can skip,
timed on the inputs of ``labelwise bench oap``, against the time budget that a ratio target to released
MaskCut leaves (MaskCut's time from a ``labelwise bench oap --json`` result of the same machine).

    python bench/oap_speed_floor.py --bench-json bench/oap_results.json [--keys-cache /tmp/oap_keys.pt]
                                    [--grids 28,56] [--images 3] [--passes 5] [--md OUT.md] [--json OUT.json]

Inputs: the keys of ``bench/oap_layer_profile.py`` (the bench's smooth and rough content, same seed, same
noise draws) and the bench's OAP settings. Per content and grid, one thread (torch and BLAS pinned), median
over ``--images`` x ``--passes`` calls after one warm-up:

* ``OAP``: the whole call (``OnlineAgglomerativePooling``), as the bench times it.
* ``A``: the affinity ``A = F Fᵀ`` as OAP's ``forward`` forms it (``prepare`` into memory kept between
  calls; the mode ``auto`` picks: the channel split for ReLU keys, else ``syrk``). Layer 0 needs
  ``S^s`` of the grid edges the exact bounds leave open and, for the next layer, a profile row ``M_i A``
  of every supernode; ``A from its rows`` says how many of ``A``'s rows that is (``rows needed``: the
  endpoints of open edges that cross the components of the sure edges, plus every supernode left single
  after layer 0) — when it is most of them, ``A`` itself is the cheapest way to get them.
* ``Eq. 6 votes``: ``softmax(M_i A / σ) F`` for every supernode left after layer 0 — one
  ``(supernodes x N) @ (N x D)`` product. Every supernode needs its vote when the next layer's edges
  and semantic pairs cannot be decided without ``S^f``: ``undecided without S^f`` = the share of layer-1
  adjacency edges whose ``S^s`` alone (exact, from ``A``) leaves ``w_f S^f + w_s S^s > τ_1`` possible.
* ``fixed cost``: OAP on a 4 x 4 grid of the same key width (every step runs, on almost no data):
  the per-call cost of the 5 layers x 2 levels of tensor operations.

``floor`` = the sum of the parts that apply; ``best ratio`` = MaskCut / floor, the most any exact
implementation with these products could reach here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = {28: 30.0, 56: 100.0}          # issue 25's ratios to released MaskCut, 1 thread


def _layer0(oap, keys: torch.Tensor):
    """Layer 0 of Algorithm 1 the plain way (from ``A``): the supernodes, the rows the bounds need, and the
    layer-1 edges that ``S^s`` alone cannot decide."""
    from labelwise.pseudo.oap.graph import connected_components
    from labelwise.pseudo.oap.pooling import _SLACK, grid_edges

    c = oap.cfg
    K, A = oap.prepare(keys)
    F, A = K.F[0], A[0]
    N, D = F.shape
    h, w = keys.shape[1], keys.shape[2]
    e = grid_edges(h, w, 1)
    u, v = e[0], e[1]
    sf = A[u, v]
    diag = A.diagonal()
    tau = c.thresholds[0]
    cand = c.w_f * sf + c.w_s > tau
    eps = 4.0 * D * torch.finfo(F.dtype).eps + 1e-6
    d2 = (diag[u] + diag[v] - 2 * sf).clamp(min=0) + eps
    sure = cand & (c.w_f * sf + c.w_s * (1 - d2.sqrt()) > tau + _SLACK)
    open_ = cand & ~sure
    lab = connected_components(N, e[:, sure], "scipy")
    cross = open_ & (lab[u] != lab[v])
    ss = 1 - (A[u] - A[v]).abs().sum(-1) / N
    contract = c.w_f * sf + c.w_s * ss > tau
    lab = connected_components(N, e[:, contract], "scipy")
    _, om, cnt = torch.unique(lab, return_inverse=True, return_counts=True)
    single = cnt[om] == 1
    rows = torch.zeros(N, dtype=torch.bool)
    rows[u[cross]] = True
    rows[v[cross]] = True
    rows |= single
    # layer 1: edges between distinct supernodes; S^s from the supernodes' mean profile rows
    S = int(cnt.numel())
    P = torch.zeros(S, N).index_add_(0, om, A) / cnt[:, None].float()
    a, b = om[u], om[v]
    keep = a != b
    key = torch.unique(torch.minimum(a[keep], b[keep]) * S + torch.maximum(a[keep], b[keep]))
    a1, b1 = key // S, key % S
    ss1 = 1 - (P[a1] - P[b1]).abs().sum(-1) / N
    tau1 = c.thresholds[1] if len(c.thresholds) > 1 else tau
    undecided = c.w_f * 1.0 + c.w_s * ss1 > tau1
    return {"supernodes": S, "rows_needed": int(rows.sum()), "tokens": N,
            "undecided_frac": float(undecided.float().mean()) if undecided.numel() else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-json", required=True, help="a `labelwise bench oap --json` result (MaskCut's times)")
    ap.add_argument("--keys-cache", default=None, help="cache of the bench's keys (bench/oap_layer_profile.py)")
    ap.add_argument("--grids", default="28,56")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import oap_layer_profile as olp
    from oap_speedups import _time                 # warm-up, then passes: median, min, max ms per image
    from labelwise.benchmarks.oap import DEFAULT_MIN_AREA_FRAC, pinned_threads
    from labelwise.pseudo.oap.pooling import vote_weights, weighted_keys

    try:
        bench = json.loads(Path(args.bench_json).read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--bench-json {args.bench_json}: not a readable `labelwise bench oap --json` result ({e})")
    try:
        grids = [int(g) for g in args.grids.split(",")]
    except ValueError:
        ap.error(f"--grids {args.grids}: give comma-separated integers such as 28,56")
    pargs = argparse.Namespace(grids=grids, train=24, val=24, seed=0, rough_noise=1.0, images=args.images)
    cache = Path(args.keys_cache) if args.keys_cache else None
    if cache is not None and cache.exists():
        keys = torch.load(cache)
    else:
        keys = olp.build_keys(pargs)
        if cache is not None:
            torch.save(keys, cache)
    oap = olp.build_oap(DEFAULT_MIN_AREA_FRAC)
    res = {}
    with pinned_threads(1):
        for content in ("smooth", "rough"):
            for g in grids:
                if (content, g) not in keys:
                    continue
                items = [keys[content, g][i:i + 1] for i in range(min(args.images, keys[content, g].shape[0]))]
                D = items[0].shape[-1]
                flat = f"ms_per_image_{g}_t1" if content == "smooth" else f"ms_per_image_{content}_{g}_t1"
                maskcut = bench.get("maskcut", {}).get(flat)
                l0 = [_layer0(oap, it) for it in items]
                S = round(statistics.mean(r["supernodes"] for r in l0))
                total = _time(lambda it: oap(it), items, args.passes)
                N = g * g
                buf = torch.empty(1, N, N)                     # as forward: A's memory kept between calls
                a_ms = _time(lambda it: oap.prepare(it, out=buf), items, args.passes)
                K, A = oap.prepare(items[0])
                Pr = A[0, :S]
                size = torch.ones(S)
                img = torch.zeros(S, dtype=torch.long)
                votes = _time(lambda _: weighted_keys(vote_weights(Pr, size, oap.cfg.sigma), K, img),
                                   items, args.passes)
                tiny = torch.relu(torch.randn(1, 4, 4, D, generator=torch.Generator().manual_seed(0)))
                fixed = _time(lambda it: oap(it), [tiny], args.passes * len(items))
                need_votes = statistics.mean(r["undecided_frac"] for r in l0)
                floor = a_ms[0] + fixed[0] + (votes[0] if need_votes > 0.5 else 0.0)
                res[f"{content}_{g}"] = {
                    "maskcut_ms": maskcut, "target": TARGET.get(g),
                    "budget_ms": maskcut / TARGET[g] if maskcut and g in TARGET else None,
                    "oap_ms": total[0], "oap_range": total[1:], "a_ms": a_ms[0], "votes_ms": votes[0],
                    "fixed_ms": fixed[0], "supernodes_after_layer0": S,
                    "rows_needed_frac": statistics.mean(r["rows_needed"] / r["tokens"] for r in l0),
                    "undecided_without_sf": need_votes, "floor_ms": floor,
                    "best_ratio": maskcut / floor if maskcut else None,
                    "ratio_now": maskcut / total[0] if maskcut else None}
    out = {"threads": 1, "results": res, "bench_json": args.bench_json}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    lines = ["What an exact OAP cannot skip, 1 thread, ms per image (median over "
             f"{args.images} images x {args.passes} passes; `python bench/oap_speed_floor.py --bench-json "
             f"{args.bench_json}`). MaskCut = released dense `eigh`, no CRF, from that bench run.", "",
             "| case | MaskCut | budget (target) | OAP now | ratio now | A | rows of A needed | supernodes after "
             "layer 0 | Eq. 6 votes | layer-1 edges undecided without S^f | fixed cost | floor | best ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in res.items():
        def f(x, d=1):
            return "-" if x is None else f"{x:.{d}f}"
        target = "" if r["target"] is None else f" (x{r['target']:.0f})"
        lines.append(f"| {k.replace('_', ' ')}² | {f(r['maskcut_ms'], 0)} | {f(r['budget_ms'])}{target} | "
                     f"{f(r['oap_ms'])} | {f(r['ratio_now'])}x | {f(r['a_ms'])} | "
                     f"{100 * r['rows_needed_frac']:.0f} % | "
                     f"{r['supernodes_after_layer0']} | {f(r['votes_ms'])} | {100 * r['undecided_without_sf']:.0f} % | "
                     f"{f(r['fixed_ms'])} | {f(r['floor_ms'])} | {f(r['best_ratio'])}x |")
    lines += ["", "floor = A + fixed cost (+ Eq. 6 votes where most layer-1 edges need S^f)."]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
