"""Parameter groups, optimisers and per-step learning-rate schedules."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from labelwise.engine.config import OptimConfig

# Parameters whose name contains one of these never get weight decay (besides 0/1-D tensors:
# norm weights and biases).
NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "register_tokens",
                     "absolute_pos", "relative_position_bias_table", "query_embed", "tokens")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """True for norms, biases (ndim <= 1), position embeddings and learned tokens."""
    if p.ndim <= 1:
        return True
    leaf = name.lower()
    return any(k in leaf for k in NO_DECAY_KEYWORDS)


def build_param_groups(groups: Iterable[dict], cfg: OptimConfig) -> list[dict]:
    """Turn ``[{"name", "params": [(name, p), ...], "lr_mult"}]`` into optimiser groups.

    ``lr_mult=None`` means ``cfg.backbone_lr_mult``.
    Each named group is split into a decayed and a non-decayed half; the lr is
    ``cfg.lr * lr_mult`` (``initial_lr`` is what the schedule scales). Frozen params
    (``requires_grad=False``) are skipped; a parameter listed twice is an error.
    """
    out: list[dict] = []
    seen: set[int] = set()
    for g in groups:
        mult = g.get("lr_mult", 1.0)
        mult = cfg.backbone_lr_mult if mult is None else float(mult)  # None = the backbone multiplier
        decay, no_decay = [], []
        for name, p in g["params"]:
            if not p.requires_grad:
                continue
            if id(p) in seen:
                raise ValueError(f"parameter {name} is in two parameter groups")
            seen.add(id(p))
            (no_decay if no_weight_decay(name, p) else decay).append(p)
        for suffix, params, wd in (("", decay, cfg.weight_decay), ("_no_decay", no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": cfg.lr * mult, "weight_decay": wd,
                            "name": g["name"] + suffix, "lr_mult": mult})
    return out


def in_module(name: str, module_names: Iterable[str]) -> bool:
    """Whether parameter ``name`` lies under a module called one of ``module_names`` at any
    depth (``cnn.backbone.stem.weight`` is under ``backbone``; ``backbone_proj.weight`` is not)."""
    parts = set(name.split(".")[:-1])
    return any(m in parts for m in module_names)


def default_param_groups(model: nn.Module, backbone_modules: Iterable[str] = ("backbone",)) -> list[dict]:
    """Parameters under a module named ``backbone`` (at any depth: ``backbone.*``,
    ``cnn.backbone.*``, ``vit.backbone.*``) vs everything else (the heads), the usual split."""
    names = tuple(backbone_modules)
    backbone, head = [], []
    for name, p in model.named_parameters():
        (backbone if in_module(name, names) else head).append((name, p))
    return [{"name": "backbone", "params": backbone, "lr_mult": None}, {"name": "head", "params": head, "lr_mult": 1.0}]


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup then poly/cosine/constant."""
    w = cfg.warmup_steps
    if w > 0 and step < w:
        start = min(cfg.warmup_init_lr / cfg.lr, 1.0) if cfg.lr > 0 else 1.0
        return start + (1.0 - start) * step / w
    if cfg.schedule == "constant":
        return 1.0
    span = max(max_steps - w, 1)
    t = min(max(step - w, 0) / span, 1.0)
    if cfg.schedule == "poly":
        f = (1.0 - t) ** cfg.poly_power
    else:  # cosine
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A per-step ``LambdaLR`` (call ``.step()`` after every optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))
