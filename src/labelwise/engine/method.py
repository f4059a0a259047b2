"""What a method supplies to the engine (subclass :class:`Method`, register it with
:func:`labelwise.methods.register_method`).

Required: ``name``, ``config_cls`` (a :class:`~labelwise.engine.config.BaseConfig`
subclass), ``build_model``, ``build_train_dataset``, ``training_step``, ``infer``.
Presets are YAML files ``labelwise/configs/<name>/<preset>.yaml`` (package data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labelwise.config import load_yaml
from labelwise.errors import LabelwiseError


@dataclass
class StepContext:
    """Handed to ``training_step`` / ``evaluate``: where we are and what is around."""

    cfg: Any
    info: Any
    step: int = 0                       # 0-based index of the optimisation step being taken
    max_steps: int = 1
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    module: nn.Module | None = None     # the unwrapped model (``model`` may be DDP-wrapped)
    teacher: nn.Module | None = None    # EMA teacher when the method asks for one
    run_dir: Path | None = None
    data_spec: str = ""
    state: dict = field(default_factory=dict)  # free scratch space for the method (not checkpointed)


class Method:
    name: str = ""
    config_cls: type = None  # type: ignore[assignment]
    description: str = ""
    # ``--what`` values this method's infer accepts; the first is the default.
    infer_outputs: tuple[str, ...] = ("masks",)
    # Whether the trainer should keep an EMA teacher of ``ema_module(model)``.
    uses_ema: bool = False

    # ------------------------------------------------------------------ presets
    def preset_dir(self):
        return resources.files("labelwise") / "configs" / self.name

    def presets(self) -> list[str]:
        d = self.preset_dir()
        try:
            return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def load_preset(self, preset: str) -> dict:
        names = self.presets()
        if preset not in names:
            raise LabelwiseError(f"method '{self.name}' has no preset '{preset}'; available presets: "
                                 f"{', '.join(names) or '(none)'}")
        with resources.as_file(self.preset_dir() / f"{preset}.yaml") as path:
            return load_yaml(path)

    # ------------------------------------------------------------------ training
    def load_split(self, cfg, spec: str, split: str):
        """Split ``split`` of ``spec``, honouring ``data.skip_bad``."""
        from labelwise.data import build_dataset

        return build_dataset(spec, split, skip_bad=cfg.data.skip_bad)

    def dataset_info(self, cfg, spec: str):
        """DatasetInfo saved in RUN_DIR/info.json (class names)."""
        from labelwise.data import build_dataset

        return build_dataset(spec, cfg.data.train_split).info

    def build_model(self, cfg, info) -> nn.Module:
        raise NotImplementedError

    def build_train_dataset(self, cfg, spec: str, info=None):
        """A Dataset indexed by the ``(index, sample_seed)`` pairs of the engine's sampler
        (usually a :class:`labelwise.engine.data.SeededDataset`)."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    def param_groups(self, model: nn.Module, cfg) -> list[dict]:
        """``[{"name", "params": [(name, p)], "lr_mult"}]``; ``lr_mult=None`` = backbone multiplier."""
        from labelwise.engine.optim import default_param_groups

        return default_param_groups(model)

    def training_step(self, model: nn.Module, batch: Any, step: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Forward + losses; return a dict with the total under ``"loss"`` (plus terms to log)."""
        raise NotImplementedError

    def ema_module(self, model: nn.Module) -> nn.Module:
        """The sub-module the EMA teacher tracks (``uses_ema=True``)."""
        return model

    def ema_momentum(self, cfg, step: int, max_steps: int) -> float:
        return 0.999

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict | None:
        """Periodic / final evaluation (called on every rank; reduce across ranks). None = skip."""
        return None

    # ------------------------------------------------------------------ inference
    def inference_model(self, model: nn.Module, teacher: nn.Module | None) -> nn.Module:
        return model

    def infer(self, model: nn.Module, cfg, info, spec: str, split: str, out: Path, what: str, **kw) -> Path:
        raise NotImplementedError
