"""Static OAP: Algorithm 1 on fixed shapes with no host synchronisation inside the layer loop.

The compact path (:meth:`OnlineAgglomerativePooling.pool_compact`) renumbers the supernodes
after every merge (``unique``, ``nonzero``, host-side sizes, scipy components): on a GPU every
one of those is a host round trip. This path keeps every shape fixed for the whole forward,
so the layer loop is a fixed sequence of kernels (CUDA-graph friendly) and the host reads the
device exactly once, after the loop:

* **Slots.** Layer 0 works on the ``B*N`` token slots (the grid edges, ``S^f`` and ``S^s`` read
  from ``A`` exactly as the compact path does). Its supernodes are then compacted into
  ``C = min(capacity, N)`` node slots per image: the roots (the smallest token of each
  component) are ranked in token order by a cumsum, so node ``b*C + k`` is the ``k``-th
  supernode of image ``b`` in min-token order — the compact path's order. A later merge keeps
  the smallest slot of its members, which holds the smallest token: the order stays the
  compact order without re-compaction. An image with more than ``C`` supernodes after layer 0
  sets the ``capacity`` flag. Empty slots have ``size == 0`` (the finaliser keeps
  ``size >= phi >= 1`` only).
* **Edges.** Later layers map the fixed grid edges through ``token -> node``; an edge is active
  when its two nodes differ (duplicates are harmless: they carry the same similarity).
  ``S^f = V_u·V_v``, ``S^s = 1 - |P_u - P_v|_1 / N`` on every edge, in fixed-size chunks.
* **Components.** :func:`~labelwise.pseudo.oap.graph.cc_fixed_rounds`: a fixed number of
  hooking rounds with a fixed number of pointer jumps and a device-side convergence flag.
* **Merge.** sizes and profiles by ``index_add`` into the smallest member slot, Eq. 6 votes on
  all slots with ``torch.where`` keeping the old feature (and profile) of unchanged nodes —
  exact, like the compact path's reuse.
* **Semantic pooling.** ``S^f`` for all pairs of an image's nodes by one ``bmm``; the candidate
  pairs (both valid, ``i < j``, the exact bounds ``S^s <= 1`` and the block-sum bound of the
  compact path) are compacted into a fixed capacity ``Q`` with ``torch.nonzero_static`` (or
  an equivalent cumsum + scatter on torch < 2.6 CUDA); more
  candidates than ``Q`` sets the ``pairs`` flag.
* **Flags.** capacity overflow, pair overflow and non-convergence of any components call are
  device tensors, read once after the loop (together with the node counts for ``stats``). If
  any is set, the batch is recomputed with ``pool_compact`` and ``stats["static_fallback"]`` is
  true (``stats["static_fallback_reason"]`` says why), so the result is always exact.

``edge_update="literal"`` (which links supernodes two hops apart) is not supported statically:
:func:`pool_static` falls back to ``pool_compact`` for it.

Knobs (module defaults; the config keys ``static_capacity``, ``static_pairs``,
``static_chunk_elems`` and ``cc_rounds`` override them when present, keywords of
:func:`pool_static` override both): ``capacity`` (node slots per image after layer 0),
``pairs`` (semantic candidate pairs per layer, whole batch), ``chunk_elems`` (elements of one
``S^s`` chunk), ``rounds`` / ``jumps`` (components).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn

from labelwise.pseudo.oap.graph import cc_fixed_rounds
from labelwise.pseudo.oap.pooling import Keys, LayerRecord, grid_edges, vote_weights

__all__ = ["CC_JUMPS", "CC_ROUNDS", "STATIC_CAPACITY", "STATIC_CHUNK_ELEMS", "STATIC_PAIRS", "StaticResult",
           "cc_jumps", "nonzero_static", "pool_static", "static_layers"]

STATIC_CAPACITY = 1024          # node slots per image after layer 0
STATIC_PAIRS = 1 << 16          # semantic candidate pairs per layer (whole batch)
STATIC_CHUNK_ELEMS = 1 << 26    # elements of one S^s chunk (rows x tokens; 256 MB in float32)
CC_ROUNDS = 8                   # hooking rounds per components call (see cc_jumps)
CC_JUMPS = 4                    # pointer jumps per round
_SLACK = 1e-4                   # the compact path's slack on the block-sum bound


def cc_jumps(num_nodes: int) -> int:
    """Pointer jumps per hooking round: ``min(CC_JUMPS, ceil(log2(num_nodes)))``.

    Measured (rounds until :func:`cc_fixed_rounds` converges): OAP graphs of smooth random
    features and of the synthetic layouts (56x56, 3 threshold schedules, instance and semantic
    steps) need <= 5 rounds with 4 jumps (most need 1-2); adversarial components — one
    maze-shaped spanning tree or spiral covering a whole 56x56 / 112x112 grid — need 6; a
    randomly numbered 50k-node chain needs 10 (-> fallback). 4 jumps per round converge in as
    few rounds as ``ceil(log2 n)`` jumps on all of these, 2 jumps need up to one more round."""
    return max(1, min(CC_JUMPS, math.ceil(math.log2(max(num_nodes, 2)))))


@dataclass
class StaticResult:
    """What :func:`static_layers` returns: the records and device-side flags / counts (unread)."""

    inst: list[LayerRecord]
    sem: list[LayerRecord]
    flags: dict[str, torch.Tensor]                      # name -> 0-dim bool (True = problem)
    inst_nodes: list[torch.Tensor] = field(default_factory=list)   # 0-dim int64 per layer
    sem_nodes: list[torch.Tensor] = field(default_factory=list)


def _knob(pool, name: str, default: int, given: int | None) -> int:
    if given is not None:
        return int(given)
    val = getattr(pool.cfg, name, None)
    return int(val) if val else default


def pool_static(pool, K: Keys, A: torch.Tensor, h: int, w: int, *, capacity: int | None = None,
                pairs: int | None = None, rounds: int | None = None, jumps: int | None = None,
                chunk_elems: int | None = None) -> tuple[list[LayerRecord], list[LayerRecord], dict]:
    """Algorithm 1 on fixed shapes (see the module docstring); same contract as ``pool.pool_compact``:
    ``(instance records, semantic records, stats)``. One host read after the loop; falls back to
    ``pool_compact`` (``stats["static_fallback"] = True``) on overflow / non-convergence, and for
    ``edge_update="literal"``."""
    c = pool.cfg
    if c.edge_update != "adjacent":
        return _fallback(pool, K, A, h, w, "edge_update=literal is not supported by the static path")
    capacity = _knob(pool, "static_capacity", STATIC_CAPACITY, capacity)
    pairs = _knob(pool, "static_pairs", STATIC_PAIRS, pairs)
    rounds = _knob(pool, "cc_rounds", CC_ROUNDS, rounds)
    chunk_elems = _knob(pool, "static_chunk_elems", STATIC_CHUNK_ELEMS, chunk_elems)
    res = static_layers(pool, K, A, h, w, capacity=capacity, pairs=pairs, rounds=rounds, jumps=jumps,
                        chunk_elems=chunk_elems)
    names = list(res.flags)
    flags = torch.stack([res.flags[k] for k in names]).long()
    counts = torch.stack(res.inst_nodes + res.sem_nodes) if res.inst_nodes else flags.new_zeros(0)
    host = torch.cat([flags, counts.long()]).tolist()             # the one host read
    bad = [k for k, f in zip(names, host[:len(names)]) if f]
    if bad:
        why = {"capacity": f"capacity: an image has more than {min(capacity, h * w)} supernodes after layer 0 "
                           "(static_capacity)",
               "pairs": f"pairs: more than {pairs} semantic candidate pairs in a layer (static_pairs)",
               "cc_rounds": f"cc_rounds: connected components did not converge in {rounds} rounds (cc_rounds)"}
        return _fallback(pool, K, A, h, w, "; ".join(why[k] for k in bad))
    T = len(res.inst)
    vals = host[len(names):]
    stats = {"tokens": K.F.shape[0] * K.F.shape[1], "instance_nodes": vals[:T], "semantic_nodes": vals[T:],
             "impl": "static", "static_fallback": False}
    return res.inst, res.sem, stats


def _fallback(pool, K, A, h, w, reason: str):
    inst, sem, stats = pool.pool_compact(K, A, h, w)
    stats = dict(stats)
    stats.update(impl="static", static_fallback=True, static_fallback_reason=reason)
    return inst, sem, stats


# ---------------------------------------------------------------------- the layer loop
def static_layers(pool, K: Keys, A: torch.Tensor, h: int, w: int, *, capacity: int = STATIC_CAPACITY,
                  pairs: int = STATIC_PAIRS, rounds: int = CC_ROUNDS, jumps: int | None = None,
                  chunk_elems: int = STATIC_CHUNK_ELEMS) -> StaticResult:
    """All OAP layers on fixed shapes; no host synchronisation (no ``.item()``, ``nonzero``,
    ``unique``, boolean indexing, device->host copies): the op sequence depends only on
    ``(B, h, w, D)``, the config and the knobs, never on the data."""
    c = pool.cfg
    F = K.F
    B, N, _ = F.shape
    dev = F.device
    BN = B * N
    C = max(1, min(int(capacity), N))
    BC = B * C
    tok = torch.arange(BN, device=dev)
    tok_pos = tok % N
    diag = torch.diagonal(A, dim1=1, dim2=2).reshape(BN)           # A_tt
    node_img = torch.arange(BC, device=dev) // C
    g = grid_edges(h, w, B, device=dev)                              # fixed (2, E0)
    jumps_tok = cc_jumps(BN) if jumps is None else int(jumps)
    jumps_node = cc_jumps(BC) if jumps is None else int(jumps)
    flags: dict[str, torch.Tensor] = {}
    res = StaticResult([], [], flags)

    def flag(name: str, bad: torch.Tensor) -> None:
        flags[name] = flags[name] | bad if name in flags else bad

    assign = size = P = V = None
    for t, tau in enumerate(c.thresholds):
        # ---------------- Identify (Eqs. 2-4) on the grid edges + fixed-round components
        if t == 0:
            sf = pool._grid_feature(A, h, w)                         # V^0 = F: S^f read from A
            contract = c.w_f * sf + c.w_s > tau
            if c.w_s > 0:
                ss = pool._grid_spatial(A, h, w, chunk_elems)
                contract = contract & (c.w_f * sf + c.w_s * ss > tau)
            lab, conv = cc_fixed_rounds(BN, g, contract, rounds, jumps_tok)
            flag("cc_rounds", ~conv)
            # ---------------- compaction: roots ranked in token order, C slots per image
            is_root = (lab == tok).view(B, N).long()
            rank = torch.cumsum(is_root, dim=1) - 1                   # (B, N) rank among roots
            flag("capacity", (rank[:, -1] >= C).any())
            slot = (torch.arange(B, device=dev)[:, None] * C + rank.clamp(max=C - 1)).reshape(BN)
            assign = slot[lab]                                        # token -> node
            size = torch.zeros(BC, device=dev, dtype=F.dtype).index_add_(0, assign, torch.ones_like(diag))
            P = torch.zeros(BC, N, device=dev, dtype=A.dtype).index_add_(0, assign, A.reshape(BN, N))
            P = P / size.clamp(min=1)[:, None]                        # M A / |M| (singletons: A rows)
            V = _vote(pool, P, size, F, B, C)                         # every node voted at layer 0
        else:
            eu, ev = assign[g[0]], assign[g[1]]
            sf = (V[eu] * V[ev]).sum(-1)                              # Eq. 2
            contract = (eu != ev) & (c.w_f * sf + c.w_s > tau)
            if c.w_s > 0:
                ss = pool._spatial(P, eu, ev, chunk_elems)            # Eq. 3
                contract = contract & (c.w_f * sf + c.w_s * ss > tau)  # Eq. 4
            lab, conv = cc_fixed_rounds(BC, torch.stack([eu, ev]), contract, rounds, jumps_node)
            flag("cc_rounds", ~conv)
            assign = lab[assign]
            size, P, V = _merge(pool, lab, size, P, V, F, B, C, revote_all=not c.reuse_votes)
        res.inst_nodes.append((size > 0).sum())
        res.inst.append(LayerRecord(assign, size, node_img, V, *pool._stats(P, assign, tok_pos, diag, BC)))

        if c.semantic_pooling:                                        # fully connected graph, one step
            gl = _semantic_groups(pool, P, V, size, B, C, tau, pairs, rounds, jumps_node, chunk_elems, flag)
            gsize, gP, gV = _merge(pool, gl, size, P, V, F, B, C, revote_all=False)
            gassign = gl[assign]
            res.sem_nodes.append((gsize > 0).sum())
            res.sem.append(LayerRecord(gassign, gsize, node_img, gV, *pool._stats(gP, gassign, tok_pos, diag, BC)))
    return res


# ---------------------------------------------------------------------- helpers (all fixed shapes)
def _vote(pool, P: torch.Tensor, size: torch.Tensor, F: torch.Tensor, B: int, C: int) -> torch.Tensor:
    """Eq. 6 for every slot, as ``pool.vote`` but one fixed-shape ``bmm`` per batch."""
    W = vote_weights(P, size, pool.cfg.sigma, pool.cfg.vote)
    return Fn.normalize(torch.bmm(W.view(B, C, -1), F).reshape(B * C, -1), dim=-1)


def _merge(pool, om: torch.Tensor, size: torch.Tensor, P: torch.Tensor, V: torch.Tensor, F: torch.Tensor,
           B: int, C: int, revote_all: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge slots into ``om`` (node -> its component's smallest slot): sizes, profiles (size-weighted
    mean of member rows for changed nodes, old row otherwise), votes (old feature for unchanged
    nodes unless ``revote_all``)."""
    n = om.numel()
    cnt = torch.zeros(n, device=om.device, dtype=size.dtype).index_add_(0, om, torch.ones_like(size))
    changed = cnt > 1                                                 # a root that absorbed others
    size2 = torch.zeros_like(size).index_add_(0, om, size)
    sums = torch.zeros_like(P).index_add_(0, om, P * size[:, None])
    P2 = torch.where(changed[:, None], sums / size2.clamp(min=1)[:, None], P)
    V2 = _vote(pool, P2, size2, F, B, C)
    if not revote_all:
        V2 = torch.where(changed[:, None], V2, V)
    return size2, P2, V2


def nonzero_static(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the first ``size`` true entries of a 1-D bool ``mask``, in order, padded with -1 —
    ``torch.nonzero_static`` (no host sync; CUDA kernel since torch 2.6) or, where that op is
    missing, the same from a cumsum and a scatter."""
    try:
        return torch.nonzero_static(mask, size=size, fill_value=-1).squeeze(1)
    except (AttributeError, NotImplementedError):
        return _nonzero_static_scan(mask, size)


def _nonzero_static_scan(mask: torch.Tensor, size: int) -> torch.Tensor:
    pos = torch.cumsum(mask.long(), 0) - 1                            # rank of each true entry
    dest = torch.where(mask & (pos < size), pos, torch.full_like(pos, size))   # the rest -> a spare slot
    out = torch.full((size + 1,), -1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, dest, torch.arange(mask.numel(), device=mask.device))[:size]


def _semantic_groups(pool, P, V, size, B: int, C: int, tau: float, pairs: int, rounds: int, jumps: int,
                     chunk_elems: int, flag) -> torch.Tensor:
    """One Identify step on the fully connected graph of each image's valid nodes: the group label
    (smallest slot of the group) of every slot."""
    c = pool.cfg
    N = P.shape[1]
    pairs = max(1, min(pairs, B * C * (C - 1) // 2))                 # no more than there can be
    Vb = V.view(B, C, -1)
    sf_all = torch.bmm(Vb, Vb.transpose(1, 2))                        # Eq. 2 for all pairs
    valid = (size > 0).view(B, C)
    ok = valid[:, :, None] & valid[:, None, :] & torch.ones(C, C, dtype=torch.bool, device=P.device).triu(1)
    ok = ok & (c.w_f * sf_all + c.w_s > tau)                          # exact: S^s <= 1
    if c.w_s > 0:                                                     # exact: block-sum bound of |P_u - P_v|_1
        blocks = pool._block_sums(P).view(B, C, -1)
        lb = torch.cdist(blocks, blocks, p=1)
        ok = ok & (c.w_f * sf_all + c.w_s * (1.0 - lb / N) > tau - _SLACK)
    flag("pairs", ok.sum() > pairs)
    idx = nonzero_static(ok.reshape(-1), pairs)
    live = idx >= 0
    idx = idx.clamp(min=0)
    b, r = idx // (C * C), idx % (C * C)
    u, v = b * C + r // C, b * C + r % C
    sf = sf_all.reshape(-1)[idx]
    contract = live & (c.w_f * sf + c.w_s > tau)
    if c.w_s > 0:
        ss = pool._spatial(P, u, v, chunk_elems)
        contract = contract & (c.w_f * sf + c.w_s * ss > tau)
    gl, conv = cc_fixed_rounds(B * C, torch.stack([u, v]), contract, rounds, jumps)
    flag("cc_rounds", ~conv)
    return gl
