"""Per-class memory bank (CoCal's part bank B in R^{P x S x D} and object bank B~).

Every class owns a ring of ``size`` (S) slots with its own write pointer and fill count, all
kept in registered buffers (``feats`` (P, S, D), ``ptr`` (P,), ``count`` (P,)), so the bank
moves with ``.to(device)`` and is saved and restored by ``state_dict()``.

``enqueue(features (M, D), labels (M,))`` first all-gathers the batch from every rank when
``torch.distributed`` is initialised (:func:`labelwise.dist.all_gather_cat`; ranks may enqueue
different M), then writes each class's new samples at that class's pointer with one
vectorised index assignment: a stable sort by label gives every sample its rank r among the
samples of its class in this call (cumulative per-class counts), sample r of class c goes to
slot ``(ptr[c] + r) % S`` of class c, and when a class receives more than S samples only its
newest S are written (the older ones would have been overwritten anyway). Newest in, oldest
out, independently per class; the other classes are untouched. Labels outside ``[0, P)``
(ignore / void) are skipped. Samples are stored detached, L2-normalised when
``normalize=True``.

Slots fill from 0 upwards until a class is full, so the valid slots of class c are always
``[0, count[c])``. ``get()`` returns ``(feats (P, S, D), valid (P, S) bool)``; ``ordered=True``
rolls every full ring so that each class reads oldest -> newest.

Call ``enqueue`` after the loss that reads the bank (the current batch should not be its own
positive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labelwise.dist import all_gather_cat

__all__ = ["ClassMemoryBank"]


class ClassMemoryBank(nn.Module):
    """``num_classes`` rings of ``size`` (feature) samples each. See module doc."""

    def __init__(self, num_classes: int, size: int, dim: int, *, normalize: bool = True, device=None,
                 dtype: torch.dtype = torch.float32, gather: bool = True):
        super().__init__()
        if num_classes <= 0 or size <= 0 or dim <= 0:
            raise ValueError(f"ClassMemoryBank needs num_classes, size and dim > 0, got num_classes={num_classes}, "
                             f"size={size}, dim={dim}")
        self.num_classes, self.size, self.dim = int(num_classes), int(size), int(dim)
        self.normalize, self.gather = bool(normalize), bool(gather)
        self.register_buffer("feats", torch.zeros(num_classes, size, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}, normalize={self.normalize}"

    @property
    def valid(self) -> torch.Tensor:
        """(P, S) bool: filled slots."""
        return torch.arange(self.size, device=self.count.device)[None, :] < self.count[:, None]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        dev = self.feats.device
        feats = features.detach().reshape(-1, self.dim)
        labels = labels.detach().reshape(-1).to(feats.device, torch.long)
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"ClassMemoryBank.enqueue: {feats.shape[0]} features but {labels.shape[0]} labels")
        if self.normalize:
            feats = F.normalize(feats.float(), dim=-1)
        feats = feats.to(dev, self.feats.dtype)
        labels = labels.to(dev)
        if self.gather:
            feats, labels = all_gather_cat(feats), all_gather_cat(labels)
        m = labels.shape[0]
        if m == 0:
            return
        P, S = self.num_classes, self.size
        ok = (labels >= 0) & (labels < P)
        lab = torch.where(ok, labels, torch.full_like(labels, P))  # ignored samples -> extra class P
        counts = torch.bincount(lab, minlength=P + 1)  # (P + 1,)
        order = torch.sort(lab, stable=True).indices  # arrival order kept within a class
        starts = counts.cumsum(0) - counts  # first sorted position of every class
        rank = torch.empty_like(lab)
        rank[order] = torch.arange(m, device=dev) - starts[lab[order]]  # r: rank within own class, by arrival
        keep = ok & (rank >= counts[lab] - S)  # only the newest S of each class survive
        lab_k = lab[keep]
        slot = (self.ptr[lab_k] + rank[keep]) % S
        self.feats.view(P * S, self.dim)[lab_k * S + slot] = feats[keep]
        n_new = counts[:P]
        self.ptr.copy_((self.ptr + n_new) % S)
        self.count.copy_((self.count + n_new).clamp_max(S))

    def get(self, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(feats (P, S, D), valid (P, S) bool)``. Storage order by default (irrelevant for
        contrast); ``ordered=True`` gives each class oldest -> newest in slots ``[0, count)``."""
        feats, valid = self.feats, self.valid
        if ordered:
            start = torch.where(self.count == self.size, self.ptr, torch.zeros_like(self.ptr))
            idx = (start[:, None] + torch.arange(self.size, device=feats.device)[None, :]) % self.size
            feats = feats.gather(1, idx[:, :, None].expand(-1, -1, self.dim))
        return feats, valid

    def reset(self) -> None:
        self.feats.zero_()
        self.ptr.zero_()
        self.count.zero_()
