"""Graph primitives for Online Agglomerative Pooling: connected components and segment sums.

Graphs are batched by giving every node of every image a global id (images occupy
contiguous id ranges), so one call handles the whole batch. Edges are a ``(2, E)`` int64
tensor of undirected edges. Two connected-component backends return *identical* labels
(each node gets the smallest node id of its component), so results never depend on the
backend:

* ``torch``: min-label propagation with root hooking and pointer jumping, pure tensor
  ops over the edge list — runs on any device (the GPU path);
* ``scipy``: ``scipy.sparse.csgraph.connected_components`` (the CPU path; the paper's
  "SCC" on an undirected graph is plain connected components).

:func:`cc_fixed_rounds` runs the ``torch`` algorithm for a fixed number of rounds and returns a
device-side convergence flag instead of testing for the fixpoint on the host (the static,
synchronisation-free OAP path).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

__all__ = ["connected_components", "cc_torch", "cc_scipy", "canonical_labels", "segment_sum", "segment_rows",
           "relabel", "cc_fixed_rounds", "quiet_sparse"]


@contextlib.contextmanager
def quiet_sparse():
    """Silence only torch's sparse notices ("... support is in beta state", "Sparse invariant checks are
    implicitly disabled"), which every sparse constructor repeats; any other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse \w+ tensor support is in beta", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Sparse invariant checks are implicitly disabled",
                                category=UserWarning)
        yield


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Map arbitrary component labels to the smallest node id of each component."""
    n = labels.numel()
    ids = torch.arange(n, device=labels.device)
    comp_min = torch.full((int(labels.max()) + 1 if n else 0,), n, dtype=torch.long, device=labels.device)
    comp_min.scatter_reduce_(0, labels, ids, reduce="amin")
    return comp_min[labels]


def cc_torch(num_nodes: int, edges: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """Connected components by min-label propagation + pointer jumping (device-agnostic).

    Invariant: ``lab[i]`` is always a node of ``i``'s component and never increases; at the
    fixpoint every edge joins equal labels, so each component carries its minimum node id.
    """
    device = edges.device
    lab = torch.arange(num_nodes, device=device)
    if edges.numel() == 0 or num_nodes == 0:
        return lab
    u = torch.cat([edges[0], edges[1]])
    v = torch.cat([edges[1], edges[0]])
    for _ in range(max_iter):
        prev = lab
        lv = lab[v]
        new = lab.clone()
        new.scatter_reduce_(0, u, lv, reduce="amin")          # hook node to smallest neighbour label
        new.scatter_reduce_(0, lab[u], lv, reduce="amin")     # hook the node's root too (fast merging)
        while True:                                            # pointer jumping to the roots
            nxt = new[new]
            if torch.equal(nxt, new):
                break
            new = nxt
        lab = new
        if torch.equal(lab, prev):
            break
    return lab


def cc_scipy(num_nodes: int, edges: torch.Tensor) -> torch.Tensor:
    """Connected components with scipy (CPU), canonicalised to the min node id per component."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components as _cc

    e = edges.detach().cpu().numpy()
    graph = sp.coo_matrix((np.ones(e.shape[1], dtype=np.int8), (e[0], e[1])), shape=(num_nodes, num_nodes)).tocsr()
    _, lab = _cc(graph, directed=False)
    lab = torch.from_numpy(lab.astype(np.int64)).to(edges.device)
    return canonical_labels(lab)


def connected_components(num_nodes: int, edges: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Labels (min node id of the component) of an undirected graph given as a (2, E) edge list.
    ``auto``: ``torch`` on other devices and for small graphs on the CPU (<= 1024 edges: no scipy
    call overhead; measured 56 us vs 163 us at 40 edges, equal at ~1500), ``scipy`` otherwise."""
    if backend == "auto":
        backend = "scipy" if edges.device.type == "cpu" and edges.shape[1] > 1024 else "torch"
    if backend == "torch":
        return cc_torch(num_nodes, edges)
    if backend == "scipy":
        return cc_scipy(num_nodes, edges)
    raise ValueError(f"unknown connected-components backend {backend!r}; use auto, torch or scipy")


def relabel(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Contiguous ids 0..K-1 in increasing order of ``labels`` (keeps image order)."""
    uniq, inv = torch.unique(labels, sorted=True, return_inverse=True)
    return inv, uniq.numel()


def segment_sum(values: torch.Tensor, index: torch.Tensor, num: int,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[k] = sum_i [index_i == k] w_i values[i]`` along dim 0 — never a dense one-hot product.

    Row blocks (2-D float ``values``, e.g. affinity profiles) go through a sparse ``Ω^T @ values``
    product (one sparse-dense matmul, much faster than a scatter of long rows on CPU);
    vectors through ``index_add_``.
    """
    if values.dim() == 2 and values.is_floating_point():
        w = weights.to(values.dtype) if weights is not None else torch.ones(
            index.numel(), dtype=values.dtype, device=values.device)
        rows = torch.stack([index, torch.arange(index.numel(), device=index.device)])
        with quiet_sparse():
            omega_t = torch.sparse_coo_tensor(rows, w, (num, index.numel()))
            return torch.sparse.mm(omega_t, values)
    if weights is not None:
        values = values * weights.reshape((-1,) + (1,) * (values.dim() - 1))
    out = torch.zeros((num,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
    out.index_add_(0, index, values)
    return out


def segment_rows(P: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, num: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[k] = sum_i [index_i == k] w_i P[rows_i]`` — :func:`segment_sum` of ``P[rows]`` without gathering
    the rows: one CSR ``(num, len(P))`` x dense product reads them where they are (measured on CPU:
    ~7x faster than gathering 3000 rows of 3136 first)."""
    order = torch.argsort(index, stable=True)
    crow = torch.zeros(num + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.cumsum(torch.bincount(index, minlength=num), 0)
    w = weights[order].to(P.dtype) if weights is not None else torch.ones(index.numel(), dtype=P.dtype,
                                                                          device=P.device)
    with quiet_sparse():
        omega = torch.sparse_csr_tensor(crow, rows[order], w, (num, P.shape[0]))
        return omega @ P


def cc_fixed_rounds(num_nodes: int, edges: torch.Tensor, active_mask: torch.Tensor | None = None,
                    rounds: int | None = None, jumps: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Connected components in a FIXED number of rounds, without any host synchronisation.

    The same min-label hooking as :func:`cc_torch` (every node and its current root take the
    smallest label among their neighbours, both edge directions) followed by ``jumps`` pointer
    jumps, repeated ``rounds`` times — a fixed op sequence whatever the graph (CUDA-graph
    friendly). ``edges`` is ``(2, E)``; ``active_mask (E,)`` (bool) selects the edges that count
    (inactive edges become self-loops, so shapes stay fixed).

    Returns ``(labels, converged)``: ``converged`` is a 0-dim bool tensor on the device, true iff
    every active edge joins equal labels and every label is a fixed point (``lab[lab] == lab``).
    Labels always stay inside the node's component and never increase, so when ``converged``
    is true each label is the smallest node id of its component — identical to
    :func:`cc_scipy` / :func:`cc_torch`. When it is false the labels are a valid but incomplete
    merge (the caller must not use them as components).

    Defaults: ``jumps = ceil(log2(num_nodes))``, ``rounds = 2 * ceil(log2(num_nodes)) + 2``.
    """
    device = edges.device
    lab = torch.arange(num_nodes, device=device)
    if num_nodes == 0 or edges.numel() == 0:
        return lab, torch.ones((), dtype=torch.bool, device=device)
    lg = max(1, math.ceil(math.log2(max(num_nodes, 2))))
    rounds = 2 * lg + 2 if rounds is None else int(rounds)
    jumps = lg if jumps is None else int(jumps)
    u, v = edges[0], edges[1]
    if active_mask is not None:
        v = torch.where(active_mask, v, u)                     # inactive edge -> self-loop: no effect
    uu = torch.cat([u, v])
    vv = torch.cat([v, u])
    for _ in range(rounds):                                    # fixed number of rounds, no early exit
        lv = lab[vv]
        new = lab.scatter_reduce(0, uu, lv, reduce="amin")     # hook node to smallest neighbour label
        new.scatter_reduce_(0, lab[uu], lv, reduce="amin")     # hook its root too
        for _ in range(jumps):                                 # pointer jumping
            new = new[new]
        lab = new
    converged = (lab[uu] == lab[vv]).all() & (lab[lab] == lab).all()
    return lab, converged
