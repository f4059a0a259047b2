"""Python API behind ``labelwise train`` / ``labelwise infer`` (also used by recipes and the demo).

``train(method, data, out, *, preset=None, config_files=(), overrides=(), steps=None,
epochs=None, labels=None, seeds=None)`` creates or resumes ``out`` and returns it;
``infer(run_dir, data, split, out, what=...)`` loads the run's saved config and last
checkpoint and writes predictions with the inference engine (:mod:`.predict`).

RUN_DIR layout: ``config.yaml`` (resolved config, path-valued keys absolute), ``run.json``
(method, preset, data spec, the stage inputs ``--labels`` / ``--seeds``, world size),
``info.json`` (DatasetInfo: class names), ``checkpoints/last.pt`` (+ ``step_*.pt``),
``log.jsonl``, ``tb/``, ``metrics.json``.

Resume rule: ``train`` on a RUN_DIR holding a checkpoint continues from it. ``--set``,
``--steps`` and ``--epochs`` apply on top of the saved config; with ``--preset`` or
``--config`` the config is resolved from scratch. Either way the result must equal the saved
config except for ``RESUMABLE_KEYS`` (length, device, workers, skip-bad), otherwise it is an
error naming the keys. The data spec and the stage inputs must be the same as when the run
started. A RUN_DIR that stopped before its first checkpoint is started afresh.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from labelwise import dist
from labelwise.config import from_dict, load_config, resolve_config, save_config, to_dict
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json

DEFAULT_PRESET = "cpu"
# Keys a resumed run may change: its length, and settings that do not change what is computed.
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.device", "train.num_workers", "data.skip_bad")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def length_overrides(steps: int | None = None, epochs: int | None = None) -> list[str]:
    """``--steps N`` / ``--epochs N`` as config overrides (``--steps`` switches epochs off)."""
    if steps is not None and epochs is not None:
        raise LabelwiseError("pass either --steps or --epochs, not both")
    if steps is not None:
        if int(steps) < 1:
            raise LabelwiseError(f"--steps must be >= 1, got {steps}")
        return [f"train.max_steps={int(steps)}", "train.epochs=0"]
    if epochs is not None:
        if int(epochs) < 1:
            raise LabelwiseError(f"--epochs must be >= 1, got {epochs}")
        return [f"train.epochs={int(epochs)}"]
    return []


# the preset a dataset family trains with when --preset is not given (if the method has it)
FAMILY_PRESETS = {"voc": "voc", "vocaug": "voc", "coco": "coco", "coco-wsss": "coco",
                  "partimagenet": "partimagenet", "pascalpart": "pascalpart"}


def choose_preset(method, spec: str, preset: str | None = None) -> tuple[str, str]:
    """``(preset, why)`` for a new run. An explicit ``preset`` wins. Otherwise a synthetic testbed
    (``labelwise data synth``) takes ``cpu``, a dataset of a known family the method's preset for
    it (``voc:`` -> ``voc``, ``coco:`` -> ``coco``, ...); anything else stops with one line
    listing the presets -- a real dataset never trains the small CPU setting silently."""
    presets = method.presets()
    if preset is not None:
        return preset, "--preset"
    if len(presets) == 1:
        return presets[0], "the method's only preset"
    from labelwise.data.spec import available_formats
    from labelwise.data.synth.common import read_meta

    fmt, _, rest = str(spec).partition(":")
    fmt = fmt.strip().lower()
    path = Path(rest).expanduser()
    meta = read_meta(path) if fmt in available_formats() and path.is_dir() else None
    if meta is not None and meta.get("kind") and DEFAULT_PRESET in presets:
        return DEFAULT_PRESET, f"the {meta['kind']} synthetic testbed"
    family = FAMILY_PRESETS.get(fmt)
    if family in presets:
        return family, f"the {fmt}: dataset family"
    raise LabelwiseError(f"--preset is needed: {spec} is not a synthetic testbed and method '{method.name}' has no "
                         f"preset for {fmt}: data; pass --preset NAME with NAME one of {', '.join(presets)} "
                         f"({DEFAULT_PRESET} = the small 2-core CPU setting made for the synthetic testbeds)")


def resolve_method_config(method, preset: str | None = None, config_files: Iterable = (),
                          overrides: Iterable[str] = (), steps: int | None = None, epochs: int | None = None):
    """Defaults <- preset YAML <- ``--config`` files <- ``--set`` <- ``--steps`` / ``--epochs``."""
    preset = preset or DEFAULT_PRESET
    layers = [(f"preset '{preset}' of method '{method.name}'", method.load_preset(preset))]
    overrides = list(overrides) + length_overrides(steps, epochs)
    return resolve_config(method.config_cls, layers=layers, files=list(config_files), overrides=overrides)


def config_diff(a, b, ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    ign = set(ignore)
    return sorted(k for k in set(fa) | set(fb) if k not in ign and fa.get(k) != fb.get(k))


def normalise_spec(spec: str) -> str:
    """Make the PATH of ``FORMAT:PATH`` absolute so a run can be resumed from anywhere."""
    if ":" in spec:
        fmt, path = spec.split(":", 1)
        p = Path(path).expanduser()
        if p.exists():
            return f"{fmt}:{p.resolve()}"
    return spec


def _abs(path: str | Path | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path is not None else None


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise LabelwiseError(f"{run_dir} is not a training run (no run.json); pass the --out folder of "
                             "'labelwise train'")
    return json.loads(path.read_text())


def load_info(run_dir: str | Path):
    from labelwise.data.base import DatasetInfo

    path = Path(run_dir) / "info.json"
    if not path.is_file():
        raise LabelwiseError(f"{path}: missing; the run folder is incomplete — re-run labelwise train")
    d = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(DatasetInfo)}
    return DatasetInfo(**{k: v for k, v in d.items() if k in fields})


def prepare_run(method_name: str, data: str, out: str | Path, *, preset: str | None = None,
                config_files: Iterable = (), overrides: Iterable[str] = (), steps: int | None = None,
                epochs: int | None = None, labels: str | Path | None = None, seeds: str | Path | None = None):
    """Resolve the config (new run or resume), write the run files; returns (method, cfg, info, spec, inputs)."""
    from labelwise.engine.registry import get_method

    out = Path(out)
    method = get_method(method_name)
    config_files, overrides = list(config_files), list(overrides)
    saved_cfg_path = out / "config.yaml"
    spec = normalise_spec(data)
    inputs = {"labels": _abs(labels), "seeds": _abs(seeds)}
    for flag, path in (("--labels", inputs["labels"]), ("--seeds", inputs["seeds"])):
        if path is not None and not Path(path).is_dir():
            raise LabelwiseError(f"{flag} {path}: folder not found; pass the --out folder of labelwise infer")
    from labelwise.engine.checkpoint import latest_checkpoint

    if saved_cfg_path.is_file() and latest_checkpoint(out) is not None:  # resume
        run = read_run(out)
        if run.get("method") != method.name:
            raise LabelwiseError(f"{out} holds a '{run.get('method')}' run, not '{method.name}'; pass a new --out")
        saved = load_config(method.config_cls, saved_cfg_path)
        if preset is not None or config_files:  # the whole command line again: resolve it from scratch
            cfg = resolve_method_config(method, preset or run.get("preset"), config_files, overrides, steps, epochs)
        else:  # --set / --steps / --epochs on top of the saved config
            from labelwise.config import apply_overrides

            cfg = from_dict(method.config_cls, apply_overrides(to_dict(saved), overrides + length_overrides(steps, epochs),
                                                               method.config_cls), source="--set")
        diff = config_diff(saved, cfg)
        if diff:
            shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
            raise LabelwiseError(f"{saved_cfg_path} differs from the requested config at {shown}; resuming "
                                 f"needs the same settings (only {', '.join(RESUMABLE_KEYS)} may change) — use a "
                                 "new --out for a different config")
        if run.get("data") not in (spec, data):
            raise LabelwiseError(f"{out} was trained on {run.get('data')}, not {spec}; pass the same --data to "
                                 "resume or a new --out")
        saved_inputs = run.get("inputs", {"labels": None, "seeds": None})
        if saved_inputs != inputs:
            raise LabelwiseError(f"{out} was trained with --labels {saved_inputs.get('labels')} --seeds "
                                 f"{saved_inputs.get('seeds')}; pass the same to resume or a new --out")
        info = load_info(out)
        if dist.is_main():
            save_config(cfg, saved_cfg_path)
            if run.get("world_size") != dist.get_world_size():
                run["world_size"] = dist.get_world_size()
                atomic_write_json(out / "run.json", run)
        return method, cfg, info, spec, inputs
    # A new run -- or one that stopped before its first checkpoint, whose run files are rewritten
    if out.exists() and not out.is_dir():
        raise LabelwiseError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and not saved_cfg_path.is_file() and latest_checkpoint(out) is not None:
        raise LabelwiseError(f"{out} has checkpoints but no config.yaml; delete it or pass a new --out")
    preset, why = choose_preset(method, spec, preset)
    cfg = resolve_method_config(method, preset, config_files, overrides, steps, epochs)
    info = method.dataset_info(cfg, spec)
    if dist.is_main():
        print(f"labelwise: {method.name} preset '{preset}' ({why})", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved_cfg_path)
        atomic_write_json(out / "info.json", dataclasses.asdict(info))
        from labelwise import __version__

        atomic_write_json(out / "run.json", {"method": method.name, "preset": preset,
                                             "data": spec, "inputs": inputs, "world_size": dist.get_world_size(),
                                             "labelwise": __version__})
    dist.barrier()
    return method, cfg, info, spec, inputs


def train(method: str, data: str, out: str | Path, *, preset: str | None = None, config_files: Iterable = (),
          overrides: Iterable[str] = (), steps: int | None = None, epochs: int | None = None,
          labels: str | Path | None = None, seeds: str | Path | None = None,
          hooks: list[Callable] | None = None, show_progress: bool = True) -> Path:
    """Train (or resume) ``method`` on ``data`` into ``out``; returns ``out``.

    ``labels`` / ``seeds``: another stage's label PNGs / CAM seeds (``--labels`` / ``--seeds``).
    Works single-process and under ``torchrun`` (joins the process group itself).
    """
    from labelwise.engine.trainer import Trainer

    dist.init_distributed()
    out = Path(out)
    m, cfg, info, spec, inputs = prepare_run(method, data, out, preset=preset, config_files=config_files,
                                             overrides=overrides, steps=steps, epochs=epochs, labels=labels,
                                             seeds=seeds)
    Trainer(m, cfg, out, spec, info, labels_dir=inputs["labels"], seeds_dir=inputs["seeds"], hooks=hooks,
            show_progress=show_progress).fit()
    return out


@dataclass
class LoadedRun:
    """A finished run ready for inference: ``model`` is ``method.inference_model(...)`` in eval mode."""

    method: Any
    cfg: Any
    info: Any
    model: Any
    state: Any
    run_dir: Path


def load_run(run_dir: str | Path, device: str = "auto", checkpoint: str | Path | None = None,
             overrides: Iterable[str] = ()) -> LoadedRun:
    """Load a trained run for inference, with ``overrides`` (``infer.key=value``) applied to its
    saved config (they may choose the module inference uses, e.g. OAP's ``infer.model``).

    Every weight comes from the checkpoint: the model is built with ``pretrained=False``, so
    the run works on a machine (or from a folder) without the pretrained-weights file it was
    trained from. Building the model draws random initial values that the checkpoint then
    overwrites; the global RNG state is restored afterwards, so loading a run does not change
    the random numbers the caller sees.
    """
    import torch

    from labelwise.engine.checkpoint import load_checkpoint, load_module_state
    from labelwise.engine.registry import get_method
    from labelwise.utils import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LabelwiseError(f"run folder {run_dir} does not exist; pass the --out folder of 'labelwise train'")
    run = read_run(run_dir)
    method = get_method(run["method"])
    cfg = _with_infer_overrides(method, load_config(method.config_cls, run_dir / "config.yaml"), overrides, run_dir)
    info = load_info(run_dir)
    path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        model = method.build_model(cfg, info, pretrained=False)
        state = method.build_state(cfg, info)
    load_module_state(model, ckpt["model"], path)
    if state is not None:
        load_module_state(state, ckpt.get("state") or {}, path, "state")
        state = state.to(dev).eval()
    teacher = None
    if ckpt.get("ema") is not None and method.uses_ema:
        from labelwise.blocks.ema import EMATeacher

        teacher = EMATeacher(method.ema_module(model))
        load_module_state(teacher, ckpt["ema"], path, "EMA teacher")
    model = method.inference_model(model, teacher, state, cfg).to(dev).eval()
    return LoadedRun(method=method, cfg=cfg, info=info, model=model, state=state, run_dir=run_dir)


def _with_infer_overrides(method, cfg, overrides: Iterable[str], run_dir: str | Path):
    """``cfg`` with ``infer.*`` overrides (and the method's ``inference_keys``) applied; any other key
    is an error naming the config file."""
    overrides = list(overrides)
    if not overrides:
        return cfg
    from labelwise.config import apply_overrides, parse_overrides

    allowed = tuple(getattr(method, "inference_keys", ()))
    for key, _ in parse_overrides(overrides):
        if not (key.startswith("infer.") or key in allowed):
            more = f" and {', '.join(allowed)}" if allowed else ""
            raise LabelwiseError(f"--set {key}: only infer.*{more} settings can change at inference; the rest "
                                 f"comes from {Path(run_dir) / 'config.yaml'}")
    return from_dict(method.config_cls, apply_overrides(to_dict(cfg), overrides, method.config_cls), source="--set")


def parse_what(what: str | Iterable[str] | None, method) -> tuple[str, ...]:
    """``"a,b"`` / ``["a", "b"]`` / None (the method's default) -> checked tuple of outputs."""
    if not method.outputs:
        raise LabelwiseError(f"method '{method.name}' declares no inference outputs")
    if what is None:
        return (next(iter(method.outputs)),)
    items = [w.strip() for w in (what.split(",") if isinstance(what, str) else what) if w.strip()]
    bad = [w for w in items if w not in method.outputs]
    if bad or not items:
        raise LabelwiseError(f"method '{method.name}' cannot write --what {','.join(bad) or what!r}; choose from "
                             f"{', '.join(method.outputs)} (several: --what a,b)")
    return tuple(dict.fromkeys(items))


def output_writers(method, what: tuple[str, ...], out: Path, cfg=None) -> dict:
    """One writer per requested output, all in ``out``; two outputs that would write the same files are refused."""
    from labelwise.engine.writers import make_writer

    kinds = [method.outputs[w] for w in what]
    dup = [k for k in set(kinds) if kinds.count(k) > 1]
    if dup:
        clash = [w for w in what if method.outputs[w] in dup]
        raise LabelwiseError(f"--what {','.join(clash)}: these outputs write the same files ({dup[0]}); run them "
                             "with separate --out folders")
    return {w: make_writer(method.outputs[w], out if method.outputs[w] != "coco_rle" else out / f"{w}.json",
                           **(method.writer_options(cfg, w) if cfg is not None else {}))
            for w in what}


def infer(run_dir: str | Path, data: str, split: str, out: str | Path, what: str | Iterable[str] | None = None,
          device: str = "auto", overrides: Iterable[str] = (), checkpoint: str | Path | None = None,
          skip_bad: bool = False, show_progress: bool = True, seeds: str | Path | None = None) -> Path:
    """Write ``what`` (one or several of the method's outputs, in one pass) for ``split`` of ``data``.

    ``overrides`` (``infer.key=value``) change inference settings of the saved config for this
    call. Under ``torchrun`` each rank predicts its shard. Images whose outputs exist are skipped.
    ``seeds``: CAM seeds of ``split`` for a method that refines them (``Method.needs_seeds``,
    e.g. ``irn``); default: the run's ``--seeds`` folder when ``split`` is its training split.
    """
    from labelwise.data import build_dataset
    from labelwise.engine.method import PredictContext
    from labelwise.engine.predict import run_predict

    dist.init_distributed()
    loaded = load_run(run_dir, device=device, checkpoint=checkpoint, overrides=overrides)
    method, cfg, info = loaded.method, loaded.cfg, loaded.info
    whats = parse_what(what, method)
    ds = build_dataset(normalise_spec(data), split)
    if ds.num_classes > 1 and ds.num_classes != info.num_classes and not method.label_free:  # folder: no class list
        raise LabelwiseError(f"{data} has {ds.num_classes} classes but the run was trained with "
                             f"{info.num_classes}; pass a dataset with the same class list")
    seeds = _inference_seeds(method, cfg, run_dir, normalise_spec(data), split, seeds)
    if seeds is not None:
        from labelwise.data.overrides import with_stage_inputs

        ds = with_stage_inputs(ds, seeds_dir=seeds)
    out = Path(out)
    sigs = {w: {**_prediction_signature(loaded, cfg, normalise_spec(data), split, checkpoint, seeds),
                "files": method.outputs[w]} for w in whats}
    _check_predictions(out, sigs)
    out.mkdir(parents=True, exist_ok=True)
    writers = output_writers(method, whats, out, cfg)
    dev = next(loaded.model.parameters()).device
    ctx = PredictContext(cfg=cfg, info=info, what=whats, device=dev, rank=dist.get_rank(),
                         world_size=dist.get_world_size(), state=loaded.state)
    res = run_predict(lambda batch: method.predict(loaded.model, batch, ctx), ds, writers,
                      transform=method.inference_transform(cfg, info), batch_size=cfg.infer.batch_size,
                      num_workers=cfg.infer.num_workers, device=dev, skip_bad=skip_bad, show_progress=show_progress,
                      desc=f"{method.name} {','.join(whats)} {split}")
    if dist.is_main():
        atomic_write_json(out / PREDICTIONS_META, {**_read_predictions_meta(out), **sigs})
        if show_progress:
            print(f"labelwise: {res['predicted']} images predicted, {res['present']} already in {out}", flush=True)
    dist.barrier()
    return out


PREDICTIONS_META = ".labelwise-predictions.json"


def _inference_seeds(method, cfg, run_dir, spec: str, split: str, seeds: str | Path | None) -> str | None:
    """The seeds folder ``predict`` reads (absolute), or None for a method that needs none."""
    if not getattr(method, "needs_seeds", False):
        if seeds is not None:
            raise LabelwiseError(f"--seeds {seeds}: method '{method.name}' does not read seeds at inference; "
                                 "drop --seeds")
        return None
    if seeds is not None:
        path = Path(seeds).expanduser().resolve()
        if not path.is_dir():
            raise LabelwiseError(f"--seeds {seeds}: folder not found; pass the --out folder of labelwise infer "
                                 f"RUN --split {split} --what seeds")
        return str(path)
    run = read_run(run_dir)
    recorded = (run.get("inputs") or {}).get("seeds")
    if recorded and split == cfg.data.train_split and run.get("data") == spec and Path(recorded).is_dir():
        return str(recorded)
    raise LabelwiseError(f"method '{method.name}' refines CAM seeds: pass --seeds SEED_DIR with the seeds of split "
                         f"'{split}' (labelwise infer CAM_RUN --split {split} --what seeds)")


def _prediction_signature(loaded: LoadedRun, cfg, spec: str, split: str, checkpoint, seeds: str | None = None) -> dict:
    """What decides an output's contents: the run, its checkpoint, the data, the inference settings
    and, for a method that refines seeds, the seeds folder."""
    ck = Path(checkpoint) if checkpoint else loaded.run_dir / "checkpoints" / "last.pt"
    st = ck.stat()
    settings = {k: v for k, v in to_dict(cfg.infer).items() if k not in ("batch_size", "num_workers")}
    sig = {"run": str(loaded.run_dir.resolve()), "checkpoint": f"{ck.name}:{st.st_size}:{st.st_mtime_ns}",
           "data": spec, "split": split, "infer": settings}
    if seeds is not None:
        sig["seeds"] = str(seeds)
    return sig


def _read_predictions_meta(out: Path) -> dict:
    p = out / PREDICTIONS_META
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# writer kinds whose files are named by the output (``<what>.json``): two outputs never share them
_NAMED_BY_OUTPUT = ("coco_rle", "clustered_masks")


def _files_of(what: str, sig: dict) -> str | None:
    """The file kind an output recorded in a folder's metadata writes (older metadata: looked up from
    its run's method), or None when unknown."""
    if "files" in sig:
        return sig["files"]
    try:
        from labelwise.engine.registry import get_method

        return get_method(read_run(sig["run"])["method"]).outputs.get(what)
    except Exception:  # the run folder is gone or unreadable: nothing to compare with
        return None


def _check_predictions(out: Path, sigs: dict) -> None:
    """Outputs already in ``out`` must come from the same run, checkpoint, data and settings:
    otherwise resuming would mix old and new predictions silently. Another output that writes the
    same files (``<id>.png`` of a cam run's ``masks`` and a seco run's ``segmentation``) is refused
    too: its images would count as already predicted."""
    old = _read_predictions_meta(out)
    for what, sig in sigs.items():
        kind = sig.get("files")
        if kind is None or kind in _NAMED_BY_OUTPUT:
            continue
        for other, osig in old.items():
            if other != what and _files_of(other, osig) == kind:
                raise LabelwiseError(f"{out} holds '{other}' predictions of {osig.get('run', 'another run')} in the "
                                     f"same files ({kind}) that '{what}' writes; pass a new --out")
    for what, sig in sigs.items():
        prev = old.get(what)
        if prev is not None and "files" not in prev:  # metadata written before the file kind was recorded
            sig = {k: v for k, v in sig.items() if k != "files"}
        if prev is not None and prev != sig:
            fa, fb = _flatten(prev), _flatten(sig)
            keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
            raise LabelwiseError(f"{out} holds '{what}' predictions made with another {', '.join(keys)}; pass a new "
                                 "--out, or delete that folder to predict again")
