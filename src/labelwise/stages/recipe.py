"""Recipes: a YAML list of stages with named outputs and references to earlier ones.

::

    description: CAM baseline on the cooc testbed
    vars:                          # defaults; `labelwise run ... --set steps=50` overrides
      steps: null
    data: ${testbed.spec}          # the dataset of every stage that names none; --data replaces it
    stages:
      - name: testbed
        synth: {testbed: cooc, train: 200, val: 60, size: 128}
      - name: cam
        train: {method: cam, preset: cpu, steps: ${vars.steps}}
      - name: pred
        infer: {run: ${cam.run}, split: train, what: [seeds, masks]}
      - name: seeds
        evaluate: {task: semantic, pred: ${pred.seeds}, split: train, bg_threshold: 0.5, label: CAM seeds}

Each stage is a mapping with a ``name`` and exactly one kind key (``synth``, ``train``,
``infer``, ``evaluate``, ``pseudo-masks``; see :mod:`labelwise.stages.kinds` for their
fields and outputs). ``${vars.NAME}``, ``${data}`` and ``${STAGE.OUTPUT}`` are replaced by
their values: a field that is exactly one reference takes the value with its type (a
number, ``null``, a list), a reference inside a longer string is formatted into it. A stage
may only refer to stages above it. A ``synth`` stage runs only when something refers to it
(``--data`` on the command line makes the recipe's testbed unnecessary).

An optional ``table:`` adds to the comparison table the IoU and confusion ratio (FP/TP) of
named classes (``classes: [disc, ring]``) and the means over class groups
(``groups: {co-occurring: [disc, ring], control: [diamond, hexagon]}``).

``--set`` on the command line: ``NAME=VALUE`` (or ``vars.NAME=VALUE``) sets a variable;
``STAGE.FIELD=VALUE`` sets a field of a stage (``cam.preset=voc``). Values are YAML.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from labelwise.errors import LabelwiseError

__all__ = ["Recipe", "Stage", "load_recipe", "STAGE_KINDS", "REF"]

STAGE_KINDS = ("synth", "train", "infer", "evaluate", "pseudo-masks")
REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)(?:\.([A-Za-z0-9_\-]+))?\}")
NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Stage:
    name: str
    kind: str
    fields: dict[str, Any]

    def refs(self) -> set[str]:
        """Names referred to by this stage's fields (``vars`` and ``data`` included)."""
        return refs_in(self.fields)


@dataclass
class Recipe:
    path: Path | None
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    data: Any = None
    stages: list[Stage] = field(default_factory=list)
    table_classes: list[str] = field(default_factory=list)  # per-class columns of the comparison table
    table_groups: dict[str, list[str]] = field(default_factory=dict)  # class groups averaged in a third table

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def apply(self, overrides: Iterable[str] = (), data: str | None = None) -> "Recipe":
        """A copy with ``--set`` overrides and ``--data`` applied."""
        from labelwise.config import parse_overrides

        r = copy.deepcopy(self)
        if data is not None:
            r.data = data
        names = [s.name for s in r.stages]
        for key, value in parse_overrides(overrides):
            head, _, rest = key.partition(".")
            if head == "vars" and rest:
                head, rest = rest, ""
            if not rest:
                if head not in r.vars:
                    close = difflib.get_close_matches(head, list(r.vars), n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    raise LabelwiseError(f"--set {key}: the recipe has no variable '{head}'{hint} (variables: "
                                         f"{', '.join(r.vars) or 'none'}; stage fields: STAGE.FIELD=VALUE)")
                r.vars[head] = value
                continue
            if head not in names:
                close = difflib.get_close_matches(head, names + list(r.vars), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise LabelwiseError(f"--set {key}: the recipe has no stage '{head}'{hint} (stages: {', '.join(names)})")
            r.stage(head).fields[rest] = value
        return r


def refs_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {m.group(1) for m in REF.finditer(value)}
    if isinstance(value, dict):
        return set().union(*(refs_in(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(refs_in(v) for v in value)) if value else set()
    return set()


def substitute(value: Any, lookup, where: str) -> Any:
    """Replace ``${a.b}`` references in ``value`` (recursively) with ``lookup(a, b)``."""
    if isinstance(value, str):
        m = REF.fullmatch(value.strip())
        if m:
            return lookup(m.group(1), m.group(2), where)

        def fmt(mo):
            v = lookup(mo.group(1), mo.group(2), where)
            if isinstance(v, bool):
                return "true" if v else "false"
            return "null" if v is None else str(v)

        return REF.sub(fmt, value)
    if isinstance(value, dict):
        return {k: substitute(v, lookup, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [substitute(v, lookup, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (a path, or the name of a recipe shipped with labelwise)."""
    from labelwise.config import load_yaml

    path = find_recipe(path)
    doc = load_yaml(path, what="recipe", flag="labelwise run")
    unknown = sorted(set(doc) - {"description", "vars", "data", "stages", "table"})
    if unknown:
        raise LabelwiseError(f"{path}: unknown top-level key '{unknown[0]}'; allowed: description, vars, data, stages, "
                             "table")
    table = doc.get("table") or {}
    groups = table.get("groups", {}) if isinstance(table, dict) else None
    if (not isinstance(table, dict) or set(table) - {"classes", "groups"}
            or not isinstance(table.get("classes", []), list) or not isinstance(groups, dict)
            or not all(isinstance(v, list) and v for v in groups.values())):
        raise LabelwiseError(f"{path}: 'table' takes {{classes: [class names], groups: {{name: [class names]}}}} "
                             "(per-class IoU and FP/TP columns; group means)")
    stages_doc = doc.get("stages")
    if not isinstance(stages_doc, list) or not stages_doc:
        raise LabelwiseError(f"{path}: 'stages' must be a non-empty list of stages")
    vars_ = doc.get("vars") or {}
    if not isinstance(vars_, dict):
        raise LabelwiseError(f"{path}: 'vars' must be a mapping of name: default value")
    stages: list[Stage] = []
    seen: set[str] = set()
    for i, sd in enumerate(stages_doc):
        where = f"{path}: stage {i + 1}"
        if not isinstance(sd, dict) or "name" not in sd:
            raise LabelwiseError(f"{where}: a stage is a mapping with a 'name' and one of {', '.join(STAGE_KINDS)}")
        name = str(sd["name"])
        if not NAME.match(name) or name in ("vars", "data"):
            raise LabelwiseError(f"{where}: stage name {name!r} must be letters, digits, '_' or '-' (and not vars/data)")
        if name in seen:
            raise LabelwiseError(f"{where}: stage name '{name}' is used twice; names must be unique")
        kinds = [k for k in sd if k != "name"]
        if len(kinds) != 1 or kinds[0] not in STAGE_KINDS:
            raise LabelwiseError(f"{where} ('{name}'): give exactly one kind key out of {', '.join(STAGE_KINDS)}, "
                                 f"got {', '.join(kinds) or 'none'}")
        fields = sd[kinds[0]] or {}
        if not isinstance(fields, dict):
            raise LabelwiseError(f"{where} ('{name}'): '{kinds[0]}' must be a mapping of fields")
        for ref in refs_in(fields):
            if ref not in ("vars", "data") and ref not in seen:
                later = ref in {str(s.get("name")) for s in stages_doc if isinstance(s, dict)}
                why = ("itself; a stage can only use the outputs of stages above it" if ref == name else
                       "a later stage; move it below" if later else "which is not a stage above it")
                raise LabelwiseError(f"{where} ('{name}'): refers to ${{{ref}...}}, {why}")
        seen.add(name)
        stages.append(Stage(name=name, kind=kinds[0], fields=dict(fields)))
    return Recipe(path=path, description=str(doc.get("description") or ""), vars=dict(vars_),
                  data=doc.get("data"), stages=stages, table_classes=[str(c) for c in table.get("classes", [])],
                  table_groups={str(k): [str(c) for c in v] for k, v in groups.items()})


def shipped_recipes() -> list[str]:
    from importlib import resources

    d = resources.files("labelwise") / "recipes"
    try:
        return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def find_recipe(path: str | Path) -> Path:
    """``path`` if it is a file, else the shipped recipe of that name (``labelwise run demo``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent == Path(".") and name in shipped_recipes():
        from importlib import resources

        return Path(str(resources.files("labelwise") / "recipes" / f"{name}.yaml"))
    raise LabelwiseError(f"recipe {path}: file not found; pass a recipe YAML file or the name of a shipped recipe "
                         f"({', '.join(shipped_recipes()) or 'none'})")
