"""Checkpoints: atomic writes, RNG state capture/restore, ``keep_last`` rotation.

Layout: ``RUN_DIR/checkpoints/step_00001000.pt`` (the last ``keep_last`` kept) and
``RUN_DIR/checkpoints/last.pt`` (always the newest). Each holds the model, optimiser,
scheduler, GradScaler and EMA teacher states, the RNG states of every rank (python,
numpy, torch CPU, CUDA) and the data position (``epoch``, ``batch`` within the epoch).
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from labelwise.errors import LabelwiseError
from labelwise.io import atomic_save_torch

STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array as a tensor: the checkpoint then holds only what torch.load(weights_only=True) reads
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, state: dict, step: int, keep_last: int) -> Path:
    """Write ``step_N.pt`` (if ``keep_last`` > 0) and ``last.pt`` atomically; prune old ones."""
    ckdir = checkpoint_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    last = ckdir / "last.pt"
    if keep_last > 0:
        path = ckdir / f"step_{step:08d}.pt"
        atomic_save_torch(path, state)
        tmp = ckdir / f".last.pt.{os.getpid()}.link"
        try:  # last.pt as a hard link of the step file, renamed into place (atomic)
            if tmp.exists():
                tmp.unlink()
            os.link(path, tmp)
            os.replace(tmp, last)
        except OSError:
            atomic_save_torch(last, state)
        steps = sorted((int(m.group(1)), p) for p in ckdir.iterdir() if (m := STEP_RE.match(p.name)))
        for _, old in steps[:-keep_last]:
            old.unlink(missing_ok=True)
    else:
        atomic_save_torch(last, state)
    return last


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise LabelwiseError(f"{path}: checkpoint not found; train the run first (labelwise train ... --out RUN_DIR)")
    try:  # tensors and plain containers only (no pickled code)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # a checkpoint of labelwise <= 0.1 holds numpy's RNG state as an array
        if not _numpy_array_globals():
            return _load_legacy(path, map_location)
        try:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise LabelwiseError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart from the "
                                 "previous one") from None
    except Exception as e:  # truncated / foreign file
        raise LabelwiseError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart from the "
                             "previous one") from None


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (allow-listed for older checkpoints); [] on a torch
    without ``torch.serialization.safe_globals`` (< 2.5)."""
    if not hasattr(torch.serialization, "safe_globals"):
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_legacy(path: Path, map_location) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise LabelwiseError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to restart from the "
                             "previous one") from None


def load_module_state(module: torch.nn.Module, state: dict, path: str | Path, what: str = "model") -> None:
    """``module.load_state_dict(state)`` with a one-line error naming the checkpoint and the
    first missing / unexpected / reshaped keys (a checkpoint of another labelwise version or config)."""
    own = module.state_dict()
    problems = {"missing": [k for k in own if k not in state],
                "unexpected": [k for k in state if k not in own],
                "wrong shape": [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]}
    parts = [f"{len(keys)} {name} (e.g. {keys[0]})" for name, keys in problems.items() if keys]
    if parts:
        raise LabelwiseError(f"{path}: its {what} does not fit the {what} this config builds: {', '.join(parts)}; "
                             "it was written by another labelwise version or config -- retrain into a new --out")
    module.load_state_dict(state)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    last = checkpoint_dir(run_dir) / "last.pt"
    return last if last.is_file() else None
