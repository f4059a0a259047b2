"""Deterministic, resumable data feeding for the training loop.

* :class:`ShardedSampler` — DistributedSampler-like: one permutation per epoch drawn from
  a ``torch.Generator`` seeded with ``(seed, epoch)`` (identical on every rank), padded to
  a multiple of the world size and strided by rank (``perm[rank::world]``), so the union
  of the ranks' batch ``t`` is exactly the single-process global batch ``t``. It can start
  in the middle of an epoch (resume) and yields ``(index, sample_seed)`` pairs.
* :class:`SeededDataset` — applies a method's transform ``fn(item, rng)`` with a
  ``numpy.random.Generator`` built from ``sample_seed``; augmentation therefore depends on
  (seed, epoch, position) only — not on the rank, the number of workers or where a run was
  interrupted. Nothing touches the global RNGs.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of epoch ``epoch`` (SeedSequence mixing)."""
    ss = np.random.SeedSequence([int(seed), int(epoch), int(position)])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1)


class ShardedSampler(Sampler):
    """Per-rank sampler over ``n`` items yielding ``(index, sample_seed)``; ``drop_last`` batches."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if n <= 0:
            raise ValueError("empty training set")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.total = -(-n // world_size) * world_size  # padded to a multiple of the world size
        self.per_rank = self.total // world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def permutation(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        if self.total > self.n:  # pad by wrapping around (as DistributedSampler)
            perm = (perm * (-(-self.total // self.n)))[: self.total]
        return perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation(self.epoch)
        usable = self.batches_per_epoch * self.batch_size
        # global position of this rank's j-th sample: j * world + rank
        for j in range(self.start_batch * self.batch_size, usable):
            pos = j * self.world + self.rank
            yield perm[pos], sample_seed(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0) * self.batch_size


class SeededDataset(Dataset):
    """``base[index]`` passed through ``fn(item, rng)`` with a per-sample ``np.random.Generator``."""

    def __init__(self, base, fn: Callable[[dict, np.random.Generator], Any]):
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        return self.fn(self.base[index], np.random.default_rng(seed))


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (``PR_SET_PDEATHSIG``), so a
    DataLoader worker does not outlive a ``kill -9`` of the command; elsewhere a no-op (PyTorch's
    own watchdog still ends the workers, only later)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call: nothing would signal us
            os._exit(1)
    except (OSError, AttributeError):
        pass


def worker_init_fn(worker_id: int) -> None:
    """Seed python/numpy in each worker from torch's per-worker seed (only matters for code
    that ignores the per-sample generator); the worker dies with its parent."""
    die_with_parent()
    s = torch.initial_seed() % (2 ** 32)
    random.seed(s)
    np.random.seed(s)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_len(batch: Any) -> int:
    """Number of images in a collated batch (first tensor's leading dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        if "image" in batch and isinstance(batch["image"], torch.Tensor):
            return int(batch["image"].shape[0])
        for v in batch.values():
            n = batch_len(v)
            if n:
                return n
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    return 0
