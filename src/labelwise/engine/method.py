"""The method contract: what a method supplies to the engine.

Subclass :class:`Method`, set ``name`` and ``config_cls`` and register the class with
:func:`labelwise.engine.registry.register_method`. The engine makes a fresh instance for
every run, so a method may keep per-run caches on ``self``.

Training (``labelwise train``; :class:`~labelwise.engine.trainer.Trainer`):

==============================  =====================================================================
hook                            what it is for
==============================  =====================================================================
``build_model(cfg, info,        the trained ``nn.Module`` (wrapped in DDP). ``pretrained=False`` when
pretrained=)``                  a finished run is loaded: every weight comes from its checkpoint,
                                so no pretrained-weights file is needed then. Build only the layers
                                the losses use (DDP needs every parameter to get a gradient unless
                                ``ddp_options`` says otherwise).
``build_state(cfg, info)``      optional ``nn.Module`` of state that lives across steps but is not
                                trained by the optimiser: memory banks, reservoirs with tags, class
                                prototypes, a DINO centre. The trainer moves it to the device,
                                checkpoints and resumes it, and keeps it outside DDP (never
                                broadcast), outside the EMA teacher and out of the inference model
                                unless ``inference_model`` puts it there. Update it identically on
                                every rank (``labelwise.dist`` gathers handle unequal counts); rank
                                0's copy is what the checkpoint holds.
``build_train_dataset``         a Dataset indexed by the sampler's ``(index, sample_seed)`` pairs
                                (usually :class:`~labelwise.engine.data.SeededDataset`); it may
                                read ``labels_dir`` / ``seeds_dir`` (``train --labels/--seeds``)
``training_step(model, batch,   forward + losses; returns ``{"loss": total, **terms_to_log}``.
ctx)``                          ``ctx.step`` / ``ctx.epoch`` allow loss staging
``after_backward(model, ctx)``  after ``backward`` (gradients unscaled when AMP fp16 or clipping is
                                on), before clipping and the optimiser step: cancel gradients
                                (DINO's frozen last layer), set per-step weight decay
``after_optimizer_step``        after the optimiser / lr-scheduler step and the EMA update: update
``(model, ctx)``                ``ctx.state`` (queues, prototypes, centres), momentum schedules
``ddp_options(cfg)``            keyword arguments for ``DistributedDataParallel``
                                (``find_unused_parameters``, ``broadcast_buffers``, ``static_graph``)
``param_groups(model, cfg)``    optimiser groups; the default puts every parameter under a module
                                called ``backbone`` (at any depth) in the backbone group
``uses_ema`` / ``ema_module`` / the trainer keeps an EMA teacher of ``ema_module(model)``, always in
``ema_momentum``                eval mode (no dropout / drop-path in its targets)
``evaluate(model, ctx)``        periodic / final metrics (every rank takes part; reduce across ranks)
==============================  =====================================================================

Inference (``labelwise infer RUN --what a,b``; :mod:`labelwise.engine.predict`):

* ``outputs``: ``{what: writer kind}``, e.g. ``{"masks": "label_png", "seeds": "cam_npz"}``;
  the first is the default. Writer kinds are in :mod:`labelwise.engine.writers`.
* ``inference_transform(cfg, info)``: runs in DataLoader workers on each dataset item and
  adds ``"input"`` (``3 x H x W`` float in [0, 1]); consecutive items of one input size
  are batched.
* ``predict(model, batch, ctx)``: one ``{what: payload}`` dict per item for every ``what``
  in ``ctx.what``, computed in one pass (seeds and masks share their CAMs).
* ``inference_model(model, teacher, state, cfg)``: the module ``predict`` receives (``cfg`` with the
  call's ``infer.*`` overrides).
* ``needs_seeds``: ``predict`` reads ``item["seeds"]`` (a refiner such as ``irn``); the
  engine adds them from ``infer --seeds SEED_DIR`` (default: the run's training seeds when
  the split is its training split).

Presets are YAML files ``labelwise/configs/<name>/<preset>.yaml`` (package data).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from labelwise.config import load_yaml
from labelwise.errors import LabelwiseError


@dataclass
class StepContext:
    """Handed to ``training_step``, the step hooks and ``evaluate``: where training is and what is around."""

    cfg: Any
    info: Any
    step: int                           # 0-based index of the optimisation step being taken
    max_steps: int                      # resolved (``train.epochs`` x steps_per_epoch when epochs are set)
    epoch: int
    steps_per_epoch: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    module: nn.Module | None = None     # the unwrapped model (the ``model`` argument may be DDP-wrapped)
    teacher: nn.Module | None = None    # EMA teacher (``uses_ema``), in eval mode
    state: nn.Module | None = None      # the method's state module (``build_state``), checkpointed
    optimizer: torch.optim.Optimizer | None = None
    run_dir: Path | None = None
    data_spec: str = ""

    @property
    def progress(self) -> float:
        """Fraction of training done before this step, in [0, 1)."""
        return self.step / max(self.max_steps, 1)


@dataclass
class PredictContext:
    """Handed to ``predict``: the settings of this inference pass."""

    cfg: Any
    info: Any
    what: tuple[str, ...]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    state: nn.Module | None = None


def val_shard(ctx: StepContext):
    """``(dataset, indices)`` of this rank's share of ``data.val_split`` for a method's periodic
    ``evaluate`` (at most ``data.eval_max_images`` images, strided over ranks), or ``None`` when
    there is no validation split or it has no masks: nothing to report."""
    from labelwise.data.spec import build_dataset

    cfg = ctx.cfg
    try:
        ds = build_dataset(ctx.data_spec, cfg.data.val_split)
    except LabelwiseError:
        return None
    n = len(ds) if not cfg.data.eval_max_images else min(len(ds), cfg.data.eval_max_images)
    if n == 0 or ds.load_mask(0) is None:
        return None
    return ds, range(ctx.rank, n, ctx.world_size)


def image_to_input(item: dict) -> dict:
    """The default inference transform: ``item["input"]`` = the RGB image as ``3 x H x W`` float in [0, 1]."""
    img = np.ascontiguousarray(item["image"])
    return {**item, "input": torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)}


class Method:
    name: str = ""
    config_cls: type = None  # type: ignore[assignment]
    description: str = ""
    # --what name -> writer kind (labelwise.engine.writers.WRITERS); the first is the default.
    outputs: dict[str, str] = {}
    # Whether the trainer keeps an EMA teacher of ``ema_module(model)``.
    uses_ema: bool = False
    # The synthetic testbed (``labelwise data synth KIND``) the ``cpu`` preset is built for.
    testbed: str = "cooc"
    # Whether ``predict`` reads each image's CAM seeds (``item["seeds"]``): ``labelwise infer
    # --seeds SEED_DIR``, by default the run's own ``--seeds`` folder on its training split.
    needs_seeds: bool = False
    # Whether a step may accumulate gradients over several forwards (train.batch_per_gpu below the
    # per-rank share of train.batch_size). False for a method whose training_step leaves state for
    # after_optimizer_step (a reservoir's keys, a centre's codes): only the last forward's would count.
    supports_accumulation: bool = True
    # Whether inference ignores the dataset's classes (a method trained without labels, e.g. OAP):
    # then ``labelwise infer`` runs on any dataset, whatever its class list.
    label_free: bool = False
    # Config keys outside ``infer.*`` that only change inference and so may be changed by
    # ``labelwise infer --set`` (e.g. CoCal's ``cocal.path_inference``).
    inference_keys: tuple[str, ...] = ()

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

    def writer_options(self, cfg, what: str) -> dict:
        """Keyword arguments of the writer of output ``what`` (e.g. the k of a clustering writer)."""
        return {}

    # ------------------------------------------------------------------ data
    def load_split(self, cfg, spec: str, split: str, *, labels_dir: str | Path | None = None,
                   seeds_dir: str | Path | None = None):
        """Split ``split`` of ``spec`` honouring ``data.skip_bad``, with another stage's label PNGs
        (``labels_dir``) in place of the dataset's masks and its CAM seeds (``seeds_dir``) added."""
        from labelwise.data import build_dataset
        from labelwise.data.overrides import with_stage_inputs

        ds = build_dataset(spec, split, skip_bad=cfg.data.skip_bad)
        return with_stage_inputs(ds, labels_dir=labels_dir, seeds_dir=seeds_dir)

    def dataset_info(self, cfg, spec: str):
        """DatasetInfo saved in RUN_DIR/info.json (class names)."""
        from labelwise.data import build_dataset

        return build_dataset(spec, cfg.data.train_split).info

    # ------------------------------------------------------------------ training
    def build_model(self, cfg, info, *, pretrained: bool = True) -> nn.Module:
        raise NotImplementedError

    def build_state(self, cfg, info) -> nn.Module | None:
        return None

    def build_train_dataset(self, cfg, spec: str, info=None, *, labels_dir: Path | None = None,
                            seeds_dir: Path | None = None):
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    def param_groups(self, model: nn.Module, cfg) -> list[dict]:
        """``[{"name", "params": [(name, p)], "lr_mult"}]``; ``lr_mult=None`` = the backbone multiplier."""
        from labelwise.engine.optim import default_param_groups

        return default_param_groups(model)

    def ddp_options(self, cfg) -> dict:
        return {"find_unused_parameters": False, "broadcast_buffers": True, "static_graph": False}

    def training_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module, ctx: StepContext) -> None:
        pass

    def ema_module(self, model: nn.Module) -> nn.Module:
        return model

    def ema_momentum(self, cfg, step: int, max_steps: int) -> float:
        return 0.999

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict | None:
        return None

    # ------------------------------------------------------------------ inference
    def inference_model(self, model: nn.Module, teacher: nn.Module | None, state: nn.Module | None,
                        cfg=None) -> nn.Module:
        return model

    def inference_transform(self, cfg, info) -> Callable[[dict], dict]:
        return image_to_input

    def export_module(self, model: nn.Module, cfg) -> nn.Module | None:
        """``labelwise export --format onnx/torchscript``: a module mapping images ``B x 3 x H x W``
        in [0, 1] to the network's raw maps (one tensor), or None when the method has none."""
        return None

    def predict(self, model: nn.Module, batch: dict, ctx: PredictContext) -> list[dict[str, Any]]:
        raise NotImplementedError
