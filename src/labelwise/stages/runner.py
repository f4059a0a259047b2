"""Resumable stages: ``run_recipe(recipe, out)`` runs a recipe's stages in order.

Each stage writes below ``OUT/<stage>/`` and leaves a record in ``OUT/.stages/<stage>.json``:
its resolved fields, the tokens of the stages it refers to, whether it finished, its
outputs and its own token (new each time the stage produces new outputs). On the next run:

* a finished stage with the same fields and inputs is skipped;
* an unfinished one resumes: ``train`` continues from its last checkpoint, ``infer`` and
  ``pseudo-masks`` only compute the images whose outputs are missing;
* a stage whose fields or inputs changed is redone from scratch (its folder is cleared),
  except ``train``, which may only grow (``steps`` / ``epochs``): any other change to a
  training stage is an error naming the keys -- delete ``OUT/<stage>`` to retrain.

At the end every ``evaluate`` stage becomes a row of the comparison table, printed and
written to ``OUT/table.md`` and ``OUT/table.json``. Under ``torchrun`` every rank runs the
stages (each stage shards its own work); rank 0 writes the records.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from labelwise import dist
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json
from labelwise.stages.kinds import KINDS, StageContext, fields_dict, parse_fields
from labelwise.stages.recipe import Recipe, load_recipe, substitute
from labelwise.stages.table import comparison_table, write_table

__all__ = ["run_recipe", "StageResult"]

GROWABLE = {"train": ("steps", "epochs")}


class StageResult(dict):
    """``{"name", "kind", "outputs", "status": done|ran|skipped, "seconds"}``."""


def _record_path(out: Path, name: str) -> Path:
    return out / ".stages" / f"{name}.json"


def _read_record(out: Path, name: str) -> dict | None:
    p = _record_path(out, name)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_record(out: Path, name: str, rec: dict) -> None:
    if dist.is_main():
        atomic_write_json(_record_path(out, name), rec)
    dist.barrier()


def _needed(recipe: Recipe, data: Any) -> set[str]:
    """Stages to run: every non-``synth`` stage, plus the ``synth`` stages something needs."""
    need = {s.name for s in recipe.stages if s.kind != "synth"}
    wanted = set().union(*(recipe.stage(n).refs() for n in need)) if need else set()
    from labelwise.stages.recipe import refs_in

    wanted |= refs_in(data)
    if "vars" in wanted:
        wanted |= refs_in(recipe.vars)
    changed = True
    while changed:  # transitive closure over references
        changed = False
        for s in recipe.stages:
            if s.name in wanted and s.name not in need:
                need.add(s.name)
                wanted |= s.refs()
                changed = True
    return need


def run_recipe(recipe: Recipe | str | Path, out: str | Path, *, overrides: Iterable[str] = (),
               data: str | None = None, device: str = "auto", show_progress: bool = True,
               train_hooks: list[Callable] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) ``recipe`` into ``out``. Returns ``{"stages": {name: outputs}, "table": rows}``."""
    from labelwise.config import parse_overrides

    dist.init_distributed()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    parse_overrides(overrides)  # syntax errors first
    recipe = recipe.apply(overrides, data)
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LabelwiseError(f"--out {out} is a file; pass a folder")
    say = log or ((lambda m: print(m, flush=True)) if dist.is_main() else (lambda m: None))
    outputs: dict[str, dict] = {}
    tokens: dict[str, str] = {}

    resolving: list[str] = []  # variables being resolved (a cycle is an error, not a recursion)

    def lookup(name: str, key: str | None, where: str):
        if name == "vars":
            if key is None or key not in recipe.vars:
                raise LabelwiseError(f"{where}: ${{vars.{key}}} is not a variable of the recipe "
                                     f"({', '.join(recipe.vars) or 'none'})")
            if key in resolving:
                cycle = " -> ".join(resolving[resolving.index(key):] + [key])
                raise LabelwiseError(f"recipe variables refer to each other in a cycle: {cycle}; give one a value")
            resolving.append(key)
            try:
                return substitute(recipe.vars[key], lookup, f"vars.{key}")
            finally:
                resolving.pop()
        if name == "data":
            return resolved_data()
        if name not in outputs:
            raise LabelwiseError(f"{where}: ${{{name}...}} refers to a stage that has not run (not needed, or below)")
        if key is None or key not in outputs[name]:
            raise LabelwiseError(f"{where}: stage '{name}' has no output '{key}' (it has: "
                                 f"{', '.join(outputs[name])})")
        deps.add(name)
        return outputs[name][key]

    def resolved_data():
        return substitute(recipe.data, lookup, "data") if recipe.data is not None else None

    need = _needed(recipe, recipe.data)
    todo = [s for s in recipe.stages if s.name in need]
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    results: list[StageResult] = []
    for i, stage in enumerate(todo, 1):
        deps: set[str] = set()
        fields = substitute(stage.fields, lookup, f"stage '{stage.name}'")
        parsed = parse_fields(stage.kind, stage.name, fields)
        params = fields_dict(parsed)
        stage_data = None
        try:
            stage_data = resolved_data()
        except LabelwiseError:
            if stage.kind != "synth":
                raise
        if stage_data is not None and stage.kind != "synth":
            params["_data"] = stage_data
        dep_tokens = {d: tokens[d] for d in sorted(deps)}
        rec = _read_record(out, stage.name)
        stage_dir = out / stage.name
        head = f"[{i}/{len(todo)}] {stage.name} ({stage.kind})"
        if rec is not None and stage.kind == "train" and not (stage_dir / "checkpoints" / "last.pt").is_file():
            rec = None  # nothing trained yet (or the run folder was deleted): a fresh start, whatever it was
        if rec is not None and rec.get("complete") and not _outputs_present(rec.get("outputs") or {}, out):
            say(f"{head}: its outputs are missing -> redoing it")
            rec = None
        if rec is not None and rec.get("params") == params and rec.get("deps") == dep_tokens and rec.get("complete"):
            token = _token(stage.kind, stage_dir) if stage.kind == "train" else rec["token"]
            if token != rec["token"]:  # the run was trained further outside the recipe: later stages redo
                token = _shared(token)
                _write_record(out, stage.name, {**rec, "token": token})
            outputs[stage.name], tokens[stage.name] = rec["outputs"], token
            say(f"{head}: done, skipped")
            results.append(StageResult(name=stage.name, kind=stage.kind, outputs=rec["outputs"], status="skipped",
                                       seconds=0.0))
            continue
        if rec is not None and (rec.get("params") != params or rec.get("deps") != dep_tokens):
            _refuse_if_training_depends(recipe, stage.name, out, _changes(rec, params, dep_tokens))
            _stale(stage, rec, params, dep_tokens, stage_dir, say, head)
        say(f"{head} ...")
        _write_record(out, stage.name, {"kind": stage.kind, "params": params, "deps": dep_tokens, "complete": False})
        t0 = time.perf_counter()
        ctx = StageContext(data=stage_data, device=device, show_progress=show_progress,
                           train_hooks=list(train_hooks or []) if stage.kind == "train" else [])
        run = KINDS[stage.kind][1]
        if dist.is_main():
            stage_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        stage_out = run(parsed, stage_dir, ctx)
        token = _shared(_token(stage.kind, stage_dir))
        _write_record(out, stage.name, {"kind": stage.kind, "params": params, "deps": dep_tokens, "complete": True,
                                        "outputs": stage_out, "token": token})
        outputs[stage.name], tokens[stage.name] = stage_out, token
        dt = time.perf_counter() - t0
        say(f"      {stage.name}: finished in {dt:.1f}s")
        results.append(StageResult(name=stage.name, kind=stage.kind, outputs=stage_out, status="ran", seconds=dt))
    rows = comparison_table(recipe, outputs)
    if rows and dist.is_main():
        text = write_table(rows, out, recipe.table_classes, recipe.table_groups)
        say("")
        say(text)
        say(f"table: {out / 'table.md'}")
    dist.barrier()
    return {"stages": outputs, "table": rows, "results": results, "out": str(out)}


def _dependents(recipe: Recipe, name: str) -> list[str]:
    """Stages that use ``name``'s outputs, directly or through other stages (a stage without
    its own dataset uses the recipe's ``data`` and so whatever that refers to)."""
    from labelwise.stages.recipe import refs_in

    data_refs = refs_in(recipe.data)
    uses = {s.name: s.refs() | (data_refs if s.kind != "synth" else set()) for s in recipe.stages}
    found: list[str] = []
    frontier = {name}
    while frontier:
        new = [s for s, r in uses.items() if r & frontier and s not in found and s != name]
        found += new
        frontier = set(new)
    return found


def _changes(rec: dict, params: dict, deps: dict) -> str:
    """What differs from a stage's record: ``field a, field b, stage c re-ran``."""
    old, old_deps = rec.get("params") or {}, rec.get("deps") or {}
    fields = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    inputs = sorted(k for k in set(old_deps) | set(deps) if old_deps.get(k) != deps.get(k))
    return ", ".join([f"field {k}" for k in fields] + [f"stage {k} re-ran" for k in inputs])


def _refuse_if_training_depends(recipe: Recipe, name: str, out: Path, what: str) -> None:
    """A stage is about to be redone: refuse first (nothing touched) when a finished training
    stage was trained on its outputs -- redoing it would leave that run without its inputs."""
    for dep in _dependents(recipe, name):
        rec = _read_record(out, dep)
        trained = (out / dep / "checkpoints" / "last.pt").is_file()
        if recipe.stage(dep).kind == "train" and rec is not None and rec.get("complete") and trained:
            raise LabelwiseError(f"stage '{name}' changed ({what}) since {out / dep} was trained on its outputs; "
                                 f"delete {out / dep} to retrain on the new ones, or use a new --out (nothing was "
                                 "changed)")


def _outputs_present(outputs: dict, out: Path) -> bool:
    """Whether every output path a stage recorded below ``out`` still exists."""
    for v in outputs.values():
        if isinstance(v, str) and Path(v).is_absolute() and Path(v).is_relative_to(out) and not Path(v).exists():
            return False
    return True


def _shared(token: str) -> str:
    """Rank 0's token on every rank (a random token differs per rank)."""
    return dist.all_gather_object(token)[0]


def _token(kind: str, stage_dir: Path) -> str:
    """A new token for new outputs; a training stage's token is its checkpoint (same weights = same token)."""
    if kind == "train":
        ck = stage_dir / "checkpoints" / "last.pt"
        if ck.is_file():
            st = ck.stat()
            return f"ckpt:{st.st_size}:{st.st_mtime_ns}"
    return uuid.uuid4().hex


def _stale(stage, rec: dict, params: dict, deps: dict, stage_dir: Path, say, head: str) -> None:
    """The stage's fields or inputs changed since its folder was written: clear it (or refuse, for training)."""
    old = rec.get("params") or {}
    changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    inputs_changed = sorted(k for k in set(rec.get("deps") or {}) | set(deps) if (rec.get("deps") or {}).get(k) != deps.get(k))
    growable = GROWABLE.get(stage.kind, ())
    if stage.kind == "train":
        bad = [k for k in changed if k not in growable]
        if bad or inputs_changed:
            what = (f"fields {', '.join(bad)}" if bad else "") + \
                   (" and " if bad and inputs_changed else "") + \
                   (f"inputs from stage {', '.join(inputs_changed)}" if inputs_changed else "")
            raise LabelwiseError(f"stage '{stage.name}' (train): its {what} changed since {stage_dir} was trained; "
                                 f"delete that folder to retrain, or use a new --out")
        say(f"{head}: length changed ({', '.join(changed)}); training continues")
        return
    say(f"{head}: {_changes(rec, params, deps)} -> redoing it")
    if dist.is_main() and stage_dir.exists():
        shutil.rmtree(stage_dir)
    dist.barrier()
