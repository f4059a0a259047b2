"""Normalised-cut primitives shared by TokenCut and MaskCut (as released with CutLER).

* affinity: cosine similarity of L2-normalised tokens computed in float32 (the release
  multiplies its torch float32 features), binarised ``sim > tau`` -> 1, else ``eps`` (1e-5),
  as a float64 matrix (the release's ``np.where(..., eps, A)`` yields float64), so the
  eigenproblem below runs in float64;
* the second-smallest generalised eigenvector of ``(D - A, D)``:
  ``solver="dense"`` is the released ``scipy.linalg.eigh(D - A, D)`` (faithful, slow);
  ``solver="lanczos"`` solves the equivalent symmetric problem: with ``y = D^1/2 x``,
  ``(D - A) x = λ D x`` becomes ``(I - D^-1/2 A D^-1/2) y = λ y``, so the second-smallest
  λ is the second-*largest* eigenvalue of ``D^-1/2 A D^-1/2`` (``scipy.sparse.linalg.eigsh``,
  deterministic start vector), and ``x = D^-1/2 y``;
* bipartition at the mean of the eigenvector, seed ``argmax |v|``, and the connected
  component (4-connectivity, ``scipy.ndimage.label``) of the foreground that contains the
  seed.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage
import scipy.sparse.linalg
import torch

__all__ = ["binary_affinity", "second_eigenvector", "bipartition", "seed_component", "num_fg_corners"]


def binary_affinity(feats: np.ndarray, tau: float, eps: float = 1e-5) -> np.ndarray:
    """``(N, N)`` float64 affinity of L2-normalised ``feats`` (N, D): 1 where cosine > tau, else eps.

    The similarity is a torch float32 product, as in the release: pairs whose cosine lies
    within float32 rounding of ``tau`` land on the same side of the threshold as there
    (a float64 product may flip them, and with them the cut). Zeroed (painted) rows have
    cosine 0 with everything, so for ``tau >= 0`` they are ``eps`` rows.
    """
    f = torch.as_tensor(np.ascontiguousarray(feats), dtype=torch.float32)
    sim = (f @ f.T).numpy()
    return np.where(sim > tau, 1.0, eps)


def second_eigenvector(A: np.ndarray, solver: str = "dense") -> np.ndarray:
    """Second-smallest generalised eigenvector of ``(D - A, D)``, ``D = diag(A 1)``."""
    d = A.sum(1)
    if solver == "dense":
        _, vecs = scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 2])
        return vecs[:, 0]
    if solver == "lanczos":
        dm = 1.0 / np.sqrt(d)
        An = A * dm[:, None] * dm[None, :]
        n = A.shape[0]
        v0 = np.cos(np.arange(n) * 0.618) + 1.0            # deterministic start vector
        vals, vecs = scipy.sparse.linalg.eigsh(An, k=2, which="LA", v0=v0, tol=1e-6)
        y = vecs[:, np.argsort(vals)[0]]                    # second largest of the two
        return y * dm
    raise ValueError(f"unknown eigen solver {solver!r}; use dense or lanczos")


def num_fg_corners(mask: np.ndarray) -> int:
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def bipartition(vec: np.ndarray, dims: tuple[int, int], corner_rule: bool) -> tuple[np.ndarray, int]:
    """Foreground half of the eigenvector (at its mean) after the released flip rules.

    Flip when the seed (``argmax |v|``) is outside the foreground or, with ``corner_rule``
    (MaskCut), when >= 3 of the 4 corners are foreground. Returns (mask (h, w) bool, seed).
    """
    part = vec > vec.mean()
    seed = int(np.argmax(np.abs(vec)))
    grid = part.reshape(dims)
    if corner_rule and num_fg_corners(grid) >= 3:
        reverse = True
    else:
        reverse = not part[seed]
    if reverse:
        vec = -vec
        part = ~part
    seed = int(np.argmax(vec))
    return part.reshape(dims), seed


def seed_component(mask: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of ``mask`` containing token ``seed`` (empty if outside)."""
    lab, _ = scipy.ndimage.label(mask)
    s = lab.reshape(-1)[seed]
    if s == 0:
        return np.zeros_like(mask, dtype=bool)
    return lab == s
