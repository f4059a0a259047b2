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

Exact speed-ups (each gives the same masks; tests compare them with the plain computation:
``tests/test_oap_exact.py``, ``tests/test_oap_incremental.py``; where the time goes per layer:
``bench/oap_layer_profile.py``):

* ``A`` from its upper triangle only (it is symmetric; one BLAS ``syrk`` per image on CPU) or, for
  ReLU backbones whose keys are mostly zeros, split by channel (``sparse_gram``): the channels most
  tokens use through ``syrk``, the others as a sparse x sparse product (``Σ_c nnz_c²`` products, 1-2 % of
  ``N² D`` for EfficientNet-Lite0 keys), the centring put back exactly (``affinity``). On CPU ``forward``
  keeps ``A``'s memory for the next call of the same shape (a fresh 3136² matrix costs ~13 ms of page
  faults).
* The first layer's ``S^f`` read from ``A`` (``M = I``); its ``S^s`` only where exact bounds leave the
  decision open: ``S^s <= 1`` rules an edge out, ``S^s >= 1 - |F_u - F_v|`` (rows of F have norm
  <= 1) rules it in.
* Candidate pairs at every layer and level are pruned before any ``O(N)`` work: ``S^s <= 1``, then
  the block-sum lower bound of ``|P_u - P_v|_1`` where the nodes' block sums are at hand.
* Only what a merge changed is recomputed (compact path): profile rows, block sums and votes of
  merged supernodes (unchanged ones keep theirs: ``reuse_votes``); profile rows as segment sums of
  their members' rows read in place, or as feature sums times ``Fᵀ`` (``profiles``, the cheaper);
  the score terms from feature sums (``Σ_{s,t∈i} A_st = |Σ_{t∈i} F_t|²``, ``Σ_t P_i[t] =
  Σ_{t∈i} F_t · Σ_t F_t / |i|``) instead of passes over the profiles. Profiles and votes live in row
  stores indexed by a supernode's smallest member, so unchanged supernodes are never copied.
* Edges whose two endpoints did not change keep their ``S^s`` (and ``S^f``) through a merge.
* The semantic ``S^f`` matrix (upper triangle) is kept across layers: entries between unchanged
  supernodes stay, merged ones get new rows and columns; it also gives the next layer's edge
  ``S^f``; its candidates are found through row maxima (the triangle below is -inf).
* Semantic groups feed nothing later: only those with area ``>= φ`` are voted, in one call after the
  loop. Small graphs' connected components skip scipy's call overhead (``graph``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn

from labelwise.config import from_dict, param
from labelwise.pseudo.oap.graph import connected_components, quiet_sparse, segment_rows, segment_sum

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
                          help="how A = F F^T is computed (all exact): one product, upper triangle only (BLAS "
                               "syrk on CPU), or split by channel for ReLU keys (syrk of the channels most tokens "
                               "use + a sparse x sparse product of the rest; CPU only, elsewhere the symmetric "
                               "blocks, same result); auto = dense on GPU, sparse when >= "
                               "80% of the keys are 0 on grids of >= 2048 tokens (measured crossover), else symmetric")
    profiles: str = param("auto", choices=("auto", "segment", "features"),
                          help="profiles M_i A / |M_i| of new supernodes: segment sums of member rows, or "
                               "(mean member feature) F^T; auto picks the cheaper")
    static_capacity: int = param(1024, range=(1, None),
                                 help="static impl: supernode slots per image after the first layer (more: exact "
                                      "fallback to compact)")
    static_pairs: int = param(1 << 16, range=(1, None),
                              help="static impl: candidate pairs per batch in semantic pooling (more: exact fallback)")
    block: int = param(512, range=(16, None), help="row block of the affinity products where BLAS syrk does not "
                                                    "apply (off the CPU, other dtypes); semantic S^f matrices of more "
                                                    "nodes than this use their upper triangle only")
    cc_backend: str = param("auto", choices=("auto", "torch", "scipy"), help="connected-components backend")
    cc_rounds: int = param(0, range=(0, None), help="static impl: hooking rounds of connected components (0 = "
                                                     "8 rounds x 4 pointer jumps, measured; a graph that does not "
                                                     "converge falls back exactly to compact)")
    static_chunk_elems: int = param(1 << 26, range=(1 << 10, None),
                                    help="static impl: elements of one chunk of the spatial term S^s")
    chunk_elems: int = param(1 << 17, range=(1 << 10, None),
                             help="memory chunk (elements) for the spatial term (cache-sized: measured fastest on CPU)")
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
    ``self_aff[i] = Σ_{t∈i} A_tt`` give the contrast scores without the masks. ``features`` may hold
    only the rows of the nodes ``feat_nodes`` (at least every node with ``size >= phi``)."""

    assign: torch.Tensor     # (B*N,) node id of every token
    size: torch.Tensor       # (S,) tokens per node
    node_img: torch.Tensor   # (S,) image of each node
    features: torch.Tensor   # (S, D) Eq. 6 features
    row_in: torch.Tensor     # (S,)
    total: torch.Tensor      # (S,)
    self_aff: torch.Tensor   # (S,)
    feat_nodes: torch.Tensor | None = None   # features are rows for these nodes only (None: all nodes)


@dataclass
class Keys:
    """L2-normalised keys ``F`` and, for ReLU keys, what the sparse products need:
    ``F_t = (x_t - mu) * inv_norm_t`` with ``x`` mostly zeros."""

    F: torch.Tensor                       # (B, N, D)
    x: torch.Tensor | None = None         # (B, N, D) raw keys (sparse path only)
    mu: torch.Tensor | None = None        # (B, 1, D) per-image mean (None: not centred)
    inv_norm: torch.Tensor | None = None  # (B, N)


class Laps:
    """Wall time per ``(level, layer, part)`` of one forward, added into ``sink`` (a dict, seconds) — what
    ``bench/oap_layer_profile.py`` reports. Each call charges the time since the previous call to ``part``
    at the current ``level`` / ``layer``. A no-op when ``sink`` is None (the default; see
    ``OnlineAgglomerativePooling.profile``)."""

    __slots__ = ("sink", "t", "level", "layer")

    def __init__(self, sink: dict | None = None):
        self.sink, self.level, self.layer = sink, "-", "-"
        self.t = time.perf_counter() if sink is not None else 0.0

    def at(self, level: str, layer: Any) -> None:
        self.level, self.layer = level, layer

    def __call__(self, part: str) -> None:
        if self.sink is None:
            return
        t = time.perf_counter()
        k = (self.level, self.layer, part)
        self.sink[k] = self.sink.get(k, 0.0) + t - self.t
        self.t = t


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


def _syrk_upper(F: torch.Tensor, out: torch.Tensor) -> bool:
    """``out (N, N)`` (C-contiguous) <- the upper triangle of ``F Fᵀ`` by BLAS ``?syrk`` (scipy): one call that
    does half a GEMM's products (CPU float32 / float64; measured 0.75x the time of the row-block products
    at 3136 x 1280). The strict lower triangle is left as it was. False where it does not apply."""
    if F.device.type != "cpu" or F.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        return False
    try:
        from scipy.linalg import blas
    except ImportError:                                        # pragma: no cover - scipy is a dependency
        return False
    syrk = blas.ssyrk if F.dtype == torch.float32 else blas.dsyrk
    a = F.detach().contiguous().numpy()
    c = out.numpy()
    r = syrk(1.0, a.T, trans=1, lower=1, c=c.T, overwrite_c=1)   # (F Fᵀ) lower in Fortran = upper in C order
    if not np.shares_memory(r, c):                             # pragma: no cover - f2py copied
        out.copy_(torch.from_numpy(np.ascontiguousarray(r.T)))
    return True


MIRROR_BLOCK = 128    # measured fastest at 3136 x 3136 float32, 1 thread: 128 6.4 ms, 512 9.9 ms, 1024 19 ms


def _mirror_upper(A: torch.Tensor, block: int = MIRROR_BLOCK) -> None:
    """Fill the strict lower triangle of the square ``A`` from its upper triangle, block by block."""
    N = A.shape[0]
    for i in range(0, N, block):
        j = min(i + block, N)
        d = A[i:j, i:j]
        d.copy_(torch.triu(d) + torch.triu(d, 1).t())
        A[j:, i:j] = A[i:j, j:].t()


SPARSE_HEAVY = 1.0 / 32   # a key channel non-zero in more than this fraction of the tokens goes to the dense part
                          # (measured: 3136 EfficientNet-Lite0 tokens x 1280 channels, 1 thread, median of 3 images
                          # x 5: 1/8 171 ms, 1/12 131, 1/16 99, 1/24 89, 1/32 89, 1/48 89; syrk of all 131)


def sparse_gram(x: torch.Tensor, F: torch.Tensor, inv_norm: torch.Tensor, mu: torch.Tensor | None,
                out: torch.Tensor, heavy: float = SPARSE_HEAVY) -> None:
    """``out (N, N) <- F Fᵀ`` for one image's ReLU keys ``x (N, D)`` (mostly zeros), ``F = (x - mu) * inv_norm``.

    The channels split by how many tokens use them: ``F Fᵀ = Σ_{c ∈ dense} F_c F_cᵀ + Σ_{c ∈ sparse} F_c F_cᵀ``.
    A channel non-zero in more than ``heavy * N`` tokens (a handful carry most of the products) is a column
    of one BLAS ``syrk`` (upper triangle); the others are a sparse x sparse product of ``x̃ = inv_norm ⊙ x``
    whose work is ``Σ_c nnz_c²`` (1-2 % of ``N² D`` for these keys; scipy's CSR product, then added in
    place). The split is read from a row sample: it only moves work, any split gives the same sum.
    Centring puts back, for the sparse channels ``S`` (``a = x_S mu_S``, ``ã = inv_norm ⊙ a``,
    ``k = |mu_S|²``), exactly ``(x_i - mu)·(x_j - mu) = x_i·x_j - a_i - a_j + k`` scaled by
    ``inv_i inv_j``: ``k inv invᵀ`` as one more ``syrk`` column ``sqrt(k) inv``, ``-(ã invᵀ + inv ãᵀ)`` by
    BLAS ``syr2k`` on the same triangle. The result equals ``F Fᵀ`` up to float rounding (tests). CPU
    only (scipy)."""
    from scipy.linalg import blas
    import scipy.sparse as sp

    x, F, inv_norm = x.detach(), F.detach(), inv_norm.detach()
    mu = None if mu is None else mu.detach()
    N, D = x.shape
    step = max(1, N // 512)                                      # split from a row sample: any split is exact
    heavy_c = torch.count_nonzero(x[::step], dim=0) * step > heavy * N
    dense_c = torch.nonzero(heavy_c).squeeze(1)
    # x̃ on the sparse channels as CSR, from x's non-zeros (row-major = CSR order), no column gather
    nz = torch.nonzero(x)
    nz = nz[~heavy_c[nz[:, 1]]]
    indptr = torch.zeros(N + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(nz[:, 0], minlength=N), 0, out=indptr[1:])
    X = sp.csr_matrix(((x[nz[:, 0], nz[:, 1]] * inv_norm[nz[:, 0]]).numpy(), nz[:, 1].numpy(), indptr.numpy()),
                      shape=(N, D))
    factor = F.index_select(1, dense_c)                            # (N, d): the dense channels
    if mu is not None:
        mu_s = mu.reshape(-1).masked_fill(heavy_c, 0.0)            # mu on the sparse channels, 0 elsewhere
        k = float(mu_s @ mu_s)
        factor = torch.cat([factor, (k ** 0.5 * inv_norm)[:, None]], dim=1)
    if factor.shape[1] == 0:                                       # no dense channel
        out.zero_()
    else:
        _syrk_upper(factor, out)
    if mu is not None and X.nnz:
        a = torch.from_numpy(X @ mu_s.numpy())                     # ã = inv_norm ⊙ (x_S mu_S)
        syr2k = blas.ssyr2k if F.dtype == torch.float32 else blas.dsyr2k
        c = out.numpy()
        r = syr2k(-1.0, a.numpy()[None], inv_norm.numpy()[None], trans=1, lower=1, beta=1.0, c=c.T, overwrite_c=1)
        if not np.shares_memory(r, c):                             # pragma: no cover - f2py copied
            out.copy_(torch.from_numpy(np.ascontiguousarray(r.T)))
    _mirror_upper(out)
    if X.nnz:
        prod = (X @ X.T).tocoo()
        flat = torch.from_numpy(prod.row.astype(np.int64)) * N + torch.from_numpy(prod.col.astype(np.int64))
        out.view(-1).index_add_(0, flat, torch.from_numpy(prod.data))


def gram(keys: Keys, mode: str, block: int = 512, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A = F Fᵀ`` per image, ``(B, N, N)`` (written into ``out`` when given).

    ``dense``: one batched product. ``symmetric``: only the blocks on and above the diagonal
    are multiplied, the others are their transposes (A is symmetric; ~0.6x the work; on CPU one
    BLAS ``syrk`` per image computes the upper triangle). ``upper``: the same, and the entries
    below the diagonal are left unset (for readers of ``i <= j`` only).
    ``sparse`` (CPU): from the raw ReLU keys ``x`` (mostly zeros), :func:`sparse_gram` — the channels most
    tokens use through ``syrk``, the rest as a sparse x sparse product, the centring put back exactly;
    elsewhere the blocks of ``symmetric``.
    """
    F = keys.F
    B, N, _ = F.shape
    if mode == "dense":
        return torch.bmm(F, F.transpose(1, 2), out=out)
    A = F.new_empty(B, N, N) if out is None else out
    for b in range(B):                                         # images, then fixed-size row blocks
        if mode in ("symmetric", "upper") and _syrk_upper(F[b], A[b]):
            if mode == "symmetric":
                _mirror_upper(A[b])
            continue
        if mode == "sparse" and F.device.type == "cpu" and F.dtype in (torch.float32, torch.float64):
            sparse_gram(keys.x[b], F[b], keys.inv_norm[b], None if keys.mu is None else keys.mu[b], A[b])
            continue
        for i in range(0, N, block):
            j = min(i + block, N)
            if mode in ("symmetric", "upper", "sparse"):               # sparse off the CPU: the dense blocks
                blk = F[b, i:j] @ F[b, i:].t()
            else:
                raise ValueError(f"unknown affinity mode {mode!r}; use dense, symmetric, upper or sparse")
            A[b, i:j, i:] = blk
            if mode != "upper":
                A[b, j:, i:j] = blk[:, j - i:].t()
    return A


def _per_image_product(X: torch.Tensor, Y: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """``X_k Y_{img_k}`` for rows ``X (K, a)`` of images ``img (K,)`` (sorted) and per-image matrices
    ``Y (B, a, b)``: ``(K, b)``, one batched product over the rows padded per image."""
    B = Y.shape[0]
    if B == 1:
        return X @ Y[0]
    pos, smax = _positions(img, B)
    pad = X.new_zeros(B, smax, X.shape[1])
    pad[img, pos] = X
    return torch.bmm(pad, Y)[img, pos]


def weighted_keys(W: torch.Tensor, keys: Keys, img: torch.Tensor) -> torch.Tensor:
    """``W_k F_{img_k}`` for rows ``W (K, N)`` of images ``img (K,)`` (sorted): ``(K, D)``, one
    batched product. (A sparse product through ReLU keys does not pay here: on CPU it was slower
    than the dense one for every row count measured.)"""
    return _per_image_product(W, keys.F, img)


def feature_rows(X: torch.Tensor, keys: Keys, img: torch.Tensor) -> torch.Tensor:
    """``X_k F_{img_k}ᵀ`` for rows ``X (K, D)`` of images ``img (K,)`` (sorted): ``(K, N)`` — profile rows
    ``M_i A = (Σ_{t∈i} F_t) Fᵀ`` from feature sums, one batched product."""
    return _per_image_product(X, keys.F.transpose(1, 2), img)


def vote_weights(P: torch.Tensor, size: torch.Tensor, sigma: float, vote: str = "sum") -> torch.Tensor:
    """Eq. 6's ``softmax(M_i A / σ)`` from profile rows ``P = M_i A / |M_i|`` and sizes ``|M_i|``:
    ``vote="sum"`` (literal, binary ``M_i``) multiplies back by ``|M_i|``, ``"mean"`` keeps the
    normalised profile."""
    scale = size / sigma if vote == "sum" else torch.full_like(size, 1.0 / sigma)
    W = torch.softmax(P * scale[:, None], dim=-1)
    # subnormal weights (< 1.2e-38 of a row whose largest is >= 1/N) change nothing a float can hold, but
    # make the CPU's products crawl (measured: 69 rows x 3136 x 1280 in 30 ms instead of 3.4): zeros
    return W.masked_fill_(W < torch.finfo(W.dtype).tiny, 0.0)


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


_SLACK = 1e-4        # exact bounds are applied with this margin, so float rounding never flips a decision


@dataclass
class _Nodes:
    """The compact path's supernodes at one level (ids sorted by image): what identify, merge and the
    records need. ``prow`` points into the row stores (``_Store``); ``Q`` / ``qok``: block sums of the
    profile rows and whether they are computed yet (on demand)."""

    size: torch.Tensor       # (S,) tokens, float
    img: torch.Tensor        # (S,) image
    prow: torch.Tensor       # (S,) store row of the node (its smallest member's token)
    self_aff: torch.Tensor   # (S,) Σ_{t∈i} A_tt
    row_in: torch.Tensor     # (S,) Σ_{t∈i} P_i[t] = |Σ_{t∈i} F_t|^2 / |i|
    total: torch.Tensor      # (S,) Σ_t P_i[t] = (Σ_{t∈i} F_t) · (Σ_t F_t) / |i|
    Q: torch.Tensor          # (S, nb) block sums of P_i (valid where qok)
    qok: torch.Tensor        # (S,) bool


class _Store:
    """Row data of the compact path's nodes, indexed by ``_Nodes.prow``: profiles ``P = M_i A / |M_i|``
    (``A``'s rows at first) and votes ``V`` (``F``'s rows at first). A merged node writes its rows into
    its smallest member's row, so unchanged nodes are never copied. The first write copies a store that
    is not owned: ``A`` unless ``forward`` owns it, ``F`` always."""

    def __init__(self, P: torch.Tensor, P_owned: bool, F: torch.Tensor):
        self.P, self.V = P, F
        self._owned = {"P": P_owned, "V": False}

    def write(self, name: str, idx: torch.Tensor, rows: torch.Tensor) -> None:
        x = getattr(self, name)
        if not self._owned[name]:
            x = x.clone()
            setattr(self, name, x)
            self._owned[name] = True
        x[idx] = rows

    def replace(self, name: str, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """A new store whose rows ``idx`` are ``rows`` (the others unset)."""
        x = getattr(self, name)
        y = x.new_empty(x.shape[0], rows.shape[1])
        y[idx] = rows
        setattr(self, name, y)
        self._owned[name] = True


class _SfMatrix:
    """Semantic ``S^f`` of the pairs of an image's nodes: ``M (B, P, P)``, node ``i`` at place
    ``(img[i], pos[i])``; ``live (B, P)`` marks the places that hold a node, ``node_at (B, P)`` which.
    Only entries ``M[b, p, q]``, ``p < q``, of live places are meaningful; the others below and on the
    diagonal are -inf."""

    def __init__(self, M: torch.Tensor, img: torch.Tensor, pos: torch.Tensor):
        self.M, self.img, self.pos = M, img, pos
        B, P = M.shape[0], M.shape[1]
        self.live = torch.zeros(B, P, dtype=torch.bool, device=M.device)
        self.live[img, pos] = True
        self.node_at = torch.zeros(B, P, dtype=torch.long, device=M.device)
        self.node_at[img, pos] = torch.arange(img.numel(), device=M.device)


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
        self.profile: dict | None = None      # a dict: forward adds its per-part wall times (Laps)
        self._lap = Laps()
        self._a_buffer: torch.Tensor | None = None   # forward's A, kept for the next call of the same shape

    # ------------------------------------------------------------------ graph initialisation
    def prepare(self, keys: torch.Tensor, out: torch.Tensor | None = None) -> tuple[Keys, torch.Tensor]:
        """``F`` (and the sparse factors when used) and ``A`` for keys ``(B, h, w, D)``; ``out``: a
        ``(B, h*w, h*w)`` float32 tensor to write ``A`` into (else a new one)."""
        c = self.cfg
        B, h, w, D = keys.shape
        x = keys.reshape(B, h * w, D).float()
        mu = x.mean(dim=1, keepdim=True) if c.center_features else None
        xc = x - mu if mu is not None else x
        norm = xc.norm(dim=-1).clamp_min(1e-12)                 # as F.normalize
        F = xc.div_(norm[..., None]) if mu is not None else xc / norm[..., None]   # no second (B, N, D) temporary
        mode = c.affinity
        if mode == "auto":
            if keys.device.type != "cpu":
                mode = "dense"
            else:
                # the sparse product pays from ~2k tokens on (measured, EfficientNet-Lite0 keys, 95% zeros, 1
                # thread, median of 3 images x 5: 784 tokens syrk 9.3 ms vs sparse 11.8; 3136 tokens 131 vs 89);
                # the share of zeros is read from a sample of the channels (it only picks the faster route)
                big = h * w >= 2048
                xs = x[..., ::8]
                mode = "sparse" if big and int(torch.count_nonzero(xs)) <= 0.2 * xs.numel() else "symmetric"
        k = Keys(F=F, x=x, mu=mu, inv_norm=1.0 / norm) if mode == "sparse" else Keys(F=F)
        return k, gram(k, mode, c.block, out=out)

    def _buffer(self, keys: torch.Tensor) -> torch.Tensor | None:
        """``forward``'s ``A`` memory: the previous call's when the shape matches (CPU). A fresh 3136 x 3136
        float32 matrix costs ~13 ms of first-touch page faults per call (measured: zeroing it fresh 15 ms,
        again 1.8 ms); nothing a forward returns points into it."""
        if keys.device.type != "cpu" or self.cfg.affinity == "dense":
            return None
        B, h, w, _ = keys.shape
        if self._a_buffer is None or self._a_buffer.shape != (B, h * w, h * w):
            self._a_buffer = None                                    # free the old one before allocating
            self._a_buffer = torch.empty(B, h * w, h * w)
        return self._a_buffer

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

    def _grid_spatial(self, A: torch.Tensor, h: int, w: int, chunk_elems: int | None = None) -> torch.Tensor:
        """Eq. 3 on every 4-neighbour edge of the first layer (M = I, so P = A), in the order of
        :func:`grid_edges`, from shifted views of A (no row gathers), in memory chunks of grid rows
        (``chunk_elems``, default ``cfg.chunk_elems``)."""
        B, N, _ = A.shape
        A4 = A.reshape(B, h, w, N)
        rows = max(1, (chunk_elems or self.cfg.chunk_elems) // max(w * N, 1))
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
            with quiet_sparse():
                X = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(rows.numel(), device=edges.device),
                                            (S, S_old)).coalesce()
                Y = torch.sparse.mm(X, X.t()).coalesce()
            e = Y.indices()
            e = e[:, e[0] != e[1]]
        a, b = torch.minimum(e[0], e[1]), torch.maximum(e[0], e[1])
        key = torch.unique(a * S + b)
        return torch.stack([key // S, key % S])

    def _carry_edges(self, edges: torch.Tensor, cache: list[torch.Tensor], om: torch.Tensor, cnt: torch.Tensor,
                     S2: int, S_old: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eq. 5 (``_update_edges``) with the per-edge caches (``S^s``, ``S^f``; NaN = not computed)
        carried along: an edge whose two endpoints were not merged is the image of exactly one old edge
        and keeps its values (same profiles, same votes); every other edge starts unknown."""
        if edges.numel() == 0 or self.cfg.edge_update != "adjacent":
            e = self._update_edges(edges, om, S2, S_old)
            return e, [torch.full((e.shape[1],), float("nan"), device=e.device) for _ in cache]
        e = om[edges]
        keep = torch.nonzero(e[0] != e[1]).squeeze(1)
        e = e[:, keep]
        a, b = torch.minimum(e[0], e[1]), torch.maximum(e[0], e[1])
        key, inv = torch.unique(a * S2 + b, return_inverse=True)
        same = torch.nonzero((cnt[a] == 1) & (cnt[b] == 1)).squeeze(1)
        out = []
        for x in cache:
            y = torch.full((key.numel(),), float("nan"), dtype=x.dtype, device=x.device)
            y[inv[same]] = x[keep[same]]
            out.append(y)
        return torch.stack([key // S2, key % S2]), out

    @staticmethod
    def _stats(P: torch.Tensor, tok_assign: torch.Tensor, tok_pos: torch.Tensor, diag: torch.Tensor,
               S: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``row_in``, ``total``, ``self_aff`` of :class:`LayerRecord` from the profiles."""
        row_in = segment_sum(P[tok_assign, tok_pos], tok_assign, S)
        return row_in, P.sum(-1), segment_sum(diag, tok_assign, S)

    def _block_sums(self, P: torch.Tensor) -> torch.Tensor:
        """Per-row sums over blocks of 64 tokens (exact-bound material)."""
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
        self._lap = Laps(self.profile)
        K, A = self.prepare(keys, out=self._buffer(keys))
        self._lap("affinity")
        try:
            return self._pool(K, A, keys.shape[1], keys.shape[2], own_a=True)
        finally:
            self._lap = Laps()

    @torch.no_grad()
    def pool_prepared(self, K: Keys, A: torch.Tensor, h: int, w: int) -> list[OAPImageResult]:
        """Algorithm 1 on keys already through :meth:`prepare` (``forward`` = prepare + this), for
        callers that need the affinity ``A`` themselves (OAP training's Eq. 6 teacher embeddings);
        ``A`` is left as it is."""
        return self._pool(K, A, h, w, own_a=False)

    def _pool(self, K: Keys, A: torch.Tensor, h: int, w: int, own_a: bool) -> list[OAPImageResult]:
        c = self.cfg
        B, _, D = K.F.shape
        dev = K.F.device
        impl = c.impl if c.impl != "auto" else ("static" if dev.type == "cuda" else "compact")
        excess = ring_excess(A, h, w) if c.border == "debias" else None    # before: compact may reuse A's memory
        if impl == "static":
            from labelwise.pseudo.oap.static import pool_static

            inst, sem, stats = pool_static(self, K, A, h, w)
        else:
            inst, sem, stats = self.pool_compact(K, A, h, w, reuse_a=own_a)
        self.last_stats = stats
        T = len(c.thresholds)
        self._lap.at("instance", "-")
        inst_sets = self.finalise(inst, B, h, w, T, excess)
        self._lap("finalise")
        self._lap.at("semantic", "-")
        sem_sets = self.finalise(sem, B, h, w, T, excess) if c.semantic_pooling else [
            _empty_set(h, w, D, dev) for _ in range(B)]
        self._lap("finalise")
        return [OAPImageResult(instance=i, semantic=s) for i, s in zip(inst_sets, sem_sets)]

    def pool_compact(self, K: Keys, A: torch.Tensor, h: int, w: int, reuse_a: bool = False
                     ) -> tuple[list[LayerRecord], list[LayerRecord], dict]:
        """Algorithm 1 with supernodes renumbered after every merge (the CPU path).

        Per layer, only what a merge changed is recomputed (module docstring, "exact speed-ups"):
        the profile rows, block sums, feature sums, score terms and votes of merged supernodes, the
        ``S^s`` of edges touching them, and the rows of the semantic ``S^f`` matrix that belong to
        them. Row data live in stores indexed by a node's smallest member (``_Store``), so unchanged
        supernodes are never copied. ``reuse_a``: the profile store may take over ``A``'s memory
        (``forward``); otherwise ``A`` is copied at the first merge and left as it is."""
        c = self.cfg
        lap = self._lap
        F = K.F
        B, N, D = F.shape
        dev = F.device
        S = B * N
        nan = float("nan")
        phi = c.phi(N)
        tok_assign = torch.arange(S, device=dev)
        diag = torch.diagonal(A, dim1=1, dim2=2).reshape(S).clone()   # A_tt (1, or 0 for a zero key)
        fimg = F.sum(1)                                                  # (B, D): Σ_t F_t per image
        nd = _Nodes(size=torch.ones(S, dtype=F.dtype, device=dev),
                    img=torch.arange(B, device=dev).repeat_interleave(N), prow=torch.arange(S, device=dev),
                    self_aff=diag, row_in=diag,                          # P_t[t] = A_tt
                    total=torch.bmm(F, fimg[:, :, None]).reshape(S),    # Σ_s A_ts = F_t · Σ_s F_s
                    Q=F.new_zeros(S, (N + 63) // 64), qok=torch.zeros(S, dtype=torch.bool, device=dev))
        store = _Store(A.reshape(S, N), reuse_a, F.reshape(S, D))
        edges = grid_edges(h, w, B, device=dev)
        e_ss = torch.full((edges.shape[1],), nan, dtype=F.dtype, device=dev)     # per-edge caches: S^s,
        e_sf = torch.full_like(e_ss, nan)                                            # S^f (no semantic S^f matrix)
        G = None                                                         # semantic S^f matrix of nd
        pending: list = []                                               # semantic votes, done after the loop
        stats = {"tokens": S, "instance_nodes": [], "semantic_nodes": []}
        inst: list[LayerRecord] = []
        sem: list[LayerRecord] = []
        lap("setup")
        for t, tau in enumerate(c.thresholds):
            lap.at("instance", t)
            # Identify: Eqs. 2-4 on the adjacency edges, threshold, connected components
            u, v = edges[0], edges[1]
            if t == 0:
                sf = self._grid_feature(A, h, w)                        # V^0 = F: S^f_ij = A_ij
                lap("S^f")
                contract, e_ss = self._identify_first(A, h, w, sf, diag, u, v, tau, D)
            else:
                if G is not None:                                        # the semantic step's S^f matrix
                    sf = G.M[G.img[u], G.pos[u], G.pos[v]]
                else:
                    todo = torch.nonzero(torch.isnan(e_sf)).squeeze(1)
                    pu, pv = nd.prow[u[todo]], nd.prow[v[todo]]
                    e_sf[todo] = (store.V[pu] * store.V[pv]).sum(-1)     # Eq. 2
                    sf = e_sf
                lap("S^f")
                contract = self._identify(nd, store, u, v, sf, e_ss, tau)
            merge = self._components(nd.size.numel(), edges[:, contract])
            lap("components")
            # Merge: Eq. 5 (masks, edges), profiles, Eq. 6 (features)
            revote = t == 0 or not c.reuse_votes                          # V^0 = F is not a vote: vote all
            changed = rows = None
            nd2 = nd
            if merge is not None:
                om, rep = merge
                tok_assign = om[tok_assign]
                nd2, changed, _, rows, cnt = self._merge_nodes(nd, om, rep, store, K, fimg, tok_assign)
                lap("merge")
                edges, (e_ss, e_sf) = self._carry_edges(edges, [e_ss, e_sf], om, cnt, rep.numel(), nd.size.numel())
                lap("edges")
            if revote:
                store.replace("V", nd2.prow, self.vote(store.P[nd2.prow], nd2.size, nd2.img, K))
                e_sf = torch.full_like(e_sf, nan)
            elif changed is not None:
                store.write("V", nd2.prow[changed], self.vote(rows, nd2.size[changed], nd2.img[changed], K))
            lap("votes")
            stats["instance_nodes"].append(nd2.size.numel())
            kept = torch.nonzero(nd2.size >= phi).squeeze(1)              # the nodes finalise keeps
            rec = LayerRecord(tok_assign, nd2.size, nd2.img, store.V[nd2.prow[kept]], nd2.row_in, nd2.total,
                              nd2.self_aff, feat_nodes=kept)
            inst.append(rec)

            if c.semantic_pooling:                                        # fully connected graph, one step
                lap.at("semantic", t)
                G = self._semantic_matrix(nd2, store, B, None if revote or G is None else (G, merge, changed))
                lap("S^f")
                srec, G_nodes = self._semantic_step(nd2, G, store, tok_assign, tau, K, fimg, rec, phi, pending)
                stats["semantic_nodes"].append(G_nodes)
                sem.append(srec)
            nd = nd2
        lap.at("semantic", "-")
        self._flush_votes(pending, K)
        lap("votes")
        return inst, sem, stats

    def _flush_votes(self, pending: list, K: Keys) -> None:
        """The semantic votes of all layers in one call: ``(out, slots, rows, size, img)`` per layer ->
        ``out[slots] = vote(rows)``."""
        if not pending:
            return
        rows, size, img = (torch.cat([p[i] for p in pending]) for i in (2, 3, 4))
        order = torch.argsort(img, stable=True)                          # rows grouped by image
        votes = torch.empty(rows.shape[0], K.F.shape[2], dtype=K.F.dtype, device=K.F.device)
        votes[order] = self.vote(rows[order], size[order], img[order], K)
        k = 0
        for out, slots, r, _, _ in pending:                              # layers
            out[slots] = votes[k:k + r.shape[0]]
            k += r.shape[0]

    def _components(self, S: int, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Connected components of the contracted pairs: ``(om, rep)`` — node -> new node, and each new
        node's smallest old node (the label) — or None when nothing contracts."""
        if pairs.shape[1] == 0:
            return None
        rep, om = torch.unique(connected_components(S, pairs, self.cfg.cc_backend), sorted=True, return_inverse=True)
        return om, rep

    def _identify_first(self, A: torch.Tensor, h: int, w: int, sf: torch.Tensor, diag: torch.Tensor,
                        u: torch.Tensor, v: torch.Tensor, tau: float, dim: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0's contract flags and its ``S^s`` cache (NaN where not computed). Exact bounds decide
        first: ``S^s <= 1`` rules an edge out; ``|A_u - A_v|_1 <= Σ_t |F_t| |F_u - F_v| <= N |F_u - F_v|``
        (rows of F have norm <= 1) gives ``S^s >= 1 - |F_u - F_v|`` and rules it in. ``S^s`` is computed
        for the rest only — from shifted views of A when they are most edges, else from row gathers.
        ``dim``: the key dimension (sizes the float-error margin of ``|F_u - F_v|``; default 4096)."""
        c = self.cfg
        lap = self._lap
        B, N, _ = A.shape
        E = sf.numel()
        ss_all = torch.full((E,), float("nan"), dtype=A.dtype, device=A.device)
        cand = c.w_f * sf + c.w_s > tau
        if c.w_s == 0:
            return cand, ss_all
        # |F_u - F_v|^2, rounded up by 4x the worst-case float error of length-D dot products
        eps = 4.0 * (dim or 4096) * torch.finfo(A.dtype).eps + 1e-6
        d2 = (diag[u] + diag[v] - 2.0 * sf).clamp(min=0.0) + eps
        sure = cand & (c.w_f * sf + c.w_s * (1.0 - d2.sqrt()) > tau + _SLACK)
        need = torch.nonzero(cand & ~sure).squeeze(1)
        lap("S^s bound")
        contract = sure
        if need.numel() > E // 2:
            ss_all = self._grid_spatial(A, h, w)
            contract[need] = c.w_f * sf[need] + c.w_s * ss_all[need] > tau
        elif need.numel():
            ss = self._spatial(A.reshape(B * N, N), u[need], v[need])
            ss_all[need] = ss
            contract[need] = c.w_f * sf[need] + c.w_s * ss > tau
        lap("S^s")
        return contract, ss_all

    def _exact_pairs(self, nd: "_Nodes", store: "_Store", u: torch.Tensor, v: torch.Tensor, sf: torch.Tensor,
                     tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Contract flags of candidate pairs (``S`` can exceed tau with ``S^s <= 1``) and their ``S^s``
        (NaN where not computed): the block-sum bound ``|P_u - P_v|_1 >= Σ_blocks |ΣP_u - ΣP_v|`` rules
        pairs out where both block sums are at hand (merged nodes get theirs with their rows; the
        others are computed only when the pairs outnumber them 4 to 1: a block-sum row costs about half
        an exact pair, and the bound prunes a fraction of the pairs), then Eq. 3 on the rest."""
        c = self.cfg
        lap = self._lap
        N = store.P.shape[1]
        n = u.numel()
        ss = torch.full((n,), float("nan"), dtype=store.P.dtype, device=u.device)
        miss = torch.cat([u, v])
        miss = miss[~nd.qok[miss]]
        if miss.numel():
            miss = torch.unique(miss)
            if 4 * miss.numel() <= n:
                nd.Q[miss] = self._block_sums(store.P[nd.prow[miss]])
                nd.qok[miss] = True
        go = torch.ones(n, dtype=torch.bool, device=u.device)
        have = torch.nonzero(nd.qok[u] & nd.qok[v]).squeeze(1)
        if have.numel():
            lb = (nd.Q[u[have]] - nd.Q[v[have]]).abs().sum(-1)           # <= |P_u - P_v|_1
            go[have] = c.w_f * sf[have] + c.w_s * (1.0 - lb / N) > tau - _SLACK
        k = torch.nonzero(go).squeeze(1)
        lap("S^s bound")
        ss[k] = self._spatial(store.P, nd.prow[u[k]], nd.prow[v[k]])    # Eq. 3
        contract = torch.zeros(n, dtype=torch.bool, device=u.device)
        contract[k] = c.w_f * sf[k] + c.w_s * ss[k] > tau                # Eq. 4
        lap("S^s")
        return contract, ss

    def _identify(self, nd: "_Nodes", store: "_Store", u: torch.Tensor, v: torch.Tensor, sf: torch.Tensor,
                  e_ss: torch.Tensor, tau: float) -> torch.Tensor:
        """Contract flags of the adjacency edges at a later layer; ``e_ss`` (cached ``S^s``, NaN =
        unknown) is filled in where computed."""
        c = self.cfg
        contract = torch.zeros(u.numel(), dtype=torch.bool, device=u.device)
        cand = torch.nonzero(c.w_f * sf + c.w_s > tau).squeeze(1)       # exact: S^s <= 1
        if cand.numel() == 0 or c.w_s == 0:
            contract[cand] = True
            return contract
        ssc = e_ss[cand]
        known = torch.isnan(ssc).logical_not_()
        kc = cand[known]
        contract[kc] = c.w_f * sf[kc] + c.w_s * ssc[known] > tau
        new = cand[~known]
        if new.numel():
            flag, ss = self._exact_pairs(nd, store, u[new], v[new], sf[new], tau)
            e_ss[new] = ss
            contract[new] = flag
        return contract

    def _merge_nodes(self, nd: "_Nodes", om: torch.Tensor, rep: torch.Tensor, store: "_Store", K: Keys,
                     fimg: torch.Tensor, assign: torch.Tensor, rows_min_size: float | None = None):
        """Eq. 5 on the nodes: sizes, images, score terms and feature sums; unchanged nodes keep theirs.
        The profile rows of the merged nodes (``changed``) are returned for those with ``size >=
        rows_min_size`` (``rows_for``, indices into ``changed``). Instance level (``None``): all of them,
        written to the store rows of the nodes' smallest members, block sums with them. ``assign``: the
        new node of every token. Votes are the caller's."""
        S2 = rep.numel()
        dev = om.device
        cnt = torch.bincount(om, minlength=S2)
        changed = torch.nonzero(cnt > 1).squeeze(1)
        members = torch.nonzero(cnt[om] > 1).squeeze(1)
        C = changed.numel()
        cidx = torch.full((S2,), -1, dtype=torch.long, device=dev)
        cidx[changed] = torch.arange(C, device=dev)
        mseg = cidx[om[members]]
        mrow = nd.prow[members]
        size2 = torch.zeros(S2, dtype=nd.size.dtype, device=dev).index_add_(0, om, nd.size)
        img2 = nd.img[rep]
        tok = torch.nonzero(cidx[assign] >= 0).squeeze(1)                # tokens of the merged nodes
        fc = segment_rows(K.F.reshape(-1, K.F.shape[2]), tok, cidx[assign[tok]], C)   # Σ_{t∈i} F_t
        n = size2[changed]
        row_in2, total2 = nd.row_in[rep], nd.total[rep]
        row_in2[changed] = (fc * fc).sum(-1) / n                         # Σ_{s,t∈i} A_st / |i|
        total2[changed] = (fc * fimg[img2[changed]]).sum(-1) / n         # Σ_t P_i[t]
        self_aff2 = torch.zeros(S2, dtype=nd.self_aff.dtype, device=dev).index_add_(0, om, nd.self_aff)
        nd2 = _Nodes(size=size2, img=img2, prow=nd.prow[rep], self_aff=self_aff2, row_in=row_in2, total=total2,
                     Q=nd.Q, qok=nd.qok)
        if rows_min_size is None:
            rows_for = torch.arange(C, device=dev)
        else:
            rows_for = torch.nonzero(n >= rows_min_size).squeeze(1)
            keep = torch.zeros(C, dtype=torch.bool, device=dev)
            keep[rows_for] = True
            sel = torch.nonzero(keep[mseg]).squeeze(1)
            lut = torch.full((C,), -1, dtype=torch.long, device=dev)
            lut[rows_for] = torch.arange(rows_for.numel(), device=dev)
            members, mseg, mrow = members[sel], lut[mseg[sel]], mrow[sel]
        R = rows_for.numel()
        mode = self.cfg.profiles
        D = fc.shape[1]
        if mode == "auto":                          # member rows x N adds vs nodes x D x N MACs (measured ~16:1)
            mode = "segment" if members.numel() < R * D / 16 else "features"
        if R == 0:
            rows = store.P.new_zeros(0, store.P.shape[1])
        elif mode == "segment":
            rows = segment_rows(store.P, mrow, mseg, R, weights=nd.size[members])
        else:
            rows = feature_rows(fc[rows_for], K, img2[changed[rows_for]])   # (Σ_{t∈i} F_t) Fᵀ
        rows /= n[rows_for][:, None]
        if rows_min_size is None:
            store.write("P", nd2.prow[changed], rows)
            nd2.Q, nd2.qok = nd.Q[rep], nd.qok[rep]
            nd2.Q[changed] = self._block_sums(rows)
            nd2.qok[changed] = True
        return nd2, changed, rows_for, rows, cnt

    def _semantic_matrix(self, nd: "_Nodes", store: "_Store", B: int, prev) -> "_SfMatrix":
        """``S^f`` (Eq. 2) of the pairs ``i < j`` of each image's nodes (-inf on and below the diagonal). From
        scratch (upper triangle only on CPU), or from the previous layer's matrix
        ``prev = (matrix, merge, changed)``, updated in place: a node keeps the position of its smallest
        member, entries between unchanged nodes stay (same votes), the rows and columns of merged nodes
        are new products; the matrix is compacted once half its positions are dead."""
        c = self.cfg
        if prev is not None and prev[1] is None:                         # nothing merged: same nodes
            return prev[0]
        S = nd.size.numel()
        V = store.V[nd.prow]
        D = V.shape[1]
        if prev is not None:
            M0, (om, rep), changed = prev
            if 2 * changed.numel() > S:                                  # most rows new: from scratch
                prev = None
        if prev is None:
            pos, smax = _positions(nd.img, B)
            if B == 1:
                Vp = V[None]
            else:
                Vp = V.new_zeros(B, smax, D)
                Vp[nd.img, pos] = V
            upper = V.device.type == "cpu" and smax > c.block
            M = gram(Keys(F=Vp), "upper", c.block) if upper else torch.bmm(Vp, Vp.transpose(1, 2))
            M.masked_fill_(torch.ones(smax, smax, dtype=torch.bool, device=V.device).tril(), float("-inf"))
            return _SfMatrix(M, nd.img, pos)
        M, pos = M0.M, M0.pos[rep]                                       # each node at its smallest member's place
        P = M.shape[1]
        cpos, smax = _positions(nd.img, B)
        if 2 * smax < P:                                                 # compact (order kept: i < j stays above)
            if B == 1:
                M = M[0].index_select(0, pos).index_select(1, pos)[None]
            else:
                I = torch.zeros(B, smax, dtype=torch.long, device=V.device)
                I[nd.img, cpos] = pos
                M = M[torch.arange(B, device=V.device)[:, None, None], I[:, :, None], I[:, None, :]]
            pos, P = cpos, smax
        Vp = V.new_zeros(B, P, D)                                        # dead places: 0
        Vp[nd.img, pos] = V
        ci, cp = nd.img[changed], pos[changed]
        crank, cmax = _positions(ci, B)
        Vc = V.new_zeros(B, cmax, D)
        Vc[ci, crank] = V[changed]
        R = torch.bmm(Vc, Vp.transpose(1, 2))[ci, crank]                 # (C, P)
        ar = torch.arange(P, device=V.device)[None, :]
        M[ci, cp, :] = torch.where(ar > cp[:, None], R, float("-inf"))   # row: entries right of the diagonal
        M[ci, :, cp] = torch.where(ar < cp[:, None], R, float("-inf"))   # column: entries above it
        return _SfMatrix(M, nd.img, pos)

    def _semantic_pairs(self, G: "_SfMatrix", tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Places ``(b, i, j)``, ``i < j``, of two nodes of image ``b`` with ``w_f S^f + w_s > tau`` (the exact
        bound ``S^s <= 1``): the row maxima of ``G.M`` (-inf on and below the diagonal) pick the rows that
        have any, only those rows are compared."""
        c = self.cfg
        M = G.M
        thr = (tau - c.w_s) / c.w_f - _SLACK if c.w_f > 0 else (float("-inf") if c.w_s > tau else float("inf"))
        bi, pi = torch.nonzero((M.amax(-1) > thr) & G.live, as_tuple=True)
        k, pj = torch.nonzero(M[bi, pi] > thr, as_tuple=True)
        bi, pi = bi[k], pi[k]
        ok = torch.nonzero(G.live[bi, pj]).squeeze(1)                    # both places hold nodes
        bi, pi, pj = bi[ok], pi[ok], pj[ok]
        sf = M[bi, pi, pj]
        keep = torch.nonzero(c.w_f * sf + c.w_s > tau).squeeze(1)
        return bi[keep], pi[keep], pj[keep]

    def _semantic_step(self, nd: "_Nodes", G: "_SfMatrix", store: "_Store", tok_assign: torch.Tensor, tau: float,
                       K: Keys, fimg: torch.Tensor, rec: LayerRecord, phi: int, pending: list
                       ) -> tuple[LayerRecord, int]:
        """One Identify + Merge step on the fully connected graph of each image's instance supernodes.
        Semantic groups feed nothing later: only those with ``size >= phi`` (the masks) need a vote, and
        their votes are left in ``pending`` for one call after the loop (``_flush_votes``)."""
        c = self.cfg
        lap = self._lap
        S = nd.size.numel()
        dev = nd.size.device
        bi, pi, pj = self._semantic_pairs(G, tau)
        u, v = G.node_at[bi, pi], G.node_at[bi, pj]
        lap("S^s bound")
        if c.w_s > 0 and u.numel():
            contract = self._exact_pairs(nd, store, u, v, G.M[bi, pi, pj], tau)[0]
        else:
            contract = torch.ones(u.numel(), dtype=torch.bool, device=dev)
        merge = self._components(S, torch.stack([u[contract], v[contract]]))
        lap("components")
        if merge is None:                                                # no group: the instance record
            return rec, S
        om, rep = merge
        gassign = om[tok_assign]
        gn, changed, rows_for, rows, _ = self._merge_nodes(nd, om, rep, store, K, fimg, gassign, rows_min_size=phi)
        lap("merge")
        kept = torch.nonzero(gn.size >= phi).squeeze(1)                  # the groups finalise keeps
        gV = store.V[nd.prow[rep[kept]]]                                 # singleton group: its instance vote
        if rows_for.numel():                                             # merged group: voted after the loop
            voted = changed[rows_for]
            pending.append((gV, torch.searchsorted(kept, voted), rows, gn.size[voted], gn.img[voted]))
        lap("votes")
        return LayerRecord(gassign, gn.size, gn.img, gV, gn.row_in, gn.total, gn.self_aff, feat_nodes=kept), rep.numel()

    # ------------------------------------------------------------------ dedup, scores, masks
    def finalise(self, records: list[LayerRecord], B: int, h: int, w: int, T: int,
                 excess: torch.Tensor | None = None) -> list[MaskSet]:
        """Masks with area >= phi of every layer -> per image: dedup, scores, NMS, dense masks.

        ``excess`` (``(B,)``, ``border="debias"``): the per-image excess affinity of ring-ring token
        pairs (:func:`ring_excess`), taken out of the contrast terms."""
        c = self.cfg
        N = h * w
        BN = B * N
        dev = records[0].assign.device
        D = records[0].features.shape[1]
        phi = c.phi(N)
        gen = torch.Generator(device="cpu").manual_seed(0x0A9)
        tok_hash = torch.randint(0, 1 << 40, (N,), generator=gen).to(dev).repeat(B)   # exact subset hashing
        ring_tok = border_ring(h, w, dev).flatten().to(records[0].row_in.dtype).repeat(B)
        R = ring_size(h, w)
        # all layers at once: node g of layer t gets the global id off[t] + g
        sizes = [r.size.numel() for r in records]
        off = [sum(sizes[:t]) for t in range(len(records))]
        S_all = sum(sizes)
        layer_all = torch.repeat_interleave(torch.arange(len(records), device=dev),
                                            torch.tensor(sizes, device=dev))
        assign = torch.cat([r.assign + o for r, o in zip(records, off)])            # (T * B*N,)
        frow, fo = [], 0                                                # each node's row of the features
        for r, S in zip(records, sizes):                                # layers
            if r.feat_nodes is None:
                frow.append(torch.arange(fo, fo + S, device=dev))
            else:
                x = torch.full((S,), -1, dtype=torch.long, device=dev)
                x[r.feat_nodes] = torch.arange(fo, fo + r.feat_nodes.numel(), device=dev)
                frow.append(x)
            fo += r.features.shape[0]
        size_all = torch.cat([r.size for r in records])
        keep = torch.nonzero(size_all >= phi).squeeze(1)
        n = size_all[keep]
        node_hash = segment_sum(tok_hash.repeat(len(records)), assign, S_all)[keep]
        ring = segment_sum(ring_tok.repeat(len(records)), assign, S_all)[keep]      # ring tokens in the mask
        img_all = torch.cat([r.node_img for r in records])[keep]
        row_in = torch.cat([r.row_in for r in records])[keep]
        total = torch.cat([r.total for r in records])[keep]
        self_aff = torch.cat([r.self_aff for r in records])[keep]
        pair_sum = n * row_in                                            # Σ_{s,t∈i} A_st
        in_self = row_in / n
        in_noself = torch.where(n > 1, (pair_sum - self_aff) / (n * (n - 1)).clamp(min=1), in_self)
        out_n = N - n
        out = torch.where(out_n > 0, (total - row_in) / out_n.clamp(min=1), in_self)
        if excess is not None:                # δ off each of the r(r-1) ring pairs inside, r(R-r) across
            d = excess[img_all]
            in_self = in_self - d * ring * (ring - 1) / (n * n)
            in_noself = in_noself - torch.where(n > 1, d * ring * (ring - 1) / (n * (n - 1)).clamp(min=1), 0.0)
            out = out - torch.where(out_n > 0, d * ring * (R - ring) / (n * out_n).clamp(min=1), 0.0)
        feats = torch.cat([r.features for r in records])[torch.cat(frow)[keep]]
        cat = {"layer": layer_all[keep], "node": keep, "img": img_all, "area": n.round().long(), "hash": node_hash,
               "in": in_noself, "in_self": in_self, "out": out, "feat": feats, "ring": ring}
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
        # dense token masks from the token -> node maps of all layers at once (no loop over masks)
        Kn = sel.numel()
        masks = torch.zeros(Kn, BN, dtype=torch.bool, device=dev)
        lut = torch.full((S_all,), -1, dtype=torch.long, device=dev)
        lut[node] = torch.arange(Kn, device=dev)
        ent = lut[assign]
        ok = torch.nonzero(ent >= 0).squeeze(1)
        masks[ent[ok], ok % BN] = True
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
