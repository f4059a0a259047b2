"""Small utilities shared across the package."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

from labelwise.dist import is_main

T = TypeVar("T")


def progress_enabled() -> bool:
    """Progress bars: on the main rank, on a terminal (a slurm log stays clean; LABELWISE_PROGRESS=1
    forces them), never with LABELWISE_NO_PROGRESS=1 / --no-progress."""
    if not is_main() or os.environ.get("LABELWISE_NO_PROGRESS") == "1":
        return False
    if os.environ.get("LABELWISE_PROGRESS") == "1":
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kw) -> Iterable[T]:
    """A tqdm progress bar where :func:`progress_enabled` says so."""
    disable = not progress_enabled()
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, file=sys.stderr, **kw)


def resolve_device(name: str = "auto"):
    """``auto`` -> cuda when available, else cpu. Under ``torchrun`` a bare ``cuda`` (or ``auto``
    on a GPU machine) means ``cuda:LOCAL_RANK``, so every rank takes its own GPU."""
    import torch

    from labelwise.dist import is_dist
    from labelwise.errors import LabelwiseError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LabelwiseError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LabelwiseError(f"device {name!r}: CUDA is not available on this machine; use cpu or auto")
        if dev.index is None and is_dist():
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LabelwiseError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s); "
                                 "use cuda:0 .. cuda:N-1 or auto")
    return dev
