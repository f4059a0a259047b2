"""Average the comparison tables of several recipe runs (``DIR/table.json``) into one Markdown table.

Each row is an evaluate stage's label; each cell is the mean over the runs (and over the rows that
``--merge`` folds together), followed by every value in brackets, so the spread is always in view.

    # the OAP training table on two testbed seeds
    python bench/recipe_tables.py seed0=runs/oap-s0 seed3=runs/oap-s3 --metrics ap50,ar100,ap,miou,pq
    # a sweep whose labels carry the training seed: one row per setting, averaged over the seeds
    python bench/recipe_tables.py runs/cocal-tau --merge ", training seed \\d+" --metrics part_miou,part_mavg

``--out PREFIX`` also writes PREFIX.md and PREFIX.json (the numbers behind the table).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def load_rows(folder: str | Path, from_stages: bool = False) -> list[dict]:
    """The run's ``table.json``; for a run stopped before its end (or with ``from_stages``: a folder
    that several partial recipes wrote into, each leaving a table of its own rows), the
    ``metrics.json`` of every evaluate stage that finished, in the order they finished, labelled by
    the stage's ``label`` (its record in ``DIR/.stages/``) or else its name."""
    path = Path(folder) / "table.json"
    if path.is_file() and not from_stages:
        return json.loads(path.read_text())
    finished = sorted(Path(folder).glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if not finished:
        raise SystemExit(f"{path}: not found, nor any STAGE/metrics.json; pass the --out folder of a `labelwise run`")
    rows = []
    for p in finished:
        label = p.parent.name
        record = Path(folder) / ".stages" / f"{p.parent.name}.json"
        if record.is_file():
            label = (json.loads(record.read_text()).get("params") or {}).get("label") or label
        rows.append({**json.loads(p.read_text()), "label": label})
    return rows


def collect(runs: dict[str, list[dict]], metrics: list[str], merge: str | None) -> dict[str, dict[str, list]]:
    """``{row label: {metric: [values, in run order]}}``, rows in first-seen order; a run without the
    row gets one ``None`` (shown as ``–``), so every bracket lists the runs in the same order."""
    table: dict[str, dict[str, list]] = {}
    for k, rows in enumerate(runs.values()):
        seen = set()
        for r in rows:
            label = re.sub(merge, "", r["label"]) if merge else r["label"]
            cell = table.setdefault(label, {m: [None] * k for m in metrics})
            seen.add(label)
            for m in metrics:
                cell[m].append(float(r[m]) if isinstance(r.get(m), (int, float)) else None)
        for label, cell in table.items():
            if label not in seen:
                for m in metrics:
                    cell[m].append(None)
    return table


def render(table: dict[str, dict[str, list]], metrics: list[str]) -> str:
    shown = [m for m in metrics if any(x is not None for c in table.values() for x in c[m])]
    lines = ["| row | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for label, cell in table.items():
        out = []
        for m in shown:
            v = cell[m]
            present = [x for x in v if x is not None]
            if not present:
                out.append("-")
            elif len(v) == 1:
                out.append(f"{v[0]:.3f}")
            else:
                out.append(f"{sum(present) / len(present):.3f} ("
                           + " / ".join("–" if x is None else f"{x:.3f}" for x in v) + ")")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="DIR or NAME=DIR: the --out folders of finished recipe runs")
    ap.add_argument("--metrics", required=True, help="comma-separated metric keys of table.json (e.g. ap50,miou)")
    ap.add_argument("--merge", help="regular expression removed from every label: rows that then share a label are "
                                    "averaged (e.g. ', training seed \\d+')")
    ap.add_argument("--out", help="also write OUT.md and OUT.json")
    ap.add_argument("--from-stages", action="store_true",
                    help="read every finished evaluate stage of each folder instead of its table.json")
    a = ap.parse_args(argv)
    runs = {}
    for spec in a.runs:
        name, _, folder = spec.rpartition("=")
        runs[name or folder] = load_rows(folder, a.from_stages)
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    table = collect(runs, metrics, a.merge)
    text = f"Runs, in bracket order: {', '.join(runs)}.\n\n" + render(table, metrics)
    print(text)
    if a.out:
        Path(a.out + ".md").write_text(text + "\n")
        Path(a.out + ".json").write_text(json.dumps({"runs": {k: str(v) for k, v in zip(runs, a.runs)},
                                                     "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
