"""Hungarian (optimal one-to-one) matching on a cost or score matrix.

Used by the unsupervised evaluation (clusters -> classes, as in STEGO / U2Seg) and by
set-prediction losses. Rectangular matrices are allowed: ``min(R, C)`` pairs are
returned and the surplus rows (or columns) stay unmatched.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["hungarian_match", "hungarian_match_batch"]


def hungarian_match(cost: Any, maximize: bool = False):
    """Optimal assignment of rows to columns of a 2-D ``cost`` (numpy array or torch tensor).

    Returns ``(row_idx, col_idx)`` sorted by row, ``min(R, C)`` pairs, minimising the summed
    cost (maximising it with ``maximize=True``). A torch input gives ``int64`` tensors on the
    input's device, a numpy/list input gives ``int64`` arrays.
    """
    is_torch = hasattr(cost, "detach")
    arr = cost.detach().cpu().double().numpy() if is_torch else np.asarray(cost, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"hungarian_match expects a 2-D cost matrix, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("hungarian_match: the cost matrix contains NaN")
    if arr.size == 0:
        rows = cols = np.zeros(0, dtype=np.int64)
    else:
        rows, cols = linear_sum_assignment(arr, maximize=maximize)
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    if is_torch:
        import torch

        return (torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device))
    return rows, cols


def hungarian_match_batch(costs: Sequence[Any], maximize: bool = False) -> list[tuple[Any, Any]]:
    """:func:`hungarian_match` for each matrix of a list (matrices may differ in shape)."""
    return [hungarian_match(c, maximize=maximize) for c in costs]
