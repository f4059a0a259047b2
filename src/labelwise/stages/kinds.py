"""The stage kinds of a recipe: their fields (checked like any config) and what each writes.

=============  ====================================================  ==========================
kind           fields                                                outputs (``${stage.OUT}``)
=============  ====================================================  ==========================
synth          testbed (cooc|parts|objects), train, val, size, seed,  ``root``, ``spec``
               options ({name: value} of the testbed)
train          method, preset, steps | epochs, set [k=v], config      ``run``
               [files], data, labels, seeds
infer          run, split, what [..], set [infer.k=v], data,          ``out`` and one per ``what``
               checkpoint, seeds                                     (the same folder)
evaluate       task, pred, split, gt (default: data), label,         ``metrics`` (json file)
               bg_threshold, class_aware, class_agnostic, hungarian,
               level,
               num_clusters
pseudo-masks   method (oap|maskcut|tokencut), data, split, set       ``json``, ``out``
               [k=v], clusters
=============  ====================================================  ==========================

Every stage writes below ``OUT/<stage name>/``; ``data`` defaults to the recipe's ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from labelwise.config import from_dict, param, to_dict
from labelwise.errors import LabelwiseError

__all__ = ["KINDS", "StageContext"]


@dataclass
class StageContext:
    """What the runner hands every stage."""

    data: str | None                 # the recipe's dataset (after --data)
    device: str = "auto"
    show_progress: bool = True
    train_hooks: list[Callable] = field(default_factory=list)  # tests inject interruptions here


# --------------------------------------------------------------------------- synth
@dataclass
class SynthFields:
    testbed: str = param("cooc", choices=("cooc", "parts", "objects"), help="which synthetic testbed")
    train: int = param(200, range=(1, None))
    val: int = param(50, range=(0, None))
    size: int = param(128, range=(32, None))
    seed: int = param(0, range=(0, None))
    options: dict[str, Any] = param(default_factory=dict, help="testbed options, e.g. {context_rate: 0.8}")


def run_synth(f: SynthFields, out: Path, ctx: StageContext) -> dict:
    from labelwise import dist
    from labelwise.data.synth import generate, testbed_spec

    if dist.is_main():
        generate(f.testbed, out, n_train=f.train, n_val=f.val, size=f.size, seed=f.seed, **f.options)
    dist.barrier()
    return {"root": str(out), "spec": testbed_spec(f.testbed, out)}


# --------------------------------------------------------------------------- train
@dataclass
class TrainFields:
    method: str = param("", help="method name")
    preset: str | None = param(None)
    steps: int | None = param(None, range=(1, None))
    epochs: int | None = param(None, range=(1, None))
    set: list[str] = param(default_factory=list, help="config overrides key=value")
    config: list[str] = param(default_factory=list, help="config files")
    data: str | None = param(None)
    labels: str | None = param(None, help="label PNG folder (another stage's masks)")
    seeds: str | None = param(None, help="CAM seeds folder (another stage's seeds)")


def run_train(f: TrainFields, out: Path, ctx: StageContext) -> dict:
    from labelwise.engine import api

    overrides = list(f.set) + ([f"train.device={ctx.device}"] if ctx.device != "auto" else [])
    api.train(f.method, _data(f.data, ctx), out, preset=f.preset, config_files=f.config, overrides=overrides,
              steps=f.steps, epochs=f.epochs, labels=f.labels, seeds=f.seeds, hooks=ctx.train_hooks,
              show_progress=ctx.show_progress)
    return {"run": str(out)}


# --------------------------------------------------------------------------- infer
@dataclass
class InferFields:
    run: str = param("", help="a train stage's run folder")
    split: str = param("val")
    what: list[str] | None = param(None, help="outputs (default: the method's first)")
    set: list[str] = param(default_factory=list, help="infer.* overrides")
    data: str | None = param(None)
    checkpoint: str | None = param(None)
    skip_bad: bool = param(False)
    seeds: str | None = param(None, help="CAM seeds of the split for a seeds refiner (irn); default: the run's "
                                         "training seeds on its training split")


def run_infer(f: InferFields, out: Path, ctx: StageContext) -> dict:
    from labelwise.engine import api

    api.infer(f.run, _data(f.data, ctx), f.split, out, what=f.what, device=ctx.device, overrides=f.set,
              checkpoint=f.checkpoint, skip_bad=f.skip_bad, show_progress=ctx.show_progress, seeds=f.seeds)
    from labelwise.engine.registry import get_method

    whats = api.parse_what(f.what, get_method(api.read_run(f.run)["method"]))
    return {"out": str(out), **{w: str(out) for w in whats}}


# --------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateFields:
    task: str = param("semantic", choices=("semantic", "parts", "instance", "panoptic", "unsupervised"))
    pred: str = param("", help="prediction folder or json")
    split: str | None = param(None)
    gt: str | None = param(None, help="ground truth spec (default: the recipe's data)")
    label: str | None = param(None, help="row name in the comparison table (default: the stage name)")
    bg_threshold: float | None = param(None, range=(0.0, 1.0), help="semantic: score CAM seeds at this threshold")
    class_aware: bool = param(False)
    class_agnostic: bool = param(False, help="panoptic: collapse all categories into one 'object' category")
    hungarian: bool = param(False, help="instance: map cluster ids to categories (Hungarian) and score class-aware")
    level: str | None = param(None, choices=("instance", "semantic", "all"),
                              help="instance / panoptic: which level of results that carry one (default instance / all)")
    num_clusters: int | None = param(None, range=(1, None))


def run_evaluate(f: EvaluateFields, out: Path, ctx: StageContext) -> dict:
    from labelwise import dist
    from labelwise.evaluation import evaluate, jsonable
    from labelwise.io import atomic_write_json
    from labelwise.utils import resolve_device

    opts: dict[str, Any] = {"progress": ctx.show_progress}
    if f.task == "semantic":
        opts["bg_threshold"] = f.bg_threshold
    elif f.bg_threshold is not None:
        raise LabelwiseError("evaluate stage: bg_threshold applies to task semantic only")
    if f.task in ("semantic", "parts", "unsupervised"):
        opts["device"] = resolve_device(ctx.device)
    if f.task == "instance":
        opts.update(class_aware=f.class_aware, hungarian=f.hungarian, level=f.level or "instance")
    if f.task == "panoptic":
        opts.update(level=f.level or "all", class_agnostic=f.class_agnostic)
    if f.task == "unsupervised":
        opts["num_clusters"] = f.num_clusters
    result = evaluate(f.task, f.pred, f.gt or _data(None, ctx), f.split, **opts)
    path = out / "metrics.json"
    if dist.is_main():
        atomic_write_json(path, jsonable({"task": f.task, "split": f.split, "pred": f.pred, **result}))
    dist.barrier()
    return {"metrics": str(path)}


# --------------------------------------------------------------------------- pseudo-masks
@dataclass
class PseudoMasksFields:
    method: str = param("oap", choices=("oap", "maskcut", "tokencut"))
    data: str | None = param(None)
    split: str | None = param(None)
    set: list[str] = param(default_factory=list, help="pseudo-mask config overrides (labelwise pseudo-masks --help)")
    clusters: int | None = param(None, range=(1, None))


def run_pseudo_masks(f: PseudoMasksFields, out: Path, ctx: StageContext) -> dict:
    from labelwise.pseudo.runner import generate_from_spec

    path = out / "masks.json"
    generate_from_spec(f.method, _data(f.data, ctx), f.split, path, overrides=f.set, clusters=f.clusters,
                       device=ctx.device, show_progress=ctx.show_progress)
    return {"json": str(path), "out": str(out)}


def _data(value: str | None, ctx: StageContext) -> str:
    data = value or ctx.data
    if not data:
        raise LabelwiseError("this stage needs a dataset: give the recipe a 'data:' entry, the stage a 'data' "
                             "field, or pass --data SPEC")
    return data


# kind -> (fields class, runner, required fields)
KINDS: dict[str, tuple[type, Callable, tuple[str, ...]]] = {
    "synth": (SynthFields, run_synth, ()),
    "train": (TrainFields, run_train, ("method",)),
    "infer": (InferFields, run_infer, ("run", "split")),
    "evaluate": (EvaluateFields, run_evaluate, ("pred",)),
    "pseudo-masks": (PseudoMasksFields, run_pseudo_masks, ()),
}


def parse_fields(kind: str, name: str, fields: dict) -> Any:
    cls, _, required = KINDS[kind]
    obj = from_dict(cls, fields, source=f"stage '{name}' ({kind})")
    missing = [r for r in required if not getattr(obj, r)]
    if missing:
        raise LabelwiseError(f"stage '{name}' ({kind}) needs the field '{missing[0]}'")
    return obj


def fields_dict(obj: Any) -> dict:
    d = to_dict(obj)
    if isinstance(obj, InferFields) and d.get("seeds") is None:
        d.pop("seeds", None)  # infer records written before the field existed stay valid (no redo)
    return d
