"""``labelwise bench {oap,oap-train,train,infer,crf,seco,cobra,cocal} [...] [--json OUT.json]``: speed/quality benchmarks.

Each benchmark is a module ``labelwise.benchmarks.<name>`` (``-`` in the name is ``_``) with ``add_arguments(parser)``
and ``run(args) -> dict`` returning ``{"<variant>": {"ms_per_image": float, ...}, ...}``.
This command prints the result as a table (one row per variant) and writes it as JSON.
"""

from __future__ import annotations

import importlib
import math

from labelwise.errors import LabelwiseError

BENCHMARKS = {
    "oap": "OAP vs MaskCut / TokenCut pseudo-mask speed and quality",
    "oap-train": "OAP online training: step time, memory and the share of the step in OAP, vs the cam baseline",
    "train": "training step speed",
    "infer": "inference speed",
    "crf": "dense CRF speed",
    "seco": "SeCo training step time and memory vs its baseline row and the cam baseline",
    "cobra": "step time and memory of every CoBra pipeline stage (cobra, irn, segmenter) vs the cam baseline",
    "cocal": "CoCal and kMaX-DeepLab training step time and memory vs the cam baseline",
}


def register(subparsers, name: str, help: str) -> None:
    from labelwise.cli.common import add_progress

    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(p))
    for bench, text in BENCHMARKS.items():
        bp = sub.add_parser(bench, help=text, description=text)
        bp.add_argument("--json", default=None, metavar="OUT.json", help="write the result object here")
        add_progress(bp)
        try:
            mod = importlib.import_module(f"labelwise.benchmarks.{bench.replace('-', '_')}")
        except ImportError:
            mod = None
        if mod is None or not hasattr(mod, "add_arguments") or not hasattr(mod, "run"):
            bp.set_defaults(func=_missing(bench))
            continue
        mod.add_arguments(bp)
        bp.set_defaults(func=_runner(mod))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _missing(bench: str):
    def run(args):
        raise LabelwiseError(f"benchmark '{bench}' is not available in this build (labelwise.benchmarks.{bench})")
    return run


def _runner(mod):
    def run(args) -> int:
        from labelwise.dist import is_main
        from labelwise.io import atomic_write_json

        result = mod.run(args)
        if is_main():
            print(format_table(result))
            if args.json:
                atomic_write_json(args.json, result)
                print(f"wrote {args.json}")
        return 0
    return run


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def format_table(result: dict) -> str:
    """One row per variant; columns = the union of the scalar keys (ms_per_image first)."""
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    cols: list[str] = []
    for v in rows.values():
        for c, x in v.items():
            if c not in cols and not isinstance(x, (dict, list)):
                cols.append(c)
    if "ms_per_image" in cols:
        cols.remove("ms_per_image")
        cols.insert(0, "ms_per_image")
    table = [["variant"] + cols] + [[name] + [_fmt(v.get(c, "")) if c in v else "-" for c in cols]
                                    for name, v in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
