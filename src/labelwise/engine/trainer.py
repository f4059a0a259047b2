"""The one training loop every method uses.

``Trainer(method, cfg, run_dir, data_spec, info).fit()``:

* distributed: under ``torchrun`` (``labelwise.dist.init_distributed``: gloo on CPU, nccl
  on GPU) the model is wrapped in DDP with the method's ``ddp_options`` (optionally with
  SyncBatchNorm, ``train.sync_bn``) and :class:`~labelwise.engine.data.ShardedSampler`
  gives each rank its shard of a per-epoch permutation;
* batch: ``train.batch_size`` is the global batch of one optimisation step (all ranks). Each
  rank forwards ``train.batch_per_gpu`` images at a time (default: its share) and accumulates
  the gradients of ``batch_size / (batch_per_gpu x world)`` forwards (:func:`split_batch`); the
  samples of a step are the same whatever the split, so 1 GPU with accumulation, N GPUs and one
  large batch see the same data;
* length: ``train.max_steps`` optimisation steps, or ``train.epochs`` passes over the
  training split (``max_steps = epochs x steps_per_epoch``);
* one step: (``training_step`` under autocast -> ``backward``, per micro-batch) -> (unscale) ->
  ``after_backward`` -> gradient clipping -> optimiser step -> lr schedule -> EMA teacher
  update -> ``after_optimizer_step``. Losses stay on the device between log steps (no
  host sync per step; :class:`~labelwise.engine.logging.LossWindow`); a non-finite loss
  stops the run at the next log or checkpoint;
* the method's state module (``build_state``) and the EMA teacher live beside the model,
  not inside it: neither is wrapped by DDP, the teacher never copies the state, and both
  are checkpointed;
* seeding: the model (and state) are built under ``seed`` (identical on every rank);
  training-time randomness uses ``seed + rank``; augmentation uses per-sample generators
  (``engine/data.py``); the DataLoader has its own generator so the global RNG is never
  consumed by data loading;
* checkpoints (``train.ckpt_every`` and at the end) hold everything needed to continue
  bit-identically (CPU): model / state / optimiser / scheduler / scaler / EMA, every rank's
  RNG states and the data position. ``fit`` resumes from ``RUN_DIR/checkpoints/last.pt``.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from labelwise import dist
from labelwise.config import to_dict
from labelwise.engine.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, load_module_state, restore_rng,
                                        save_checkpoint)
from labelwise.engine.data import ShardedSampler, batch_len, to_device, worker_init_fn
from labelwise.engine.logging import LossWindow, RunLogger
from labelwise.engine.method import Method, StepContext
from labelwise.engine.optim import build_optimizer, build_param_groups, build_scheduler
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json
from labelwise.utils import progress, resolve_device

DDP_OPTIONS = ("find_unused_parameters", "broadcast_buffers", "static_graph", "gradient_as_bucket_view")


def split_batch(batch_size: int, batch_per_gpu: int | None, world: int) -> tuple[int, int]:
    """``(images per rank and forward, forwards accumulated per step)`` for a global ``batch_size``;
    a one-line error when it does not divide."""
    if batch_per_gpu is None:
        if batch_size % world:
            raise LabelwiseError(f"train.batch_size {batch_size} does not divide over {world} ranks; pick a multiple "
                                 f"of {world} or set train.batch_per_gpu")
        return batch_size // world, 1
    if batch_size % (batch_per_gpu * world):
        raise LabelwiseError(f"train.batch_size {batch_size} is not a multiple of train.batch_per_gpu {batch_per_gpu} "
                             f"x {world} rank(s); pick values whose product divides it")
    return batch_per_gpu, batch_size // (batch_per_gpu * world)


def _ddp_kwargs(opts: dict) -> dict:
    """Newer torch renames ``broadcast_buffers=True`` to ``forward_sync_buffers=True`` (and warns on
    the old name at every start); pass whichever this torch knows. ``False`` keeps the old name:
    ``forward_sync_buffers=False`` would still sync buffers at init."""
    import inspect

    opts = dict(opts)
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params and opts.get("broadcast_buffers", True) is True:
        opts.pop("broadcast_buffers", None)
        opts["forward_sync_buffers"] = True
    return opts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def train_device(name: str) -> torch.device:
    """``train.device`` -> a device; under torchrun ``cuda``/``auto`` mean ``cuda:LOCAL_RANK``."""
    try:
        dev = resolve_device(name)
    except LabelwiseError as e:
        raise LabelwiseError(f"config key 'train.device': {e}") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class Trainer:
    def __init__(self, method: Method, cfg, run_dir: str | Path, data_spec: str, info, *,
                 labels_dir: str | Path | None = None, seeds_dir: str | Path | None = None,
                 hooks: list[Callable] | None = None, show_progress: bool = True):
        self.method, self.cfg, self.info = method, cfg, info
        self.run_dir = Path(run_dir)
        self.data_spec = data_spec
        self.labels_dir, self.seeds_dir = labels_dir, seeds_dir
        self.hooks = list(hooks or [])  # hook(trainer, step) after each step (tests inject failures here)
        self.show_progress = show_progress
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = train_device(cfg.train.device)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    # ------------------------------------------------------------------ setup
    def _amp(self):
        amp = self.cfg.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        if amp == "fp16" and self.device.type != "cuda":
            raise LabelwiseError("config key 'train.amp' is fp16 but training runs on the CPU; use bf16 or none")
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def setup(self) -> None:
        cfg, method = self.cfg, self.method
        tcfg = cfg.train
        seed_everything(tcfg.seed)  # identical model init on every rank
        self.module: nn.Module = method.build_model(cfg, self.info, pretrained=True).to(self.device)
        state = method.build_state(cfg, self.info)
        self.state: nn.Module | None = state.to(self.device) if state is not None else None
        if tcfg.sync_bn and dist.is_dist():
            if self.device.type != "cuda":
                raise LabelwiseError("config key 'train.sync_bn' is true but training runs on the CPU (gloo); "
                                     "SyncBatchNorm needs CUDA — set train.sync_bn=false")
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.teacher = None
        if method.uses_ema:
            from labelwise.blocks.ema import EMATeacher

            self.teacher = EMATeacher(method.ema_module(self.module),
                                      momentum=lambda s: method.ema_momentum(self.cfg, s, self.max_steps))

        from labelwise.data.spec import skip_report_dir

        with skip_report_dir(self.run_dir if dist.is_main() else None):
            dataset = method.build_train_dataset(cfg, self.data_spec, self.info, labels_dir=self.labels_dir,
                                                 seeds_dir=self.seeds_dir)
        self.micro_batch, self.accumulate = split_batch(tcfg.batch_size, tcfg.batch_per_gpu, self.world)
        if self.accumulate > 1 and not method.supports_accumulation:
            raise LabelwiseError(f"method '{method.name}' updates its state once per forward and cannot accumulate "
                                 f"gradients (train.batch_size {tcfg.batch_size} = {self.accumulate} x "
                                 f"train.batch_per_gpu {self.micro_batch} x {self.world} rank(s)); use more GPUs or "
                                 "a larger train.batch_per_gpu, or lower train.batch_size")
        self.sampler = ShardedSampler(len(dataset), self.micro_batch, rank=self.rank, world_size=self.world,
                                      seed=tcfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch // self.accumulate
        if self.steps_per_epoch == 0:
            raise LabelwiseError(f"training split has {len(dataset)} images, fewer than train.batch_size = "
                                 f"{tcfg.batch_size}; lower train.batch_size")
        self.max_steps = tcfg.epochs * self.steps_per_epoch if tcfg.epochs > 0 else tcfg.max_steps

        groups = build_param_groups(method.param_groups(self.module, cfg), cfg.optim)
        if not groups:
            raise LabelwiseError(f"method '{method.name}' has no trainable parameters with this config")
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(tcfg.amp == "fp16"))
        self.autocast = self._amp()

        gen = torch.Generator()
        gen.manual_seed(tcfg.seed + self.rank)
        self.loader = DataLoader(dataset, batch_size=self.micro_batch, sampler=self.sampler,
                                 num_workers=tcfg.num_workers, collate_fn=method.collate, drop_last=True,
                                 worker_init_fn=worker_init_fn, generator=gen,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.logger = RunLogger(self.run_dir, enabled=dist.is_main(), max_steps=self.max_steps,
                                wandb_project=tcfg.wandb_project, config=to_dict(self.cfg))
        self.window = LossWindow()
        self._resume()
        if self.step == 0:
            seed_everything(tcfg.seed + self.rank)  # training-time randomness differs per rank
        self.model: nn.Module = self.module
        if dist.is_dist():
            opts = dict(method.ddp_options(cfg))
            unknown = sorted(set(opts) - set(DDP_OPTIONS))
            if unknown:
                raise ValueError(f"method '{method.name}' ddp_options has unknown keys {unknown}; "
                                 f"valid: {', '.join(DDP_OPTIONS)}")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids, **_ddp_kwargs(opts))

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            self.logger.truncate_after(0)
            return
        state = load_checkpoint(path, map_location=self.device)
        load_module_state(self.module, state["model"], path)
        if self.state is not None:
            if state.get("state") is None:
                raise LabelwiseError(f"{path}: holds no '{self.method.name}' state module; it was written by "
                                     "another version of the method — use a new --out")
            load_module_state(self.state, state["state"], path, "state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.teacher is not None and state.get("ema") is not None:
            load_module_state(self.teacher, state["ema"], path, "EMA teacher")
        self.step = int(state["step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        rngs = state.get("rng") or []
        windows = state.get("log_window") or []
        if len(windows) == self.world:  # the loss terms since the last log step (per rank)
            self.window.load_state_dict(windows[self.rank], self.device)
        if len(rngs) == self.world:
            restore_rng(rngs[self.rank])
        else:  # different world size: data order is still exact, model-side randomness is reseeded
            seed_everything(self.cfg.train.seed + self.rank + 7919 * self.step)
        self.logger.truncate_after(self.step)
        if dist.is_main():
            print(f"labelwise: resuming {self.run_dir} from step {self.step}", flush=True)

    # ------------------------------------------------------------------ checkpoints / eval
    def state_dict(self) -> dict:
        rngs = dist.all_gather_object(capture_rng())
        windows = dist.all_gather_object(self.window.state_dict())
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world, "method": self.method.name, "max_steps": self.max_steps,
            "model": self.module.state_dict(),
            "state": self.state.state_dict() if self.state is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.teacher.state_dict() if self.teacher is not None else None,
            "rng": rngs, "log_window": windows,
        }

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if dist.is_main():
            save_checkpoint(self.run_dir, state, self.step, self.cfg.train.keep_last)
        dist.barrier()

    def context(self) -> StepContext:
        return StepContext(cfg=self.cfg, info=self.info, step=self.step, max_steps=self.max_steps,
                           epoch=self.epoch, steps_per_epoch=self.steps_per_epoch, device=self.device,
                           rank=self.rank, world_size=self.world, module=self.module, teacher=self.teacher,
                           state=self.state, optimizer=self.optimizer, run_dir=self.run_dir,
                           data_spec=self.data_spec)

    def evaluate(self) -> dict | None:
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                metrics = self.method.evaluate(self.module, self.context())
        finally:
            self.module.train(was_training)
        if metrics is None:
            return None
        metrics = {"step": self.step, **metrics}
        if dist.is_main():
            path = self.run_dir / "metrics.json"
            hist = []
            if path.is_file():
                try:
                    hist = [h for h in json.loads(path.read_text()).get("history", []) if h.get("step", 0) < self.step]
                except (ValueError, AttributeError):
                    hist = []
            atomic_write_json(path, {"final": metrics, "history": hist + [metrics]})
            self.logger.log_eval(metrics, self.step)
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict | None:
        self.setup()
        tcfg = self.cfg.train
        max_steps = self.max_steps
        last_metrics = None
        if self.step >= max_steps:
            if dist.is_main():
                print(f"labelwise: {self.run_dir} already trained for {self.step} steps (of {max_steps}); pass "
                      "--steps N (or --epochs N) to train longer", flush=True)
            self.logger.close()
            return None
        self.module.train()
        bar = progress(range(self.step, max_steps), desc=f"train {self.method.name}", total=max_steps - self.step) \
            if self.show_progress else None
        try:
            while self.step < max_steps:
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.sampler.set_position(self.epoch, self.batch_in_epoch * self.accumulate)
                micro: list = []
                for batch in self.loader:
                    micro.append(batch)
                    if len(micro) < self.accumulate:
                        continue
                    self.window.add(self.train_step(micro), sum(batch_len(b) for b in micro))
                    micro = []
                    self.step += 1
                    self.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    if self.step % tcfg.log_every == 0 or self.step == max_steps:
                        rec = self._log()
                        if bar is not None:
                            bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                    if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step != max_steps:
                        last_metrics = self.evaluate()
                    if self.step % tcfg.ckpt_every == 0 or self.step == max_steps:
                        if self.window.steps:  # never checkpoint a diverged model
                            self.window.reduce(self.step)
                        self.save()  # after eval, so the saved RNG state is the one training continues with
                    for hook in self.hooks:
                        hook(self, self.step)
                    if self.step >= max_steps:
                        break
            if tcfg.eval_at_end or tcfg.eval_every:
                last_metrics = self.evaluate()
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        return last_metrics

    def train_step(self, batches: list) -> dict:
        """One optimiser step over ``batches``, the step's micro-batches: each forward's loss divided by
        their number, gradients accumulated (DDP syncs them on the last one). Returns the mean of each
        logged term over the micro-batches."""
        tcfg, method = self.cfg.train, self.method
        self.optimizer.zero_grad(set_to_none=True)
        outs = []
        for k, batch in enumerate(batches):
            batch = to_device(batch, self.device)
            ctx = self.context()
            last = k == len(batches) - 1
            no_sync = self.model.no_sync() if not last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with no_sync:
                with self.autocast:
                    out = method.training_step(self.model, batch, ctx)
                if "loss" not in out:
                    raise RuntimeError(f"method '{method.name}' training_step returned no 'loss'")
                loss = out["loss"] if len(batches) == 1 else out["loss"] / len(batches)
                self.scaler.scale(loss).backward()
            outs.append(out)
        out = outs[0] if len(outs) == 1 else {
            key: torch.stack([o[key].detach().float().mean() if isinstance(o[key], torch.Tensor)
                              else torch.tensor(float(o[key])) for o in outs]).mean()
            for key in outs[0] if all(key in o for o in outs)}
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # hooks and clipping see the true gradients
        method.after_backward(self.model, ctx)
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), tcfg.grad_clip)
        self._step_lrs = [g["lr"] for g in self.optimizer.param_groups]  # the lrs this step uses
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.teacher is not None:
            self.teacher.update(method.ema_module(self.module), self.step)
        method.after_optimizer_step(self.model, ctx)
        return out

    def _log(self) -> dict:
        means = self.window.reduce(self.step)
        rec: dict = {"step": self.step}
        rec.update({k: v for k, v in means.items() if k != "_images"})
        groups = self.optimizer.param_groups
        lrs = dict(zip((g.get("name", str(i)) for i, g in enumerate(groups)), self._step_lrs))
        rec["lr"] = max(lrs.values())
        if "backbone" in lrs:
            rec["lr_backbone"] = lrs["backbone"]
        rec["epoch"] = self.epoch
        rec["images_per_s"] = means["_images"] / max(time.perf_counter() - self.window.t0, 1e-9)
        self.logger.log(rec)
        self.window.reset()
        return rec
