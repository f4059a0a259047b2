"""Python API behind ``labelwise train`` / ``labelwise infer`` (also used by the demo).

``train(method, data, out, *, preset=None, config_files=(), overrides=(), steps=None)``
creates or resumes ``out`` and returns it; ``infer(run_dir, data, split, out, what=...)``
loads the run's saved config and last checkpoint and writes predictions.

RUN_DIR layout: ``config.yaml`` (resolved config), ``run.json`` (method, preset, data
spec, world size), ``info.json`` (DatasetInfo: class names), ``checkpoints/last.pt`` (+
``step_*.pt``), ``log.jsonl``, ``tb/``, ``metrics.json``.

Resume rule: ``train`` on a RUN_DIR holding ``config.yaml`` continues from its last
checkpoint. Without ``--preset/--config/--set`` the saved config is reused (``--steps``
may still change ``train.max_steps``); with them, the newly resolved config must equal the
saved one except for ``train.max_steps``, otherwise it is an error naming the keys.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from labelwise import dist
from labelwise.config import from_dict, load_config, resolve_config, save_config, to_dict
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json

DEFAULT_PRESET = "cpu"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resolve_method_config(method, preset: str | None = None, config_files: Iterable = (),
                          overrides: Iterable[str] = (), steps: int | None = None):
    """Defaults <- preset YAML <- ``--config`` files <- ``--set`` <- ``--steps``."""
    preset = preset or DEFAULT_PRESET
    layers = [(f"preset '{preset}' of method '{method.name}'", method.load_preset(preset))]
    overrides = list(overrides)
    if steps is not None:
        if int(steps) < 1:
            raise LabelwiseError(f"--steps must be >= 1, got {steps}")
        overrides.append(f"train.max_steps={int(steps)}")
    return resolve_config(method.config_cls, layers=layers, files=list(config_files), overrides=overrides)


def config_diff(a, b, ignore: Iterable[str] = ("train.max_steps",)) -> list[str]:
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    ign = set(ignore)
    return sorted(k for k in set(fa) | set(fb) if k not in ign and fa.get(k) != fb.get(k))


def _normalise_spec(spec: str) -> str:
    """Make the PATH of ``FORMAT:PATH`` absolute so a run can be resumed from anywhere."""
    if ":" in spec:
        fmt, path = spec.split(":", 1)
        p = Path(path).expanduser()
        if p.exists():
            return f"{fmt}:{p.resolve()}"
    return spec


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
                config_files: Iterable = (), overrides: Iterable[str] = (), steps: int | None = None):
    """Resolve the config (new run or resume), write the run files; returns (method, cfg, info, spec)."""
    from labelwise.methods import get_method

    out = Path(out)
    method = get_method(method_name)
    config_files, overrides = list(config_files), list(overrides)
    saved_cfg_path = out / "config.yaml"
    spec = _normalise_spec(data)
    if saved_cfg_path.is_file():  # resume
        run = read_run(out)
        if run.get("method") != method.name:
            raise LabelwiseError(f"{out} holds a '{run.get('method')}' run, not '{method.name}'; pass a new --out")
        saved = load_config(method.config_cls, saved_cfg_path)
        if preset is None and not config_files and not overrides:
            cfg = saved
            if steps is not None:
                cfg = from_dict(method.config_cls, {**to_dict(saved), "train": {**to_dict(saved.train),
                                                                               "max_steps": int(steps)}},
                                source="--steps")
        else:
            cfg = resolve_method_config(method, preset or run.get("preset"), config_files, overrides, steps)
            diff = config_diff(saved, cfg)
            if diff:
                shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
                raise LabelwiseError(f"{saved_cfg_path} differs from the requested config at {shown}; resuming "
                                     "needs the same settings (only train.max_steps/--steps may change) — use a "
                                     "new --out for a different config")
        if run.get("data") not in (spec, data):
            raise LabelwiseError(f"{out} was trained on {run.get('data')}, not {spec}; pass the same --data to "
                                 "resume or a new --out")
        info = load_info(out)
        if dist.is_main():
            save_config(cfg, saved_cfg_path)
            if run.get("world_size") != dist.get_world_size():
                run["world_size"] = dist.get_world_size()
                atomic_write_json(out / "run.json", run)
        return method, cfg, info, spec
    if out.exists() and not out.is_dir():
        raise LabelwiseError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and (out / "checkpoints").exists():
        raise LabelwiseError(f"{out} has checkpoints but no config.yaml; delete it or pass a new --out")
    cfg = resolve_method_config(method, preset, config_files, overrides, steps)
    info = method.dataset_info(cfg, spec)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved_cfg_path)
        atomic_write_json(out / "info.json", dataclasses.asdict(info))
        from labelwise import __version__

        atomic_write_json(out / "run.json", {"method": method.name, "preset": preset or DEFAULT_PRESET,
                                             "data": spec, "world_size": dist.get_world_size(),
                                             "labelwise": __version__})
    dist.barrier()
    return method, cfg, info, spec


def train(method: str, data: str, out: str | Path, *, preset: str | None = None, config_files: Iterable = (),
          overrides: Iterable[str] = (), steps: int | None = None, hooks: list[Callable] | None = None,
          show_progress: bool = True) -> Path:
    """Train (or resume) ``method`` on ``data`` into ``out``; returns ``out``.

    Works single-process and under ``torchrun`` (joins the process group itself).
    """
    from labelwise.engine.trainer import Trainer

    dist.init_distributed()
    out = Path(out)
    m, cfg, info, spec = prepare_run(method, data, out, preset=preset, config_files=config_files,
                                     overrides=overrides, steps=steps)
    Trainer(m, cfg, out, spec, info, hooks=hooks, show_progress=show_progress).fit()
    return out


def load_run(run_dir: str | Path, device: str = "auto", checkpoint: str | Path | None = None):
    """(method, cfg, info, model in eval mode on ``device``) of a trained run."""
    import torch

    from labelwise.engine.checkpoint import load_checkpoint
    from labelwise.methods import get_method
    from labelwise.utils import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LabelwiseError(f"run folder {run_dir} does not exist; pass the --out folder of 'labelwise train'")
    run = read_run(run_dir)
    method = get_method(run["method"])
    cfg = load_config(method.config_cls, run_dir / "config.yaml")
    info = load_info(run_dir)
    path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    dev = resolve_device(device)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model(cfg, info)
    model.load_state_dict(state["model"])
    teacher = None
    if state.get("ema") is not None and method.uses_ema:
        from labelwise.blocks.ema import EMATeacher

        teacher = EMATeacher(method.ema_module(model))
        teacher.load_state_dict(state["ema"])
    model = method.inference_model(model, teacher).to(dev).eval()
    return method, cfg, info, model


def infer(run_dir: str | Path, data: str, split: str, out: str | Path, what: str | None = None,
          device: str = "auto", overrides: Iterable[str] = (), checkpoint: str | Path | None = None,
          **kw: Any) -> Path:
    """Write ``what`` (seeds | masks | segmentation | parts, per method) for ``split`` of ``data``.

    ``overrides`` (``infer.key=value``) change inference settings of the saved config for this call.
    """
    method, cfg, info, model = load_run(run_dir, device=device, checkpoint=checkpoint)
    overrides = list(overrides)
    if overrides:
        from labelwise.config import apply_overrides, parse_overrides

        for key, _ in parse_overrides(overrides):
            if not key.startswith("infer."):
                raise LabelwiseError(f"--set {key}: only infer.* settings can change at inference; the rest "
                                     f"comes from {Path(run_dir) / 'config.yaml'}")
        cfg = from_dict(method.config_cls, apply_overrides(to_dict(cfg), overrides, method.config_cls),
                        source="--set")
    what = what or method.infer_outputs[0]
    if what not in method.infer_outputs:
        raise LabelwiseError(f"method '{method.name}' cannot write --what {what}; choose one of "
                             f"{', '.join(method.infer_outputs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return method.infer(model, cfg, info, _normalise_spec(data), split, out, what, **kw)
