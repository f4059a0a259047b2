"""Per-class prototype bank updated by EMA (SeCo's category knowledge P, Eq. 3).

``update(features, labels)`` computes, for every class present in the batch, the mean of
its (L2-normalised when ``normalize``) features with one ``index_add_`` (hard labels) or one
matmul (soft weights (N, K), e.g. SeCo's softmax relevance weights W), sums them over
ranks when ``torch.distributed`` is initialised, and then

* initialises classes seen for the first time with that mean,
* otherwise ``P_k <- m P_k + (1 - m) mean_k`` (``momentum`` m: SeCo 0.9 VOC / 0.99 COCO),

re-normalising updated prototypes. Classes absent from the batch are untouched.
Buffers (``prototypes``, ``initialized``) make it checkpointable and device-following.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from labelwise.dist import all_reduce_sum

__all__ = ["PrototypeBank"]


class PrototypeBank(nn.Module):
    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, normalize: bool = True,
                 ignore_label: int = -1, device=None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.momentum, self.normalize, self.ignore_label = float(momentum), normalize, ignore_label
        self.register_buffer("prototypes", torch.zeros(num_classes, dim, device=device))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool, device=device))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Update from ``features`` (N, D) with ``labels`` (N,) class indices (``ignore_label``
        skipped) or soft weights (N, K). Returns the bool mask (K,) of updated classes."""
        x = features.detach().float().to(self.prototypes.device)
        if self.normalize:
            x = F.normalize(x, dim=-1)
        labels = labels.detach().to(self.prototypes.device)
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(self.num_classes, device=x.device)
        if labels.dim() == 2:  # soft weights (N, K)
            w = labels.float()
            sums += w.t() @ x
            counts += w.sum(0)
        else:
            labels = labels.long().reshape(-1)
            keep = (labels != self.ignore_label) & (labels >= 0) & (labels < self.num_classes)
            lab, xk = labels[keep], x[keep]
            sums.index_add_(0, lab, xk)
            counts.index_add_(0, lab, torch.ones_like(lab, dtype=counts.dtype))
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        present = counts > 0
        mean = sums / counts.clamp_min(1e-12)[:, None]
        m = self.momentum
        blended = torch.where(self.initialized[:, None], m * self.prototypes + (1.0 - m) * mean, mean)
        if self.normalize:
            blended = F.normalize(blended, dim=-1)
        self.prototypes.copy_(torch.where(present[:, None], blended, self.prototypes))
        self.initialized |= present
        return present

    def similarity(self, x: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        """(N, K) similarities ``x . P^T`` in fp32 (cosine when ``normalize``, default: the bank's).
        Uninitialised classes have zero prototypes (similarity 0); see ``initialized``."""
        normalize = self.normalize if normalize is None else normalize
        x = x.float()
        if normalize:
            x = F.normalize(x, dim=-1)
        return x @ self.prototypes.t()
