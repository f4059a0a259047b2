"""The one training loop every method uses.

``Trainer(method, cfg, run_dir, data_spec, info).fit()``:

* distributed: under ``torchrun`` (``labelwise.dist.init_distributed``: gloo on CPU, nccl
  on GPU) the model is wrapped in DDP and :class:`~labelwise.engine.data.ShardedSampler`
  gives each rank its shard of a per-epoch permutation; ``train.batch_size`` is per rank;
* AMP (``train.amp`` bf16/fp16, fp16 with a GradScaler), gradient clipping, per-step
  warmup + poly/cosine schedule, parameter groups (backbone lr multiplier, no weight decay
  on norms/biases/pos-embeds/tokens), optional EMA teacher, periodic evaluation;
* seeding: the model is built under ``seed`` (identical on every rank), training-time
  randomness uses ``seed + rank``; augmentation uses per-sample generators (see
  ``engine/data.py``); the DataLoader has its own generator so the global RNG is never
  consumed by data loading;
* checkpoints (``train.ckpt_every`` and at the end) hold everything needed to continue
  bit-identically (CPU): model/optimiser/scheduler/scaler/EMA states, every rank's RNG
  states and the data position. ``fit`` resumes from ``RUN_DIR/checkpoints/last.pt``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from labelwise import dist
from labelwise.engine.checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from labelwise.engine.data import ShardedSampler, batch_len, to_device, worker_init_fn
from labelwise.engine.logging import RunLogger
from labelwise.engine.method import Method, StepContext
from labelwise.engine.optim import build_optimizer, build_param_groups, build_scheduler
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json
from labelwise.utils import progress, resolve_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def train_device(name: str) -> torch.device:
    """``train.device`` -> a device; under torchrun ``cuda``/``auto`` mean ``cuda:LOCAL_RANK``."""
    dev = resolve_device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LabelwiseError(f"config key 'train.device' is {name!r} but CUDA is not available; use cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if dist.is_dist() else torch.cuda.current_device())
    return dev


class Trainer:
    def __init__(self, method: Method, cfg, run_dir: str | Path, data_spec: str, info, *,
                 hooks: list[Callable] | None = None, show_progress: bool = True):
        self.method, self.cfg, self.info = method, cfg, info
        self.run_dir = Path(run_dir)
        self.data_spec = data_spec
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
            return contextlib.nullcontext(), None
        if amp == "fp16" and self.device.type != "cuda":
            raise LabelwiseError("config key 'train.amp' is fp16 but training runs on the CPU; use bf16 or none")
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype), dtype

    def setup(self) -> None:
        cfg, method = self.cfg, self.method
        tcfg = cfg.train
        seed_everything(tcfg.seed)  # identical model init on every rank
        self.module: nn.Module = method.build_model(cfg, self.info).to(self.device)
        self.teacher = None
        if method.uses_ema:
            from labelwise.blocks.ema import EMATeacher

            self.teacher = EMATeacher(method.ema_module(self.module),
                                      momentum=lambda s: method.ema_momentum(self.cfg, s, self.cfg.train.max_steps))
        groups = build_param_groups(method.param_groups(self.module, cfg), cfg.optim)
        if not groups:
            raise LabelwiseError(f"method '{method.name}' has no trainable parameters with this config")
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tcfg.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(tcfg.amp == "fp16"))
        self.autocast, _ = self._amp()

        from labelwise.data.spec import skip_report_dir

        with skip_report_dir(self.run_dir if dist.is_main() else None):
            dataset = method.build_train_dataset(cfg, self.data_spec, self.info)
        self.sampler = ShardedSampler(len(dataset), tcfg.batch_size, rank=self.rank, world_size=self.world,
                                      seed=tcfg.seed)
        if self.sampler.batches_per_epoch == 0:
            raise LabelwiseError(f"training split has {len(dataset)} images, fewer than train.batch_size x world "
                                 f"size = {tcfg.batch_size * self.world}; lower train.batch_size")
        gen = torch.Generator()
        gen.manual_seed(tcfg.seed + self.rank)
        self.loader = DataLoader(dataset, batch_size=tcfg.batch_size, sampler=self.sampler,
                                 num_workers=tcfg.num_workers, collate_fn=method.collate, drop_last=True,
                                 worker_init_fn=worker_init_fn, generator=gen,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=False)
        self.logger = RunLogger(self.run_dir, enabled=dist.is_main())
        self._resume()
        if self.step == 0:
            seed_everything(tcfg.seed + self.rank)  # training-time randomness differs per rank
        self.model: nn.Module = self.module
        if dist.is_dist():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids,
                                                             find_unused_parameters=getattr(method, "find_unused_parameters", False))

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            self.logger.truncate_after(0)
            return
        state = load_checkpoint(path, map_location=self.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.teacher is not None and state.get("ema") is not None:
            self.teacher.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        rngs = state.get("rng") or []
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
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world, "method": self.method.name,
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.teacher.state_dict() if self.teacher is not None else None,
            "rng": rngs,
        }

    def save(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if dist.is_main():
            save_checkpoint(self.run_dir, state, self.step, self.cfg.train.keep_last)
        dist.barrier()

    def context(self) -> StepContext:
        return StepContext(cfg=self.cfg, info=self.info, step=self.step, max_steps=self.cfg.train.max_steps,
                           epoch=self.epoch, device=self.device, rank=self.rank, world_size=self.world,
                           module=self.module, teacher=self.teacher, run_dir=self.run_dir,
                           data_spec=self.data_spec, state=self._scratch)

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
                import json

                try:
                    hist = [h for h in json.loads(path.read_text()).get("history", []) if h.get("step", 0) < self.step]
                except (ValueError, AttributeError):
                    hist = []
            atomic_write_json(path, {"final": metrics, "history": hist + [metrics]})
            self.logger.log_eval(metrics, self.step)
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict | None:
        self._scratch: dict = {}
        self.setup()
        tcfg = self.cfg.train
        max_steps = tcfg.max_steps
        last_metrics = None
        if self.step >= max_steps:
            if dist.is_main():
                print(f"labelwise: {self.run_dir} already trained for {self.step} steps (train.max_steps="
                      f"{max_steps}); pass --steps N to train longer", flush=True)
            self.logger.close()
            return None
        self.module.train()
        bar = progress(range(self.step, max_steps), desc=f"train {self.method.name}", total=max_steps - self.step) \
            if self.show_progress else None
        window: dict[str, float] = {}
        win_steps, win_images, win_t0 = 0, 0, time.perf_counter()
        bpe = self.sampler.batches_per_epoch
        try:
            while self.step < max_steps:
                if self.batch_in_epoch >= bpe:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                for batch in self.loader:
                    losses = self.train_step(batch)
                    n = batch_len(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    for k, v in losses.items():
                        window[k] = window.get(k, 0.0) + v
                    win_steps += 1
                    win_images += n
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
                    if self.step % tcfg.log_every == 0 or self.step == max_steps:
                        self._log(window, win_steps, win_images, time.perf_counter() - win_t0)
                        window, win_steps, win_images, win_t0 = {}, 0, 0, time.perf_counter()
                    if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step != max_steps:
                        last_metrics = self.evaluate()
                    if self.step % tcfg.ckpt_every == 0 or self.step == max_steps:
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

    def train_step(self, batch) -> dict[str, float]:
        tcfg = self.cfg.train
        batch = to_device(batch, self.device)
        ctx = self.context()
        with self.autocast:
            out = self.method.training_step(self.model, batch, self.step, ctx)
        if "loss" not in out:
            raise RuntimeError(f"method '{self.method.name}' training_step returned no 'loss'")
        loss = out["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise LabelwiseError(f"loss is {loss.item()} at step {self.step}; lower optim.lr or set train.grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tcfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), tcfg.grad_clip)
        self._step_lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.teacher is not None:
            self.teacher.update(self.method.ema_module(self.module), self.step)
        return {k: float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
                for k, v in out.items()}

    def _log(self, window: dict, steps: int, images: int, elapsed: float) -> None:
        keys = sorted(window)
        vals = torch.tensor([window[k] / max(steps, 1) for k in keys] + [float(images)], dtype=torch.float64)
        vals = dist.all_reduce_sum(vals)
        w = self.world
        rec = {"step": self.step}
        rec.update({k: float(vals[i]) / w for i, k in enumerate(keys)})
        # head lr (group with the largest multiplier) and the backbone's
        lrs = self._step_lrs  # the lrs used by the last step (the scheduler has moved on since)
        rec["lr"] = max(lrs.values())
        if "backbone" in lrs:
            rec["lr_backbone"] = lrs["backbone"]
        rec["epoch"] = self.epoch
        rec["images_per_s"] = float(vals[-1]) / max(elapsed, 1e-9)
        if not all(math.isfinite(v) for v in rec.values() if isinstance(v, float)):
            rec = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in rec.items()}
        self.logger.log(rec)
