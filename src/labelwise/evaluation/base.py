"""Shared machinery of the metric accumulators.

An accumulator keeps its sufficient statistics in tensors ("states": confusion matrices,
TP/FP/FN counts, IoU sums). ``update()`` adds to them on the inputs' device, ``compute()``
sums every state over ranks with :func:`labelwise.dist.all_reduce_sum` (a copy: the local
state is left untouched, so ``compute()`` may be called again) and turns the totals into
a flat ``dict``; ``reset()`` zeroes them. Under ``torch.distributed`` every rank must call
``compute()`` (it is a collective); without a process group it is purely local.

Undefined values (a class absent from both ground truth and prediction, a ratio 0/0) are
``float('nan')`` and are left out of the means; :func:`jsonable` turns NaN/inf into
``null`` for JSON output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from labelwise.dist import all_reduce_sum

__all__ = ["Metric", "as_tensor", "jsonable", "nanmean", "unique_names", "format_table"]


def as_tensor(x: Any, device: torch.device | None = None) -> torch.Tensor:
    """numpy / list / tensor -> tensor (no copy when possible), optionally moved to ``device``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype == np.uint16 or arr.dtype == np.uint32:
            arr = arr.astype(np.int64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def nanmean(values: torch.Tensor) -> float:
    """Mean of the non-NaN entries (NaN when there are none)."""
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else float("nan")


def unique_names(names: list[str]) -> list[str]:
    """Make names usable as dict keys: duplicates get ``_1``, ``_2``... suffixes."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        n = str(n)
        if n in seen:
            seen[n] += 1
            out.append(f"{n}_{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out


def jsonable(obj: Any) -> Any:
    """Recursively convert a result to JSON-safe values (NaN/inf -> None, tensors/arrays -> lists)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.4f}"
    return str(v)


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """Plain-text table with left-aligned first column and right-aligned numbers."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    def line(r):
        return "  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r)))
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


class Metric:
    """Base accumulator: register states with :meth:`add_state`; they are zeroed by :meth:`reset`
    and summed over ranks by :meth:`reduced_states`."""

    def __init__(self) -> None:
        self._state_names: list[str] = []
        self._state_init: dict[str, torch.Tensor] = {}

    def add_state(self, name: str, init: torch.Tensor) -> None:
        self._state_names.append(name)
        self._state_init[name] = init.clone()
        setattr(self, name, init.clone())

    @property
    def device(self) -> torch.device:
        return getattr(self, self._state_names[0]).device

    def to(self, device: torch.device | str) -> "Metric":
        for n in self._state_names:
            setattr(self, n, getattr(self, n).to(device))
        return self

    def _follow(self, device: torch.device) -> None:
        """Keep the states on the device of the incoming data."""
        if self.device != device:
            self.to(device)

    def reset(self) -> None:
        dev = self.device
        for n in self._state_names:
            setattr(self, n, self._state_init[n].clone().to(dev))

    def reduced_states(self) -> dict[str, torch.Tensor]:
        """Every state summed over ranks (copies; identity without a process group)."""
        return {n: all_reduce_sum(getattr(self, n)) for n in self._state_names}

    def compute(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def table(self, result: dict[str, Any] | None = None) -> str:
        """A readable summary of :meth:`compute`'s result."""
        result = self.compute() if result is None else result
        rows = [[k, v] for k, v in result.items() if isinstance(v, (int, float))]
        return format_table(rows, ["metric", "value"])
