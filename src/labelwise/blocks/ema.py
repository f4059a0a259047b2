"""EMA (mean) teacher: a frozen copy of a student updated as ``t <- m t + (1 - m) s``.

Used by SeCo (local/global teacher, momentum 0.999 fixed) and OAP (DINO-style cosine
schedule 0.996 -> 1). The update is one vectorised ``torch._foreach_lerp_`` over all
parameters (``lerp(t, s, 1 - m) = m t + (1 - m) s``); buffers (BatchNorm statistics,
counters) are copied from the student unless ``ema_buffers=True``, which averages the
floating-point ones too. DDP/``torch.compile``-wrapped students are unwrapped (``.module`` /
``._orig_mod``). The teacher is an ``nn.Module`` so ``state_dict()`` / ``load_state_dict()``
checkpoint it (the number of updates is a buffer).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["EMATeacher", "momentum_schedule", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def momentum_schedule(kind: str = "cosine", base: float = 0.996, final: float = 1.0,
                      total_steps: int = 1) -> Callable[[int], float]:
    """``step -> momentum``. ``cosine`` (DINO): ``final - (final - base) * (1 + cos(pi t / T)) / 2``,
    i.e. ``base`` at step 0 rising to ``final`` at ``total_steps`` (clamped after);
    ``constant``: always ``base``."""
    if kind == "constant":
        return lambda step: float(base)
    if kind != "cosine":
        raise ValueError(f"momentum schedule kind must be 'cosine' or 'constant', got {kind!r}")
    total = max(int(total_steps), 1)

    def sched(step: int) -> float:
        t = min(max(int(step), 0), total)
        return float(final - (final - base) * (1.0 + math.cos(math.pi * t / total)) / 2.0)

    return sched


class EMATeacher(nn.Module):
    """Frozen EMA copy of ``student``. Call it like the wrapped module (runs under no_grad).

    ``momentum``: a float or ``callable(step) -> float`` (see :func:`momentum_schedule`).
    ``update(student, step=None)`` applies one EMA step; ``step`` defaults to the number of
    updates done so far. Returns the momentum used. The teacher is always in eval mode,
    whatever ``.train()`` is called on it or a parent: its targets must not depend on
    dropout / drop-path draws, and its BatchNorm layers use (and never update) running
    statistics, which ``update`` copies (or averages with ``ema_buffers``) from the student.
    """

    def __init__(self, student: nn.Module, momentum: float | Callable[[int], float] = 0.999,
                 ema_buffers: bool = False):
        super().__init__()
        self.module = copy.deepcopy(unwrap_model(student))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.momentum = momentum
        self.ema_buffers = ema_buffers
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "EMATeacher":
        # The wrapper's flag follows the caller; the teacher network itself stays in eval mode.
        self.training = mode
        self.module.eval()
        return self

    def momentum_at(self, step: int) -> float:
        return float(self.momentum(step)) if callable(self.momentum) else float(self.momentum)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int | None = None) -> float:
        student = unwrap_model(student)
        if step is None:
            step = int(self.num_updates)
        m = self.momentum_at(step)
        t_params = list(self.module.parameters())
        s_params = [p.detach() for p in student.parameters()]
        if len(t_params) != len(s_params):
            raise ValueError(f"EMA teacher has {len(t_params)} parameters but the student has {len(s_params)}")
        if t_params:
            if t_params[0].device != s_params[0].device:  # student moved after the copy was made
                self.module.to(s_params[0].device)
                t_params = list(self.module.parameters())
            torch._foreach_lerp_(t_params, [s.to(t.dtype) for t, s in zip(t_params, s_params)], 1.0 - m)
        t_bufs = list(self.module.buffers())
        s_bufs = list(student.buffers())
        if len(t_bufs) != len(s_bufs):
            raise ValueError(f"EMA teacher has {len(t_bufs)} buffers but the student has {len(s_bufs)}")
        for t, s in zip(t_bufs, s_bufs):
            if self.ema_buffers and t.is_floating_point():
                t.lerp_(s.to(t.dtype), 1.0 - m)
            else:
                t.copy_(s)
        self.num_updates += 1
        return m
