"""Online Agglomerative Pooling (OAP), paper Sec. 4.2 / Algorithm 1 — the pseudo-mask part.

Input: last-block key features ``(B, h, w, D)`` of a (self-supervised) backbone. Output: per
image, a hierarchy of token-level masks at two levels — ``instance`` (connected regions,
pooled on the 4-neighbour adjacency graph) and ``semantic`` (possibly disjoint regions,
pooled on the fully connected graph of the instance supernodes) — with their features,
the OAP layer each came from, and a score.

Symbols (Algorithm 1) -> code: ``F`` L2-normalised keys (``F``), ``A = F Fᵀ`` (``A``), ``M^t``
(implicit: ``assign`` maps every token to its supernode), ``Ω`` (``om``: old node -> new node),
``E^t`` (``edges``, a ``(2, E)`` list), ``V^t`` (``V``), ``M_i A / |M_i|`` (``P``, the affinity
profiles), ``τ_t`` (``thresholds``), ``σ``, ``ω_f``, ``ω_s``, ``φ`` (``phi``).

Two implementations of the same algorithm, chosen by ``impl`` (identical masks, tested):

* ``compact`` (CPU default): supernodes are renumbered after every merge, so every layer
  works on as many rows as there are supernodes; it prunes with host-side index lists.
* ``static`` (CUDA default, :mod:`.static`): the first layer works on the ``B*h*w`` token slots,
  then every image keeps ``min(static_capacity, h*w)`` node slots (a supernode lives in the slot
  of its smallest member), connected components run a fixed number of pointer-jumping rounds —
  no host synchronisation inside the layer loop, batched, fixed shapes (CUDA-graph friendly);
  device-side flags (capacity, pairs, convergence) read once after the loop send a batch to
  ``compact`` when a fixed size was too small, so the result is always exact.

Interpretation choices (the paper is loose here; all configurable, see ``OAPConfig``):

* Graph: ``F`` = L2-normalised keys (optionally centred per image first), 4-neighbourhood
  edges, ``A = F Fᵀ`` per image.
* Identify (Eqs. 2-4): ``S = w_f S^f + w_s S^s``; an edge is contracted when ``S > τ_t``.
  ``S^s`` uses the membership-averaged affinity profiles ``P_i = M_i A / |M_i|`` and is
  only evaluated on the pairs that survive exact upper bounds of ``S``: ``S^s <= 1``, and
  ``|P_i - P_j|_1 >= sum over token blocks of |block sums of P_i - P_j|`` (the triangle
  inequality; one block = all tokens gives ``|ΣP_i - ΣP_j|``).
* Merge (Eq. 5): ``edge_update="adjacent"`` (default) reads Eq. 5 as ``Ωᵀ E Ω`` without
  self-loops — supernodes are linked iff some of their members are adjacent, which is
  what the text says ("edges are maintained only between adjacent supernodes"), and keeps
  every instance mask 4-connected. ``"literal"`` evaluates ``Ωᵀ Ē (Ωᵀ Ē)ᵀ`` with
  ``Ē = E + I``: it also links supernodes two hops apart, so its instance masks can be
  disconnected (against the paper's connectivity claim; kept for comparison).
* Eq. 6 (feature update): ``vote="sum"`` (default, literal) uses ``softmax(M_i A / σ) F``
  with binary ``M_i`` — a sum of member affinities, near-argmax for large supernodes;
  ``vote="mean"`` divides by ``|M_i|`` like Eq. 3. Exact reuse (``reuse_votes``): a supernode
  whose membership did not change keeps its Eq. 6 feature and profile; only changed
  supernodes are voted. At the first layer every node is voted (``V^0 = F`` is not a vote);
  a singleton semantic group takes its instance supernode's feature.
* Collection (Alg. 1 lines 8-13): after each layer every supernode with area ``>= φ`` is an
  instance mask (the indices in lines 10-11 do not match; this is the consistent reading).
  Semantic pooling: one Identify+Merge step per layer with the layer's ``τ_t`` on the fully
  connected graph of that layer's instance supernodes; its groups with area ``>= φ`` are
  semantic masks; it is not fed to the next layer.
* Duplicates: an unchanged supernode reappears identically at later layers.
  ``dedup="unique"`` keeps each distinct mask once (per image and level) at the layer it
  first appeared and counts the layers it persisted; ``dedup="all"`` keeps every copy.
  ``nms_iou < 1`` then applies standard greedy NMS in score order (a suppressed mask
  suppresses nothing).
* Score (masks carry none in the paper; needed for AP ranking): ``contrast`` is the mean
  affinity between *distinct* tokens of the mask minus the mean affinity of its tokens to the
  rest of the image; ``contrast_self`` is the same with the self-affinities ``A_ii = 1`` inside
  (the earlier definition: it favours small masks); ``persistence`` the fraction of layers the
  mask survived unchanged; ``contrast_persistence`` = contrast x persistence; ``area``.
* Image border (``border``; masks unchanged, only scores): with CNN keys the tokens of the
  outermost row/column share a zero-padding component (centred EfficientNet-Lite0 keys at 14x14:
  mean affinity 0.25 between distinct ring tokens against ~0 between interior tokens, objects
  testbed), so border strips and corners are tight, isolated clusters: high ``in``, low ``out``,
  formed at the first layer and never merged (persistence 1). ``debias`` subtracts that per-image
  excess ``δ = mean A(ring, ring) - mean A(interior, interior)`` (clamped at 0) from every
  ring-ring pair in the contrast terms; ``prior`` multiplies the score by the boundary-connectivity
  background weight ``exp(-BndCon² / 2)``, ``BndCon = |mask ∩ ring| / sqrt(|mask|)`` (σ = 1 as
  in Zhu et al., CVPR 2014), a mask's length along the border relative to its size.

Exact speed-ups (each gives the same masks; tests compare them with the plain computation):
``A`` from upper blocks only (it is symmetric) or, for ReLU backbones whose keys are mostly
zeros, from a sparse ``x xᵀ`` with an exact rank-2 correction for the centring
(``affinity``); the first layer's ``S^f`` read from ``A`` (``M = I``); profiles of new supernodes
from segment sums of their members' rows or from supernode feature sums (``profiles``); the
semantic pairs' ``S^f`` from upper blocks on CPU; unchanged supernodes keep profile and vote.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn

from labelwise.config import from_dict, param
from labelwise.pseudo.oap.graph import connected_components, relabel, segment_sum

__all__ = ["OAPConfig", "MaskSet", "OAPImageResult", "OnlineAgglomerativePooling", "LayerRecord", "Keys", "vote_embeddings",
           "vote_weights",
           "grid_edges", "gram", "nms_keep", "border_ring", "ring_size", "ring_excess", "BORDER_RULES"]

SCORES = ("contrast", "contrast_self", "persistence", "contrast_persistence", "area")
BORDER_RULES = ("none", "debias", "prior")


@dataclass
class OAPConfig:
    thresholds: tuple[float, ...] = param((0.8, 0.7, 0.6, 0.5, 0.4), range=(-1.0, 1.0),
                                          help="per-layer thresholds tau_t (decreasing: fine -> coarse)")
    sigma: float = param(0.07, range=(1e-6, None), help="softmax temperature of Eq. 6")
    w_f: float = param(0.6, range=(0.0, 1.0), help="feature-similarity weight (Eq. 4)")
    w_s: float = param(0.4, range=(0.0, 1.0), help="spatial-similarity weight (Eq. 4)")
    min_area: int = param(5, range=(1, None), help="area filter phi, in tokens")
    min_area_frac: float | None = param(None, range=(0.0, 1.0),
                                        help="area filter phi as a fraction of the token grid (replaces "
                                             "min_area when set: phi = max(1, round(frac * h * w)))")
    vote: str = param("sum", choices=("sum", "mean"), help="Eq. 6 literal (sum of member affinities) or normalised")
    edge_update: str = param("adjacent", choices=("adjacent", "literal"),
                             help="Eq. 5 reading (literal links supernodes two hops apart: masks may be disconnected)")
    semantic_pooling: bool = param(True, help="also produce semantic-level masks")
    center_features: bool = param(False, help="subtract the per-image mean key before L2-normalising")
    dedup: str = param("unique", choices=("unique", "all"), help="keep each distinct mask once, or every layer's copy")
    nms_iou: float = param(1.0, range=(0.0, 1.0), help="standard greedy NMS per image and level in score order: "
                                                       "drop a mask with IoU > this to a kept better one (1.0 = off)")
    score: str = param("contrast_persistence", choices=SCORES,
                       help="mask scoring rule (for AP ranking; chosen on the objects train split, bench/README.md)")
    border: str = param("none", choices=BORDER_RULES,
                        help="image-border handling of the score (the masks are unchanged): none = as before; "
                             "debias = the contrast terms without the per-image excess affinity among "
                             "outermost-ring tokens (a zero-padding artefact of CNN keys); prior = score x "
                             "exp(-BndCon^2 / 2), BndCon = ring tokens / sqrt(area) (boundary connectivity, "
                             "Zhu et al. CVPR 2014); bench/oap_real_photos.md")
    impl: str = param("auto", choices=("auto", "compact", "static"),
                      help="compact (renumbered supernodes; CPU) or static (fixed slots, no host syncs; GPU); "
                           "auto = static on CUDA")
    affinity: str = param("auto", choices=("auto", "dense", "symmetric", "sparse"),
                          help="how A = F F^T is computed (all exact): one product, upper blocks only, or a sparse "
                               "product of ReLU keys; auto = dense on GPU, sparse when >= 80% of the keys are 0, "
                               "else symmetric")
    profiles: str = param("auto", choices=("auto", "segment", "features"),
                          help="profiles M_i A / |M_i| of new supernodes: segment sums of member rows, or "
                               "(mean member feature) F^T; auto picks the cheaper")
    static_capacity: int = param(1024, range=(1, None),
                                 help="static impl: supernode slots per image after the first layer (more: exact "
                                      "fallback to compact)")
    static_pairs: int = param(1 << 16, range=(1, None),
                              help="static impl: candidate pairs per batch in semantic pooling (more: exact fallback)")
    block: int = param(512, range=(16, None), help="row block of the symmetric / sparse affinity product")
    cc_backend: str = param("auto", choices=("auto", "torch", "scipy"), help="connected-components backend")
    cc_rounds: int = param(0, range=(0, None), help="static impl: hooking rounds of connected components (0 = "
                                                     "8 rounds x 4 pointer jumps, measured; a graph that does not "
                                                     "converge falls back exactly to compact)")
    static_chunk_elems: int = param(1 << 26, range=(1 << 10, None),
                                    help="static impl: elements of one chunk of the spatial term S^s")
    chunk_elems: int = param(1 << 22, range=(1 << 10, None), help="memory chunk (elements) for the spatial term")
    reuse_votes: bool = param(True, help="exact: recompute Eq. 6 only for supernodes whose membership changed")

    def validate(self) -> None:
        from labelwise.errors import LabelwiseError

        if len(self.thresholds) == 0:
            raise LabelwiseError("config key 'thresholds' must list at least one threshold")

    def phi(self, num_tokens: int) -> int:
        """The area filter in tokens for a grid of ``num_tokens`` tokens."""
        if self.min_area_frac is None:
            return int(self.min_area)
        return max(1, round(self.min_area_frac * num_tokens))


@dataclass
class MaskSet:
    """Masks of one level for one image (K masks on the h x w token grid)."""

    masks: torch.Tensor        # (K, h, w) bool
    features: torch.Tensor     # (K, D) L2-normalised supernode features (Eq. 6)
    scores: torch.Tensor       # (K,) float
    layers: torch.Tensor       # (K,) int64, OAP layer (0-based) where the mask first appeared
    persistence: torch.Tensor  # (K,) int64, number of layers the mask existed
    areas: torch.Tensor        # (K,) int64, tokens

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class OAPImageResult:
    instance: MaskSet
    semantic: MaskSet
    levels: tuple[str, ...] = field(default=("instance", "semantic"))

    def level(self, name: str) -> MaskSet:
        return getattr(self, name)


@dataclass
class LayerRecord:
    """One level of one OAP layer for the whole batch — all the finaliser needs.

    Node ids may have unused slots (``size == 0``; the static implementation keeps a fixed
    number of slots per image). ``row_in[i] = Σ_{t∈i} P_i[t]``, ``total[i] = Σ_t P_i[t]``,
    ``self_aff[i] = Σ_{t∈i} A_tt`` give the contrast scores without the masks."""

    assign: torch.Tensor     # (B*N,) node id of every token
    size: torch.Tensor       # (S,) tokens per node
    node_img: torch.Tensor   # (S,) image of each node
    features: torch.Tensor   # (S, D) Eq. 6 features
    row_in: torch.Tensor     # (S,)
    total: torch.Tensor      # (S,)
    self_aff: torch.Tensor   # (S,)


@dataclass
class Keys:
    """L2-normalised keys ``F`` and, for ReLU keys, what the sparse products need:
    ``F_t = (x_t - mu) * inv_norm_t`` with ``x`` mostly zeros."""

    F: torch.Tensor                       # (B, N, D)
    x: torch.Tensor | None = None         # (B, N, D) raw keys (sparse path only)
    mu: torch.Tensor | None = None        # (B, 1, D) per-image mean (None: not centred)
    inv_norm: torch.Tensor | None = None  # (B, N)


def grid_edges(h: int, w: int, batch: int = 1, device: Any = None) -> torch.Tensor:
    """4-neighbourhood edges of a ``batch`` of h x w grids, node ids offset by ``b * h * w``:
    per image all horizontal edges (row-major), then all vertical ones."""
    idx = torch.arange(h * w, device=device).reshape(h, w)
    e = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)]),
                   torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])], dim=1)
    off = (torch.arange(batch, device=device) * h * w).repeat_interleave(e.shape[1])
    return e.repeat(1, batch) + off


# ---------------------------------------------------------------------- the affinity A = F Fᵀ
def border_ring(h: int, w: int, device: Any = None) -> torch.Tensor:
    """``(h, w)`` bool: the tokens in the outermost row or column of the grid."""
    ring = torch.zeros(h, w, dtype=torch.bool, device=device)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    return ring


def ring_size(h: int, w: int) -> int:
    """Number of tokens in the outermost row or column of an ``h x w`` grid (from the shape, so
    no device tensor is read back)."""
    return h * w - max(h - 2, 0) * max(w - 2, 0)


def ring_excess(A: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B,)``: mean affinity between distinct outermost-ring tokens minus that between distinct
    interior tokens, clamped at 0 — how much more ring tokens look alike than content explains
    (zero padding gives CNN keys a shared border component). 0 when the grid has no interior."""
    if h < 3 or w < 3:
        return A.new_zeros(A.shape[0])
    ring = border_ring(h, w, A.device).flatten().to(A.dtype)
    inner = 1.0 - ring
    diag = A.diagonal(dim1=1, dim2=2)                                  # (B, N); 1 unless a key is all-zero
    R = ring_size(h, w)
    I = h * w - R
    rr = (torch.einsum("bst,s,t->b", A, ring, ring) - diag @ ring) / (R * (R - 1))
    ii = (torch.einsum("bst,s,t->b", A, inner, inner) - diag @ inner) / max(I * (I - 1), 1.0)
    return (rr - ii).clamp(min=0)


def _csr(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():                            # torch's sparse "beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return x.to_sparse_csr()


def gram(keys: Keys, mode: str, block: int = 512) -> torch.Tensor:
    """``A = F Fᵀ`` per image, ``(B, N, N)``.

    ``dense``: one batched product. ``symmetric``: only the blocks on and above the diagonal
    are multiplied, the others are their transposes (A is symmetric; ~0.6x the work).
    ``sparse``: the same blocks from the raw ReLU keys ``x`` (mostly zeros) as a sparse x dense
    product, with the centring and the normalisation put back exactly:
    ``(x_i - mu)·(x_j - mu) = x_i·x_j - a_i - a_j + mu·mu`` with ``a = x mu``.
    """
    F = keys.F
    B, N, _ = F.shape
    if mode == "dense":
        return torch.bmm(F, F.transpose(1, 2))
    A = F.new_empty(B, N, N)
    for b in range(B):                                         # images, then fixed-size row blocks
        if mode == "sparse":
            xb = keys.x[b]
            xt = xb.t().contiguous()
            xs = _csr(xb)                                      # converted once, sliced by row blocks
            crow, col, val = xs.crow_indices(), xs.col_indices(), xs.values()
            inv = keys.inv_norm[b]
            if keys.mu is not None:
                a = xb @ keys.mu[b, 0]
                c = keys.mu[b, 0] @ keys.mu[b, 0]
        for i in range(0, N, block):
            j = min(i + block, N)
            if mode == "sparse":
                r0, r1 = int(crow[i]), int(crow[j])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    rows = torch.sparse_csr_tensor(crow[i:j + 1] - r0, col[r0:r1], val[r0:r1], (j - i, xb.shape[1]))
                blk = rows @ xt[:, i:]
                if keys.mu is not None:
                    blk.sub_(a[i:j, None]).sub_(a[None, i:]).add_(c)
                blk.mul_(inv[i:j, None]).mul_(inv[None, i:])
            elif mode == "symmetric":
                blk = F[b, i:j] @ F[b, i:].t()
            else:
                raise ValueError(f"unknown affinity mode {mode!r}; use dense, symmetric or sparse")
            A[b, i:j, i:] = blk
            A[b, j:, i:j] = blk[:, j - i:].t()
    return A


def weighted_keys(W: torch.Tensor, keys: Keys, img: torch.Tensor) -> torch.Tensor:
    """``W_k F_{img_k}`` for rows ``W (K, N)`` of images ``img (K,)`` (sorted): ``(K, D)``, one
    batched product. (A sparse product through ReLU keys does not pay here: on CPU it was slower
    than the dense one for every row count measured.)"""
    F = keys.F
    B = F.shape[0]
    if B == 1:
        return W @ F[0]
    pos, smax = _positions(img, B)
    pad = W.new_zeros(B, smax, W.shape[1])
    pad[img, pos] = W
    return torch.bmm(pad, F)[img, pos]


def vote_weights(P: torch.Tensor, size: torch.Tensor, sigma: float, vote: str = "sum") -> torch.Tensor:
    """Eq. 6's ``softmax(M_i A / σ)`` from profile rows ``P = M_i A / |M_i|`` and sizes ``|M_i|``:
    ``vote="sum"`` (literal, binary ``M_i``) multiplies back by ``|M_i|``, ``"mean"`` keeps the
    normalised profile."""
    logits = P * size[:, None] if vote == "sum" else P
    return torch.softmax(logits / sigma, dim=-1)


def _positions(node_img: torch.Tensor, B: int) -> tuple[torch.Tensor, int]:
    counts = torch.bincount(node_img, minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(node_img.numel(), device=node_img.device) - starts[node_img]
    return pos, int(counts.max()) if counts.numel() else 0


def nms_keep(masks: torch.Tensor, iou: float) -> torch.Tensor:
    """Standard greedy NMS over ``masks (K, N)`` already sorted best first: a mask is kept iff no
    *kept* better mask overlaps it with IoU > ``iou``. Vectorised fixed point: after round r the
    first r decisions are final, and the loop stops as soon as nothing changes."""
    K = masks.shape[0]
    if K <= 1 or iou >= 1.0:
        return torch.ones(K, dtype=torch.bool, device=masks.device)
    m = masks.float()
    inter = m @ m.t()
    ar = m.sum(1)
    over = (inter / (ar[:, None] + ar[None, :] - inter).clamp(min=1)) > iou
    over &= torch.ones(K, K, dtype=torch.bool, device=masks.device).tril(-1)   # row i vs better j < i
    keep = torch.ones(K, dtype=torch.bool, device=masks.device)
    for _ in range(K):
        new = ~(over & keep[None, :]).any(1)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


class OnlineAgglomerativePooling(nn.Module):
    """Batched, device-agnostic OAP. ``forward(keys (B,h,w,D)) -> list[OAPImageResult]``.

    After a call, ``last_stats`` holds ``tokens`` (B*h*w) and the supernodes left after every
    layer, summed over the batch (``instance_nodes``, ``semantic_nodes``)."""

    def __init__(self, config: OAPConfig | dict | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = OAPConfig()
        elif isinstance(config, dict):
            config = from_dict(OAPConfig, config, source="OAP config")
        if overrides:
            from labelwise.config import to_dict

            config = from_dict(OAPConfig, {**to_dict(config), **overrides}, source="OAP config")
        self.cfg = config
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ graph initialisation
    def prepare(self, keys: torch.Tensor) -> tuple[Keys, torch.Tensor]:
        """``F`` (and the sparse factors when used) and ``A`` for keys ``(B, h, w, D)``."""
        c = self.cfg
        B, h, w, D = keys.shape
        x = keys.reshape(B, h * w, D).float()
        mu = x.mean(dim=1, keepdim=True) if c.center_features else None
        xc = x - mu if mu is not None else x
        norm = xc.norm(dim=-1).clamp_min(1e-12)                 # as F.normalize
        F = xc / norm[..., None]
        mode = c.affinity
        if mode == "auto":
            if keys.device.type != "cpu":
                mode = "dense"
            else:
                mode = "sparse" if int(torch.count_nonzero(x)) <= 0.2 * x.numel() else "symmetric"
        k = Keys(F=F, x=x, mu=mu, inv_norm=1.0 / norm) if mode == "sparse" else Keys(F=F)
        return k, gram(k, mode, c.block)

    # ------------------------------------------------------------------ identify (Eqs. 2-4)
    def _spatial(self, P: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                 chunk_elems: int | None = None) -> torch.Tensor:
        """Eq. 3 for the pairs (u[k], v[k]), in memory chunks of ``chunk_elems`` (default
        ``cfg.chunk_elems``); no host synchronisation (the static path uses it too)."""
        n_tok = P.shape[1]
        step = max(1, (chunk_elems or self.cfg.chunk_elems) // max(n_tok, 1))
        ss = torch.empty(u.numel(), dtype=P.dtype, device=P.device)
        for s in range(0, u.numel(), step):                     # memory chunks, not edges
            d = torch.index_select(P, 0, u[s:s + step])
            d.sub_(torch.index_select(P, 0, v[s:s + step])).abs_()
            ss[s:s + step] = 1.0 - d.sum(-1) / n_tok
        return ss

    def _similarity(self, V: torch.Tensor, P: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                    sf: torch.Tensor | None, tau: float, ss_all: torch.Tensor | None = None,
                    blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean 'contract' flag per candidate pair (u[k], v[k]): Eq. 4 > tau.

        ``S^s`` (Eq. 3) is evaluated only where exact upper bounds of ``S`` exceed tau:
        ``S^s <= 1``, then ``|P_u - P_v|_1 >= Σ_blocks |block sums of P_u - P_v|`` (``blocks``,
        the rows' block sums; the last column is the full sum)."""
        c = self.cfg
        if sf is None:
            sf = (V[u] * V[v]).sum(-1)                              # Eq. 2
        contract = torch.zeros(u.numel(), dtype=torch.bool, device=u.device)
        cand = torch.nonzero(c.w_f * sf + c.w_s > tau).squeeze(1)
        if cand.numel() == 0:
            return contract
        if c.w_s == 0:
            contract[cand] = True
            return contract
        if ss_all is not None:                                      # precomputed (first layer)
            contract[cand] = c.w_f * sf[cand] + c.w_s * ss_all[cand] > tau
            return contract
        n_tok = P.shape[1]
        if blocks is not None:                                      # block-sum lower bounds of |P_u - P_v|_1
            slack = 1e-4                                            # keeps float rounding of the bound harmless
            lb = (blocks[u[cand]] - blocks[v[cand]]).abs().sum(-1)
            cand = cand[c.w_f * sf[cand] + c.w_s * (1.0 - lb / n_tok) > tau - slack]
            if cand.numel() == 0:
                return contract
        ss = self._spatial(P, u[cand], v[cand])                     # Eq. 3
        contract[cand] = c.w_f * sf[cand] + c.w_s * ss > tau        # Eq. 4
        return contract

    def _grid_spatial(self, A: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Eq. 3 on every 4-neighbour edge of the first layer (M = I, so P = A), in the order of
        :func:`grid_edges`, from shifted views of A (no row gathers)."""
        B, N, _ = A.shape
        A4 = A.reshape(B, h, w, N)
        rows = max(1, self.cfg.chunk_elems // max(w * N, 1))
        out_h, out_v = [], []
        for r in range(0, h, rows):                                  # memory chunks of grid rows
            blk = A4[:, r:r + rows]
            d = blk[:, :, 1:] - blk[:, :, :-1]
            out_h.append(d.abs_().sum(-1))
            blk2 = A4[:, r:min(r + rows + 1, h)]
            if blk2.shape[1] > 1:
                d = blk2[:, 1:] - blk2[:, :-1]
                out_v.append(d.abs_().sum(-1))
        hd = torch.cat(out_h, 1).reshape(B, -1)
        vd = torch.cat(out_v, 1).reshape(B, -1) if out_v else A.new_zeros(B, 0)
        return 1.0 - torch.cat([hd, vd], 1).reshape(-1) / N

    @staticmethod
    def _grid_feature(A: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Eq. 2 on every first-layer edge: ``V^0 = F``, so ``S^f_ij = A_ij`` (read, not recomputed)."""
        B, N, _ = A.shape
        e = grid_edges(h, w, 1, device=A.device)
        flat = A.reshape(B, N * N)
        return flat[:, e[0] * N + e[1]].reshape(-1)

    # ------------------------------------------------------------------ Eq. 6
    def vote(self, P: torch.Tensor, size: torch.Tensor, node_img: torch.Tensor, keys: Keys) -> torch.Tensor:
        """``L2N{softmax(M_i A / σ) F}`` for profile rows ``P = M_i A / |M_i|``."""
        W = vote_weights(P, size, self.cfg.sigma, self.cfg.vote)
        return Fn.normalize(weighted_keys(W, keys, node_img), dim=-1)

    # ------------------------------------------------------------------ merge helpers
    def _merge_profiles(self, P: torch.Tensor, size: torch.Tensor, om: torch.Tensor, S2: int,
                        size2: torch.Tensor, changed: torch.Tensor, tok_assign: torch.Tensor,
                        node_img2: torch.Tensor, keys: Keys) -> torch.Tensor:
        """Profiles of the new nodes: an unchanged node keeps its row; a changed node's row is the
        size-weighted mean of its members' rows (a segment sum) or, equivalently,
        ``(Σ_{t∈i} F_t / |i|) Fᵀ`` (``profiles``)."""
        N = P.shape[1]
        cnt = torch.bincount(om, minlength=S2)
        P2 = P.new_empty(S2, N)
        same = torch.nonzero(cnt[om] == 1).squeeze(1)
        P2[om[same]] = P[same]
        if changed.numel() == 0:
            return P2
        rows = torch.nonzero(cnt[om] > 1).squeeze(1)
        mode = self.cfg.profiles
        D = keys.F.shape[2]
        if mode == "auto":                                           # member rows x N adds vs nodes x D x N MACs
            mode = "segment" if rows.numel() < 8 * changed.numel() * D / 64 else "features"
        cidx = torch.full((S2,), -1, dtype=torch.long, device=P.device)
        cidx[changed] = torch.arange(changed.numel(), device=P.device)
        if mode == "segment":
            sums = segment_sum(P[rows], cidx[om[rows]], changed.numel(), weights=size[rows])
        else:
            B = keys.F.shape[0]
            Ff = keys.F.reshape(B * N, D)
            tok = torch.nonzero(cidx[tok_assign] >= 0).squeeze(1)
            fsum = segment_sum(Ff[tok], cidx[tok_assign[tok]], changed.numel())
            img = node_img2[changed]
            sums = torch.empty(changed.numel(), N, dtype=P.dtype, device=P.device)
            for b in torch.unique(img).tolist():                    # images
                r = torch.nonzero(img == b).squeeze(1)
                sums[r] = fsum[r] @ keys.F[b].t()
        P2[changed] = sums / size2[changed][:, None]
        return P2

    def _update_edges(self, edges: torch.Tensor, c: torch.Tensor, S: int, S_old: int) -> torch.Tensor:
        """Eq. 5 on the edge list, deduplicated, ``u < v``."""
        if edges.numel() == 0:
            return edges
        if self.cfg.edge_update == "adjacent":                    # Ωᵀ E Ω without self-loops
            e = c[edges]
            e = e[:, e[0] != e[1]]
        else:                                                      # literal Ωᵀ Ē (Ωᵀ Ē)ᵀ, Ē = E + I
            ids = torch.arange(S_old, device=edges.device)
            rows = torch.cat([c[edges[0]], c[edges[1]], c])
            cols = torch.cat([edges[1], edges[0], ids])
            with warnings.catch_warnings():                        # torch's sparse "beta" notices
                warnings.simplefilter("ignore", UserWarning)
                X = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(rows.numel(), device=edges.device),
                                            (S, S_old)).coalesce()
                Y = torch.sparse.mm(X, X.t()).coalesce()
            e = Y.indices()
            e = e[:, e[0] != e[1]]
        a, b = torch.minimum(e[0], e[1]), torch.maximum(e[0], e[1])
        key = torch.unique(a * S + b)
        return torch.stack([key // S, key % S])

    @staticmethod
    def _stats(P: torch.Tensor, tok_assign: torch.Tensor, tok_pos: torch.Tensor, diag: torch.Tensor,
               S: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``row_in``, ``total``, ``self_aff`` of :class:`LayerRecord` from the profiles."""
        row_in = segment_sum(P[tok_assign, tok_pos], tok_assign, S)
        return row_in, P.sum(-1), segment_sum(diag, tok_assign, S)

    def _block_sums(self, P: torch.Tensor) -> torch.Tensor:
        """Per-row sums over blocks of 64 tokens, plus the full sum (exact-bound material)."""
        N = P.shape[1]
        nb = (N + 63) // 64
        pad = nb * 64 - N
        Q = Fn.pad(P, (0, pad)).reshape(P.shape[0], nb, 64).sum(-1)
        return Q

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, keys: torch.Tensor) -> list[OAPImageResult]:
        if keys.dim() != 4:
            raise ValueError(f"OAP expects keys of shape (B, h, w, D), got {tuple(keys.shape)}")
        K, A = self.prepare(keys)
        return self.pool_prepared(K, A, keys.shape[1], keys.shape[2])

    @torch.no_grad()
    def pool_prepared(self, K: Keys, A: torch.Tensor, h: int, w: int) -> list[OAPImageResult]:
        """Algorithm 1 on keys already through :meth:`prepare` (``forward`` = prepare + this), for
        callers that need the affinity ``A`` themselves (OAP training's Eq. 6 teacher embeddings)."""
        c = self.cfg
        B, _, D = K.F.shape
        dev = K.F.device
        impl = c.impl if c.impl != "auto" else ("static" if dev.type == "cuda" else "compact")
        if impl == "static":
            from labelwise.pseudo.oap.static import pool_static

            inst, sem, stats = pool_static(self, K, A, h, w)
        else:
            inst, sem, stats = self.pool_compact(K, A, h, w)
        self.last_stats = stats
        T = len(c.thresholds)
        excess = ring_excess(A, h, w) if c.border == "debias" else None
        inst_sets = self.finalise(inst, B, h, w, T, excess)
        sem_sets = self.finalise(sem, B, h, w, T, excess) if c.semantic_pooling else [
            _empty_set(h, w, D, dev) for _ in range(B)]
        return [OAPImageResult(instance=i, semantic=s) for i, s in zip(inst_sets, sem_sets)]

    def pool_compact(self, K: Keys, A: torch.Tensor, h: int, w: int
                     ) -> tuple[list[LayerRecord], list[LayerRecord], dict]:
        """Algorithm 1 with supernodes renumbered after every merge (the CPU path)."""
        c = self.cfg
        F = K.F
        B, N, D = F.shape
        dev = F.device
        S = B * N
        node_img = torch.arange(B, device=dev).repeat_interleave(N)
        tok_pos = torch.arange(N, device=dev).repeat(B)
        tok_assign = torch.arange(S, device=dev)
        size = torch.ones(S, device=dev)
        P = A.reshape(S, N)                                           # M^0 A / |M^0| = A
        V = F.reshape(S, D)
        diag = torch.diagonal(A, dim1=1, dim2=2).reshape(S)           # A_tt (1, or 0 for a zero key)
        edges = grid_edges(h, w, B, device=dev)
        stats = {"tokens": S, "instance_nodes": [], "semantic_nodes": []}
        inst: list[LayerRecord] = []
        sem: list[LayerRecord] = []
        for t, tau in enumerate(c.thresholds):
            # Identify: Eqs. 2-4 on the adjacency edges, threshold, connected components
            if t == 0:
                ss0 = self._grid_spatial(A, h, w) if c.w_s > 0 else None
                contract = self._similarity(V, P, edges[0], edges[1], self._grid_feature(A, h, w), tau, ss0)
            else:
                contract = self._similarity(V, P, edges[0], edges[1], None, tau)
            lab = connected_components(S, edges[:, contract], c.cc_backend)
            om, S2 = relabel(lab)                                     # Ω as a node -> supernode map
            # Merge: Eq. 5 (masks, edges), profiles, Eq. 6 (features)
            size2 = segment_sum(size, om, S2)
            node_img2 = torch.zeros(S2, dtype=torch.long, device=dev).scatter_(0, om, node_img)
            tok_assign = om[tok_assign]
            cnt = torch.bincount(om, minlength=S2)
            changed = torch.nonzero(cnt > 1).squeeze(1)
            P2 = self._merge_profiles(P, size, om, S2, size2, changed, tok_assign, node_img2, K)
            edges = self._update_edges(edges, om, S2, S)
            if t == 0 or not c.reuse_votes:                           # V^0 = F is not a vote: vote all
                V2 = self.vote(P2, size2, node_img2, K)
            else:
                V2 = V.new_empty(S2, D)
                same = torch.nonzero(cnt[om] == 1).squeeze(1)
                V2[om[same]] = V[same]
                if changed.numel():
                    V2[changed] = self.vote(P2[changed], size2[changed], node_img2[changed], K)
            S, size, P, V, node_img = S2, size2, P2, V2, node_img2
            stats["instance_nodes"].append(S)
            inst.append(LayerRecord(tok_assign, size, node_img, V, *self._stats(P, tok_assign, tok_pos, diag, S)))

            if c.semantic_pooling:                                    # fully connected graph, one step
                sem.append(self._semantic_step(P, V, size, node_img, tok_assign, tok_pos, diag, tau, K, stats))
        return inst, sem, stats

    def _semantic_step(self, P, V, size, node_img, tok_assign, tok_pos, diag, tau, K: Keys, stats) -> LayerRecord:
        c = self.cfg
        B = K.F.shape[0]
        S, D = V.shape
        dev = V.device
        pos, smax = _positions(node_img, B)
        Vp = V.new_zeros(B, smax, D)
        Vp[node_img, pos] = V
        # Eq. 2 for every pair; on CPU only the upper blocks are multiplied (symmetric, exact)
        sym = dev.type == "cpu" and smax > c.block
        sf_all = gram(Keys(F=Vp), "symmetric", c.block) if sym else torch.bmm(Vp, Vp.transpose(1, 2))
        valid = torch.zeros(B, smax, dtype=torch.bool, device=dev)
        valid[node_img, pos] = True
        pair_ok = valid[:, :, None] & valid[:, None, :] & torch.ones(smax, smax, dtype=torch.bool, device=dev).triu(1)
        pair_ok &= c.w_f * sf_all + c.w_s > tau                       # exact pruning before Eq. 3
        bi, pi, pj = torch.nonzero(pair_ok, as_tuple=True)
        counts = torch.bincount(node_img, minlength=B)
        starts = torch.cumsum(counts, 0) - counts
        u, v = starts[bi] + pi, starts[bi] + pj
        blocks = self._block_sums(P) if u.numel() > 4 * S else None   # worth it when pairs outnumber nodes
        sc = self._similarity(V, P, u, v, sf_all[bi, pi, pj], tau, blocks=blocks)
        g = connected_components(S, torch.stack([u[sc], v[sc]]), c.cc_backend)
        g, G = relabel(g)
        stats["semantic_nodes"].append(G)
        gsize = segment_sum(size, g, G)
        gimg = torch.zeros(G, dtype=torch.long, device=dev).scatter_(0, g, node_img)
        cnt = torch.bincount(g, minlength=G)
        changed = torch.nonzero(cnt > 1).squeeze(1)
        gassign = g[tok_assign]
        gP = self._merge_profiles(P, size, g, G, gsize, changed, gassign, gimg, K)
        gV = V.new_empty(G, D)                                        # singleton group: its instance vote
        same = torch.nonzero(cnt[g] == 1).squeeze(1)
        gV[g[same]] = V[same]
        if changed.numel():
            gV[changed] = self.vote(gP[changed], gsize[changed], gimg[changed], K)
        return LayerRecord(gassign, gsize, gimg, gV, *self._stats(gP, gassign, tok_pos, diag, G))

    # ------------------------------------------------------------------ dedup, scores, masks
    def finalise(self, records: list[LayerRecord], B: int, h: int, w: int, T: int,
                 excess: torch.Tensor | None = None) -> list[MaskSet]:
        """Masks with area >= phi of every layer -> per image: dedup, scores, NMS, dense masks.

        ``excess`` (``(B,)``, ``border="debias"``): the per-image excess affinity of ring-ring token
        pairs (:func:`ring_excess`), taken out of the contrast terms."""
        c = self.cfg
        N = h * w
        dev = records[0].assign.device
        D = records[0].features.shape[1]
        phi = c.phi(N)
        gen = torch.Generator(device="cpu").manual_seed(0x0A9)
        tok_hash = torch.randint(0, 1 << 40, (N,), generator=gen).to(dev).repeat(B)   # exact subset hashing
        ring_tok = border_ring(h, w, dev).flatten().to(records[0].row_in.dtype).repeat(B)
        R = ring_size(h, w)
        cols = {k: [] for k in ("layer", "node", "img", "area", "hash", "in", "in_self", "out", "feat", "ring")}
        for t, r in enumerate(records):
            S = r.size.numel()
            keep = torch.nonzero(r.size >= phi).squeeze(1)
            n = r.size[keep]
            node_hash = segment_sum(tok_hash, r.assign, S)[keep]
            ring = segment_sum(ring_tok, r.assign, S)[keep]                 # ring tokens in the mask
            row_in, total, self_aff = r.row_in[keep], r.total[keep], r.self_aff[keep]
            pair_sum = n * row_in                                        # Σ_{s,t∈i} A_st
            in_self = row_in / n
            in_noself = torch.where(n > 1, (pair_sum - self_aff) / (n * (n - 1)).clamp(min=1), in_self)
            out_n = N - n
            out = torch.where(out_n > 0, (total - row_in) / out_n.clamp(min=1), in_self)
            if excess is not None:            # δ off each of the r(r-1) ring pairs inside, r(R-r) across
                d = excess[r.node_img[keep]]
                in_self = in_self - d * ring * (ring - 1) / (n * n)
                in_noself = in_noself - torch.where(n > 1, d * ring * (ring - 1) / (n * (n - 1)).clamp(min=1), 0.0)
                out = out - torch.where(out_n > 0, d * ring * (R - ring) / (n * out_n).clamp(min=1), 0.0)
            cols["layer"].append(torch.full((keep.numel(),), t, dtype=torch.long, device=dev))
            cols["node"].append(keep)
            cols["img"].append(r.node_img[keep])
            cols["area"].append(n.round().long())
            cols["hash"].append(node_hash)
            cols["in"].append(in_noself)
            cols["in_self"].append(in_self)
            cols["out"].append(out)
            cols["feat"].append(r.features[keep])
            cols["ring"].append(ring)
        cat = {k: torch.cat(v) for k, v in cols.items()}
        layer = cat["layer"]
        if layer.numel() == 0:
            return [_empty_set(h, w, D, dev) for _ in range(B)]
        # identical masks (same image, area and subset hash) across layers
        keyrows = torch.stack([cat["img"], cat["area"], cat["hash"]], dim=1)
        _, inv = torch.unique(keyrows, dim=0, return_inverse=True)
        count = torch.bincount(inv)
        persistence = count[inv]
        if c.dedup == "unique":
            first = torch.full((count.numel(),), layer.numel(), dtype=torch.long, device=dev)
            first.scatter_reduce_(0, inv, torch.arange(layer.numel(), device=dev), reduce="amin")
            sel = torch.sort(first).values
        else:
            sel = torch.arange(layer.numel(), device=dev)
        layer, node, img, area = layer[sel], cat["node"][sel], cat["img"][sel], cat["area"][sel]
        persistence, feat = persistence[sel], cat["feat"][sel]
        contrast = cat["in"][sel] - cat["out"][sel]
        pers = persistence.float() / T
        score = {"contrast": lambda: contrast,
                 "contrast_self": lambda: cat["in_self"][sel] - cat["out"][sel],
                 "persistence": lambda: pers,
                 "area": lambda: area.float() / N,
                 "contrast_persistence": lambda: contrast.clamp(min=0) * pers}[c.score]()
        if c.border == "prior":                                     # boundary-connectivity background weight
            bnd_con = cat["ring"][sel] / area.float().sqrt()
            score = score * torch.exp(-0.5 * bnd_con ** 2)
        # dense token masks, built per layer from the token -> node maps (no loop over masks)
        Kn = sel.numel()
        masks = torch.zeros(Kn, B * N, dtype=torch.bool, device=dev)
        for t, r in enumerate(records):
            which = torch.nonzero(layer == t).squeeze(1)
            if which.numel() == 0:
                continue
            lut = torch.full((r.size.numel(),), -1, dtype=torch.long, device=dev)
            lut[node[which]] = which
            ent = lut[r.assign]
            ok = torch.nonzero(ent >= 0).squeeze(1)
            masks[ent[ok], ok] = True
        out = []
        for b in range(B):                                           # split the batch into images
            idx = torch.nonzero(img == b).squeeze(1)
            idx = idx[torch.argsort(score[idx], descending=True, stable=True)]
            mb = masks[idx, b * N:(b + 1) * N]
            keep = nms_keep(mb, c.nms_iou)
            idx, mb = idx[keep], mb[keep]
            out.append(MaskSet(masks=mb.reshape(-1, h, w), features=feat[idx], scores=score[idx],
                               layers=layer[idx], persistence=persistence[idx], areas=area[idx]))
        return out


def _empty_set(h: int, w: int, D: int, device: Any) -> MaskSet:
    z = torch.zeros(0, dtype=torch.long, device=device)
    return MaskSet(masks=torch.zeros(0, h, w, dtype=torch.bool, device=device),
                   features=torch.zeros(0, D, device=device), scores=torch.zeros(0, device=device),
                   layers=z, persistence=z.clone(), areas=z.clone())


def vote_embeddings(masks: torch.Tensor, A: torch.Tensor, X: torch.Tensor, sigma: float = 0.07,
                    vote: str = "sum") -> torch.Tensor:
    """Eq. 6 for given masks of one image, in any per-token feature space.

    ``masks (K, N)`` bool, ``A (N, N)`` the image's affinity, ``X (N, C)`` per-token features:
    ``L2N{softmax(M_i A / σ) X}`` (``vote="mean"``: ``M_i A / |M_i|``). With ``X = F`` this is the
    supernode feature OAP gives every mask; OAP training uses it with the teacher's own pixel
    features, so that teacher mask embeddings live where the student's queries live."""
    M = masks.to(A.dtype)
    size = M.sum(1).clamp(min=1)
    W = vote_weights((M @ A) / size[:, None], size, sigma, vote)
    return Fn.normalize(W @ X.to(W.dtype), dim=-1)
