"""A tiny deterministic method (``_toy``) for testing the engine itself.

BN-free conv net regressing a fixed per-pixel target from synthetic images generated
in memory (no files), with per-sample augmentation (flip + noise from the sampler's
generator) and optional model-side randomness (``model.noise``, from the global torch
RNG) so resume tests also cover RNG restoration. Importing this module registers it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelwise.config import param
from labelwise.data.base import DatasetInfo
from labelwise.engine.config import BaseConfig
from labelwise.engine.data import SeededDataset
from labelwise.engine.method import Method
from labelwise.methods import register_method


@dataclass
class ToyModelConfig:
    width: int = param(8, range=(1, None))
    noise: float = param(0.0, range=(0.0, None), help="std of input noise drawn from the global torch RNG")


@dataclass
class ToyConfig(BaseConfig):
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    n_images: int = param(24, range=(1, None))


class ToyNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        return self.head(F.gelu(self.backbone(x)))


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 16):
        rng = np.random.default_rng(1234)
        self.images = rng.random((n, size, size, 3), dtype=np.float32)
        self.targets = (self.images.mean(-1) > 0.5).astype(np.float32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "target": self.targets[i], "index": i}


def _augment(item, rng: np.random.Generator):
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
    infer_outputs = ("masks",)

    def presets(self):
        return ["cpu"]

    def load_preset(self, preset):
        return {"train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "ckpt_every": 2},
                "optim": {"lr": 1e-2, "warmup_steps": 2}}

    def dataset_info(self, cfg, spec):
        return DatasetInfo(class_names=["background", "thing"])

    def build_model(self, cfg, info):
        return ToyNet(cfg.model.width)

    def build_train_dataset(self, cfg, spec, info=None):
        return SeededDataset(_Images(cfg.n_images), _augment)

    def training_step(self, model, batch, step, ctx):
        x = batch["image"]
        if ctx.cfg.model.noise > 0:
            x = x + ctx.cfg.model.noise * torch.randn_like(x)
        pred = model(x)
        mse = F.mse_loss(pred, batch["target"])
        l1 = (pred - batch["target"]).abs().mean().detach()
        return {"loss": mse, "l1": l1}

    def evaluate(self, model, ctx):
        ds = _Images(8)
        x = torch.from_numpy(ds.images).permute(0, 3, 1, 2)
        return {"mse": float(F.mse_loss(model(x), torch.from_numpy(ds.targets)[:, None]))}

    def infer(self, model, cfg, info, spec, split, out, what, **kw):
        return Path(out)


def ddp_worker(rank: int, world: int, port: int, kwargs: dict) -> None:
    """``torch.multiprocessing.spawn`` target: join a gloo group as torchrun would, then train."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LABELWISE_NO_PROGRESS": "1"})
    torch.set_num_threads(1)
    from labelwise.engine import api

    try:
        api.train(**kwargs)
    finally:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
