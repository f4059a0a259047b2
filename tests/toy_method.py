"""Tiny deterministic methods for testing the engine itself (a plugin: not part of the wheel).

Importing this module registers them. Subprocesses (``torchrun``, ``mp.spawn``) find them
through ``LABELWISE_PLUGINS=toy_method`` with this folder on ``PYTHONPATH``.

* ``_toy``: a BN-free conv net regressing a fixed per-pixel target from synthetic images
  generated in memory, with per-sample augmentation (flip + noise from the sampler's
  generator) and optional model-side randomness (``model.noise``, from the global torch
  RNG) so resume tests also cover RNG restoration.
* ``_toy_staged``: ``_toy`` plus everything the method contract carries for SeCo / OAP /
  CoCal-like methods: an EMA teacher (with dropout in the network, so its eval mode
  matters), a state module (a FIFO memory bank fed with a *filtered* set of teacher
  embeddings -- unequal counts per rank -- and a DINO-style centre averaged over ranks), a
  loss term staged in at ``loss.stage_step`` (so its projection head gets no gradient
  before: ``find_unused_parameters``), an ``after_backward`` hook that cancels the
  projection's gradients during the first ``loss.freeze_proj_epochs`` epochs, and an
  ``after_optimizer_step`` hook that updates the state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelwise import dist
from labelwise.blocks.memory_bank import FIFOQueue
from labelwise.config import param
from labelwise.data.base import DatasetInfo
from labelwise.engine.config import BaseConfig
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method
from labelwise.engine.registry import register_method


@dataclass
class ToyModelConfig:
    width: int = param(8, range=(1, None))
    noise: float = param(0.0, range=(0.0, None), help="std of input noise drawn from the global torch RNG")
    dropout: float = param(0.0, range=(0.0, 1.0), help="dropout before the head")


@dataclass
class ToyLossConfig:
    stage_step: int = param(3, range=(0, None), help="the contrastive term starts at this step")
    freeze_proj_epochs: int = param(1, range=(0, None), help="epochs whose projection gradients are cancelled")
    queue_size: int = param(64, range=(1, None))
    centre_momentum: float = param(0.9, range=(0.0, 1.0))
    temperature: float = param(0.2, range=(0.01, None))


@dataclass
class ToyConfig(BaseConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    loss: ToyLossConfig = field(default_factory=ToyLossConfig)
    n_images: int = param(24, range=(1, None))


class ToyNet(nn.Module):
    def __init__(self, width: int, dropout: float = 0.0, emb_dim: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv2d(width, 1, 1)
        self.proj = nn.Linear(width, emb_dim)

    def forward(self, x):
        """``(per-pixel prediction B x 1 x H x W, image embedding B x emb_dim)``."""
        f = self.drop(F.gelu(self.backbone(x)))
        return self.head(f), self.proj(f.mean((2, 3)))


class ToyState(nn.Module):
    """What lives across steps: a memory bank of teacher embeddings and their centre."""

    def __init__(self, queue_size: int, dim: int = 4):
        super().__init__()
        self.queue = FIFOQueue(queue_size, dim)
        self.register_buffer("centre", torch.zeros(dim))


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 16):
        rng = np.random.default_rng(1234)
        self.images = rng.random((n, size, size, 3), dtype=np.float32)
        self.targets = (self.images.mean(-1) > 0.5).astype(np.float32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "target": self.targets[i], "index": i}


def augment(item, rng: np.random.Generator):
    img, tgt = item["image"], item["target"]
    if rng.random() < 0.5:
        img, tgt = img[:, ::-1], tgt[:, ::-1]
    img = img + rng.normal(0, 0.05, img.shape).astype(np.float32)
    return {"image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1),
            "target": torch.from_numpy(np.ascontiguousarray(tgt))[None], "index": item["index"]}


@register_method
class ToyMethod(Method):
    name = "_toy"
    config_cls = ToyConfig
    outputs = {"masks": "label_png"}

    def presets(self):
        return ["cpu"]

    def load_preset(self, preset):
        return {"train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "ckpt_every": 2},
                "optim": {"lr": 1e-2, "warmup_steps": 2}}

    def dataset_info(self, cfg, spec):
        return DatasetInfo(class_names=["background", "thing"])

    def build_model(self, cfg, info, *, pretrained=True):
        return ToyNet(cfg.model.width, cfg.model.dropout)

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        return SeededDataset(Images(cfg.n_images), augment)

    def ddp_options(self, cfg):
        # proj is unused by _toy (and before stage_step by _toy_staged)
        return {**super().ddp_options(cfg), "find_unused_parameters": True}

    def training_step(self, model, batch, ctx):
        x = batch["image"]
        if ctx.cfg.model.noise > 0:
            x = x + ctx.cfg.model.noise * torch.randn_like(x)
        pred, emb = model(x)
        mse = F.mse_loss(pred, batch["target"])
        l1 = (pred - batch["target"]).abs().mean().detach()
        self._student_emb = emb
        return {"loss": mse, "l1": l1}

    def evaluate(self, model, ctx):
        ds = Images(8)
        x = torch.from_numpy(ds.images).permute(0, 3, 1, 2)
        return {"mse": float(F.mse_loss(model(x)[0], torch.from_numpy(ds.targets)[:, None]))}

    def predict(self, model, batch, ctx):
        pred = model(batch["inputs"])[0][:, 0] > 0.5
        return [{"masks": p.to(torch.uint8).cpu().numpy()} for p in pred]


@register_method
class ToyStagedMethod(ToyMethod):
    name = "_toy_staged"
    uses_ema = True

    def build_state(self, cfg, info):
        return ToyState(cfg.loss.queue_size)

    def ema_momentum(self, cfg, step, max_steps):
        return 0.9

    def training_step(self, model, batch, ctx):
        out = super().training_step(model, batch, ctx)
        lc = ctx.cfg.loss
        t = F.normalize(ctx.teacher(batch["image"])[1] - ctx.state.centre, dim=-1)  # eval mode: no dropout
        self._teacher_emb = t
        # confident images only: a different number on each rank
        self._keep = batch["target"].mean((1, 2, 3)) > 0.5
        if ctx.step >= lc.stage_step:  # the staged term
            s = F.normalize(self._student_emb, dim=-1)
            bank, _ = ctx.state.queue.get()
            logits = torch.cat([(s * t).sum(-1, keepdim=True), s @ bank.T], dim=1) / lc.temperature
            nce = F.cross_entropy(logits, torch.zeros(len(s), dtype=torch.long, device=s.device))
            out["loss"] = out["loss"] + 0.1 * nce
            out["nce"] = nce.detach()
        return out

    def after_backward(self, model, ctx):
        if ctx.epoch < ctx.cfg.loss.freeze_proj_epochs:
            for p in ctx.module.proj.parameters():
                p.grad = None

    def after_optimizer_step(self, model, ctx):
        st, lc = ctx.state, ctx.cfg.loss
        t = self._teacher_emb
        total = dist.all_reduce_sum(torch.cat([t.sum(0), t.new_tensor([len(t)])]))
        st.centre.mul_(lc.centre_momentum).add_((1 - lc.centre_momentum) * total[:-1] / total[-1])
        st.queue.enqueue(t[self._keep])


class Crash(RuntimeError):
    """A simulated kill, raised from a trainer hook."""


def crash_at(step: int):
    """A trainer hook (``api.train(hooks=[...])``) that stops the run right after ``step``."""

    def hook(trainer, s):
        if s == step:
            raise Crash(f"killed after step {step}")

    return hook


def ddp_worker(rank: int, world: int, port: int, kwargs: dict) -> None:
    """``torch.multiprocessing.spawn`` target: join a gloo group as torchrun would, then train."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LABELWISE_NO_PROGRESS": "1"})
    torch.set_num_threads(1)
    from labelwise.engine import api

    from labelwise import dist

    ok = False
    try:
        api.train(**kwargs)
        ok = True
    finally:
        dist.shutdown(ok)  # the ranks meet before leaving, as every CLI command does


@dataclass
class ToySegConfig(BaseConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


class _SegItems:
    """voc item -> 16 x 16 image and label (nearest), enough for a per-pixel classifier."""

    def __call__(self, item, rng):
        img = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float()[None] / 255
        mask = torch.from_numpy(np.ascontiguousarray(item["mask"])).long()[None, None].float()
        return {"image": F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)[0],
                "mask": F.interpolate(mask, size=(16, 16), mode="nearest")[0, 0].long()}


@register_method
class ToySegMethod(Method):
    """A per-pixel classifier trained on the dataset's masks, or on ``--labels PRED_DIR``."""

    name = "_toy_seg"
    config_cls = ToySegConfig
    outputs = {"segmentation": "label_png"}

    def presets(self):
        return ["cpu"]

    def load_preset(self, preset):
        return {"train": {"max_steps": 20, "batch_size": 4, "log_every": 5, "ckpt_every": 10},
                "optim": {"lr": 5e-2, "warmup_steps": 0, "schedule": "constant"}}

    def build_model(self, cfg, info, *, pretrained=True):
        return nn.Sequential(nn.Conv2d(3, cfg.model.width, 1), nn.GELU(), nn.Conv2d(cfg.model.width, info.num_classes, 1))

    def build_train_dataset(self, cfg, spec, info=None, *, labels_dir=None, seeds_dir=None):
        return SeededDataset(self.load_split(cfg, spec, cfg.data.train_split, labels_dir=labels_dir), _SegItems())

    def training_step(self, model, batch, ctx):
        return {"loss": F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=255)}

    def predict(self, model, batch, ctx):
        logits = model(batch["inputs"])
        return [{"segmentation": p.argmax(0).to(torch.uint8).cpu().numpy()} for p in logits]
