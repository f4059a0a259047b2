"""FIFO memory bank (MoCo queue / SeCo reservoir + tag pool, CoCal's per-class bank source).

A ring buffer of ``size`` feature vectors with ``num_label_fields`` integer labels each,
stored in registered buffers so it moves with ``.to(device)`` and is saved in
``state_dict()`` (checkpoint/resume keeps its contents and write position).

``enqueue(feats, labels)`` first all-gathers the batch from every rank when
``torch.distributed`` is initialised (ranks may enqueue different numbers of entries, e.g.
only their confident ones: :func:`labelwise.dist.all_gather_cat` pads and masks), then
writes it at the write pointer with one vectorised index assignment, wrapping
around the end (SeCo Eq. 5: newest in, oldest out). A batch larger than the bank keeps only
its newest ``size`` entries. ``size`` need not be a multiple of the batch size.
``get()`` returns only the filled entries. Unfilled label slots hold -1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from labelwise.dist import all_gather_cat

__all__ = ["FIFOQueue"]


class FIFOQueue(nn.Module):
    """Ring buffer of (feature, labels) pairs. See module doc."""

    def __init__(self, size: int, dim: int, num_label_fields: int = 1, device=None,
                 dtype: torch.dtype = torch.float32, gather: bool = True):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"FIFOQueue needs size > 0 and dim > 0, got size={size}, dim={dim}")
        self.size, self.dim, self.num_label_fields, self.gather = int(size), int(dim), int(num_label_fields), gather
        self.register_buffer("feats", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size, max(num_label_fields, 1)), -1, dtype=torch.long,
                                                  device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))
        # Host-side copies of ptr / count: sizes are known on the host, so enqueue / get never
        # read a GPU scalar back (no host sync inside a training step).
        self._ptr = 0
        self._count = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr, self._count = int(self.ptr), int(self.count)  # once, when a checkpoint is loaded

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count == self.size

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        feats = feats.detach().to(self.feats.device, self.feats.dtype).reshape(-1, self.dim)
        n = feats.shape[0]
        if labels is None:
            labels = torch.full((n, self.labels.shape[1]), -1, dtype=torch.long, device=self.feats.device)
        n_fields = self.labels.shape[1]
        if labels.numel() != n * n_fields:
            raise ValueError(f"FIFOQueue expects {n_fields} label(s) per feature: {n} features, "
                             f"labels of shape {tuple(labels.shape)}")
        labels = labels.detach().to(self.labels.device, torch.long).reshape(n, n_fields)
        if self.gather:
            feats, labels = all_gather_cat(feats), all_gather_cat(labels)
            n = feats.shape[0]
        if n == 0:
            return
        start = self._ptr
        if n > self.size:  # only the newest `size` survive
            feats, labels = feats[-self.size:], labels[-self.size:]
            start = (start + n - self.size) % self.size  # the ring position as if all n had been written
        m = min(n, self.size)
        idx = (start + torch.arange(m, device=self.feats.device)) % self.size
        self.feats[idx] = feats
        self.labels[idx] = labels
        self._ptr = (start + m) % self.size
        self._count = min(self._count + n, self.size)
        self.ptr.fill_(self._ptr)
        self.count.fill_(self._count)

    def get(self, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(feats (n, dim), labels (n,) or (n, L))`` of the filled entries.

        Storage order by default (order is irrelevant for contrast); ``ordered=True`` returns
        oldest -> newest.
        """
        n = self._count
        if ordered and n == self.size:
            idx = (self._ptr + torch.arange(n, device=self.feats.device)) % self.size
            feats, labels = self.feats[idx], self.labels[idx]
        else:
            feats, labels = self.feats[:n], self.labels[:n]
        if self.num_label_fields == 1:
            labels = labels[:, 0]
        return feats, labels

    def reset(self) -> None:
        self.feats.zero_()
        self.labels.fill_(-1)
        self.ptr.zero_()
        self.count.zero_()
        self._ptr = self._count = 0
