"""Online Agglomerative Pooling (OAP), paper Sec. 4.2 / Algorithm 1 — the pseudo-mask part.

Input: last-block key features ``(B, h, w, D)`` of a (self-supervised) backbone. Output: per
image, a hierarchy of token-level masks at two levels — ``instance`` (connected regions,
pooled on the 4-neighbour adjacency graph) and ``semantic`` (possibly disjoint regions,
pooled on the fully connected graph of the instance supernodes) — with their features,
the OAP layer each came from, and a score.

Everything runs on tensors of the whole batch: nodes of all images get global ids
(images occupy contiguous ranges), edges are a ``(2, E)`` list, connected components run
once per layer for the batch (see :mod:`.graph`). The only Python loops are over the
(<= 5) layers and over fixed-size memory chunks.

Interpretation choices (the paper is loose here; all configurable, see ``OAPConfig``):

* Graph: ``F`` = L2-normalised keys (optionally centred per image first), 4-neighbourhood
  edges, ``A = F Fᵀ`` per image.
* Identify (Eqs. 2-4): ``S = w_f S^f + w_s S^s``; an edge is contracted when ``S > τ_t``.
  ``S^s`` uses the membership-averaged affinity profiles ``P_i = M_i A / |M_i|`` and is
  only evaluated on the edges that survive the exact bound ``w_f S^f + w_s > τ_t``
  (``S^s <= 1``).
* Merge (Eq. 5): ``edge_update="adjacent"`` (default) reads Eq. 5 as ``Ωᵀ E Ω`` without
  self-loops — supernodes are linked iff some of their members are adjacent, which is
  what the text says ("edges are maintained only between adjacent supernodes").
  ``"literal"`` evaluates ``Ωᵀ Ē (Ωᵀ Ē)ᵀ`` with ``Ē = E + I`` (so directly adjacent
  supernodes stay linked) and also links supernodes two hops apart.
* Eq. 6 (feature update): ``vote="sum"`` (default, literal) uses ``softmax(M_i A / σ) F``
  with binary ``M_i`` — a sum of member affinities, near-argmax for large supernodes;
  ``vote="mean"`` divides by ``|M_i|`` like Eq. 3. Exact reuse (``reuse_votes``, default on): a
  supernode whose membership did not change in a merge step (a group of exactly one old node)
  keeps its previous Eq. 6 feature — its ``M_i`` and hence its vote are unchanged — so the
  softmax + ``(S x N) x (N x D)`` product runs only on the changed supernodes. At the first layer
  every node is voted (``V^0 = F`` is not an Eq. 6 vote); a singleton semantic group takes its
  instance supernode's feature.
* Collection (Alg. 1 lines 8-13): after each layer every *new* supernode with area
  ``>= min_area`` is an instance mask (the indices in lines 10-11 do not match; this is
  the consistent reading). Semantic pooling: one Identify+Merge step per layer with the
  layer's ``τ_t`` on the fully connected graph of that layer's instance supernodes; its
  groups with area ``>= min_area`` are semantic masks; it is not fed to the next layer.
* Duplicates: an unchanged supernode reappears identically at later layers.
  ``dedup="unique"`` keeps each distinct mask once (per image and level) at the layer it
  first appeared and counts the layers it persisted; ``dedup_iou < 1`` additionally drops
  a mask whose IoU with a higher-scoring mask of the same level exceeds ``dedup_iou``.
  ``dedup="all"`` keeps every (layer, mask) entry.
* Score (masks carry none in the paper; needed for AP): ``score="contrast"`` (default) is
  the mean affinity of the mask's tokens to their own region minus their mean affinity
  to the rest of the image (``P_i`` restricted inside vs outside the mask); ``persistence``
  is the fraction of layers the mask survived unchanged; ``area`` the area fraction;
  ``contrast_persistence`` = contrast x persistence.
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

__all__ = ["OAPConfig", "MaskSet", "OAPImageResult", "OnlineAgglomerativePooling", "grid_edges"]

SCORES = ("contrast", "persistence", "area", "contrast_persistence")


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
    edge_update: str = param("adjacent", choices=("adjacent", "literal"), help="Eq. 5 reading")
    semantic_pooling: bool = param(True, help="also produce semantic-level masks")
    center_features: bool = param(False, help="subtract the per-image mean key before L2-normalising")
    dedup: str = param("unique", choices=("unique", "all"), help="keep each distinct mask once, or every layer's copy")
    dedup_iou: float = param(1.0, range=(0.0, 1.0), help="with dedup=unique: also drop masks with IoU > this "
                                                          "to a higher-scoring mask (1.0 = exact duplicates only)")
    score: str = param("contrast", choices=SCORES, help="mask scoring rule (for AP ranking)")
    cc_backend: str = param("auto", choices=("auto", "torch", "scipy"), help="connected-components backend")
    chunk_elems: int = param(1 << 20, range=(1 << 10, None), help="memory chunk for the spatial term")
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


def grid_edges(h: int, w: int, batch: int = 1, device: Any = None) -> torch.Tensor:
    """4-neighbourhood edges of a ``batch`` of h x w grids, node ids offset by ``b * h * w``."""
    idx = torch.arange(h * w, device=device).reshape(h, w)
    e = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)]),
                   torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])], dim=1)
    off = (torch.arange(batch, device=device) * h * w).repeat_interleave(e.shape[1])
    return e.repeat(1, batch) + off


class OnlineAgglomerativePooling(nn.Module):
    """Batched, device-agnostic OAP. ``forward(keys (B,h,w,D)) -> list[OAPImageResult]``."""

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

    # ------------------------------------------------------------------ identify (Eqs. 2-4)
    def _similarity(self, V: torch.Tensor, P: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                    sf: torch.Tensor | None, tau: float, ss_all: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean 'contract' flag per candidate edge (u[k], v[k])."""
        c = self.cfg
        if sf is None:
            sf = (V[u] * V[v]).sum(-1)                              # Eq. 2
        contract = torch.zeros(u.numel(), dtype=torch.bool, device=u.device)
        # exact pruning: S^s <= 1, so S <= w_f S^f + w_s
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
        step = max(1, c.chunk_elems // max(n_tok, 1))
        ss = torch.empty(cand.numel(), dtype=P.dtype, device=P.device)
        for s in range(0, cand.numel(), step):                      # memory chunks, not edges
            k = cand[s:s + step]
            d = torch.index_select(P, 0, u[k])                     # cache-sized chunks, in place
            d.sub_(torch.index_select(P, 0, v[k])).abs_()
            ss[s:s + step] = 1.0 - d.sum(-1) / n_tok                  # Eq. 3
        score = c.w_f * sf[cand] + c.w_s * ss                        # Eq. 4
        contract[cand] = score > tau
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

    # ------------------------------------------------------------------ Eq. 6
    def _vote(self, P: torch.Tensor, size: torch.Tensor, node_img: torch.Tensor, pos: torch.Tensor,
              F: torch.Tensor, smax: int) -> torch.Tensor:
        B = F.shape[0]
        logits = P * size[:, None] if self.cfg.vote == "sum" else P     # M_i A (sum) or M_i A / |M_i|
        W = torch.softmax(logits / self.cfg.sigma, dim=-1)
        pad = W.new_zeros(B, smax, W.shape[1])
        pad[node_img, pos] = W
        out = torch.bmm(pad, F)[node_img, pos]
        return Fn.normalize(out, dim=-1)

    def _vote_merged(self, P: torch.Tensor, size: torch.Tensor, node_img: torch.Tensor, F: torch.Tensor,
                     om: torch.Tensor, V_old: torch.Tensor | None) -> torch.Tensor:
        """Eq. 6 for the supernodes after the merge ``om`` (old node -> new node).

        With ``reuse_votes`` and ``V_old`` given (the old nodes' Eq. 6 features), a new node made
        of exactly one old node has the same membership ``M_i``, hence the same vote: it keeps
        ``V_old``; only the changed nodes are voted, batched per image like the full vote
        (node ids are image-contiguous and ``changed`` is sorted, so ``_positions`` applies)."""
        B = F.shape[0]
        S2 = P.shape[0]
        if V_old is None or not self.cfg.reuse_votes:
            pos, smax = self._positions(node_img, B)
            return self._vote(P, size, node_img, pos, F, smax)
        cnt = torch.bincount(om, minlength=S2)
        same = torch.nonzero(cnt[om] == 1).squeeze(1)               # old nodes that are a whole new node
        changed = torch.nonzero(cnt > 1).squeeze(1)
        V = V_old.new_empty(S2, V_old.shape[1])
        V[om[same]] = V_old[same]
        if changed.numel():
            img = node_img[changed]
            pos, smax = self._positions(img, B)
            V[changed] = self._vote(P[changed], size[changed], img, pos, F, smax)
        return V

    # ------------------------------------------------------------------ Eq. 5
    def _update_edges(self, edges: torch.Tensor, c: torch.Tensor, S: int, S_old: int) -> torch.Tensor:
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

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _positions(node_img: torch.Tensor, B: int) -> tuple[torch.Tensor, int]:
        counts = torch.bincount(node_img, minlength=B)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(node_img.numel(), device=node_img.device) - starts[node_img]
        return pos, int(counts.max()) if counts.numel() else 0

    def _record(self, store: dict, layer: int, tok_assign: torch.Tensor, size: torch.Tensor, P: torch.Tensor,
                node_img: torch.Tensor, V: torch.Tensor, tok_hash: torch.Tensor, tok_pos: torch.Tensor,
                n_tok: int) -> None:
        """Remember the nodes of this layer with area >= phi (masks stay implicit: token -> node)."""
        S = size.numel()
        node_hash = segment_sum(tok_hash, tok_assign, S)
        inside = segment_sum(P[tok_assign, tok_pos], tok_assign, S)      # sum_{t in i} P_i[t]
        total = P.sum(-1)
        n = size
        in_mean = inside / n
        out_n = n_tok - n
        out_mean = torch.where(out_n > 0, (total - inside) / out_n.clamp(min=1), in_mean)
        keep = torch.nonzero(n >= self.cfg.phi(n_tok)).squeeze(1)
        store["layer"].append(torch.full((keep.numel(),), layer, dtype=torch.long, device=keep.device))
        store["node"].append(keep)
        store["img"].append(node_img[keep])
        store["area"].append(n[keep].round().long())
        store["hash"].append(node_hash[keep])
        store["contrast"].append((in_mean - out_mean)[keep])
        store["feat"].append(V[keep])
        store["assign"].append(tok_assign)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, keys: torch.Tensor) -> list[OAPImageResult]:
        c = self.cfg
        if keys.dim() != 4:
            raise ValueError(f"OAP expects keys of shape (B, h, w, D), got {tuple(keys.shape)}")
        B, h, w, D = keys.shape
        N = h * w
        dev = keys.device
        x = keys.reshape(B, N, D).float()
        if c.center_features:
            x = x - x.mean(dim=1, keepdim=True)
        F = Fn.normalize(x, dim=-1)                                   # L2-normalised keys
        A = torch.bmm(F, F.transpose(1, 2))                           # spatial affinity, per image

        # graph initialisation: one node per token, M^0 = I
        S = B * N
        node_img = torch.arange(B, device=dev).repeat_interleave(N)
        tok_pos = torch.arange(N, device=dev).repeat(B)
        tok_assign = torch.arange(S, device=dev)
        size = torch.ones(S, device=dev)
        P = A.reshape(S, N)                                           # M^0 A / |M^0| = A
        V = F.reshape(S, D)
        edges = grid_edges(h, w, B, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(0x0A9)
        tok_hash = torch.randint(0, 1 << 40, (N,), generator=gen).to(dev).repeat(B)  # exact subset hashing

        self.last_stats = {"tokens": S, "instance_nodes": [], "semantic_nodes": []}
        inst = {k: [] for k in ("layer", "node", "img", "area", "hash", "contrast", "feat", "assign")}
        sem = {k: [] for k in inst}
        for t, tau in enumerate(c.thresholds):
            # Identify: Eqs. 2-4 on the adjacency edges, threshold, connected components
            ss0 = self._grid_spatial(A, h, w) if t == 0 and c.w_s > 0 else None
            contract = self._similarity(V, P, edges[0], edges[1], None, tau, ss0)
            lab = connected_components(S, edges[:, contract], c.cc_backend)
            om, S2 = relabel(lab)                                     # Ω as a node -> supernode map
            # Merge: Eq. 5 (masks, edges) and Eq. 6 (features)
            size2 = segment_sum(size, om, S2)
            P = segment_sum(P, om, S2, weights=size) / size2[:, None]
            node_img = torch.zeros(S2, dtype=torch.long, device=dev).scatter_(0, om, node_img)
            tok_assign = om[tok_assign]
            edges = self._update_edges(edges, om, S2, S)
            pos, smax = self._positions(node_img, B)
            V = self._vote_merged(P, size2, node_img, F, om, V if t > 0 else None)   # V^0 = F: vote all
            S, size = S2, size2
            self.last_stats["instance_nodes"].append(S)
            self._record(inst, t, tok_assign, size, P, node_img, V, tok_hash, tok_pos, N)

            if c.semantic_pooling:                                    # fully connected graph, one step
                Vp = V.new_zeros(B, smax, D)
                Vp[node_img, pos] = V
                sf_all = torch.bmm(Vp, Vp.transpose(1, 2))
                valid = torch.zeros(B, smax, dtype=torch.bool, device=dev)
                valid[node_img, pos] = True
                pair_ok = valid[:, :, None] & valid[:, None, :] & torch.ones(
                    smax, smax, dtype=torch.bool, device=dev).triu(1)
                pair_ok &= c.w_f * sf_all + c.w_s > tau               # exact pruning before Eq. 3
                bi, pi, pj = torch.nonzero(pair_ok, as_tuple=True)
                starts = torch.cumsum(torch.bincount(node_img, minlength=B), 0) - torch.bincount(node_img, minlength=B)
                u, v = starts[bi] + pi, starts[bi] + pj
                sc = self._similarity(V, P, u, v, sf_all[bi, pi, pj], tau)
                g = connected_components(S, torch.stack([u[sc], v[sc]]), c.cc_backend)
                g, G = relabel(g)
                self.last_stats["semantic_nodes"].append(G)
                gsize = segment_sum(size, g, G)
                gP = segment_sum(P, g, G, weights=size) / gsize[:, None]
                gimg = torch.zeros(G, dtype=torch.long, device=dev).scatter_(0, g, node_img)
                gV = self._vote_merged(gP, gsize, gimg, F, g, V)          # singleton group: instance vote
                self._record(sem, t, g[tok_assign], gsize, gP, gimg, gV, tok_hash, tok_pos, N)

        T = len(c.thresholds)
        inst_sets = self._finalise(inst, B, h, w, T)
        sem_sets = self._finalise(sem, B, h, w, T) if c.semantic_pooling else [
            _empty_set(h, w, D, dev) for _ in range(B)]
        return [OAPImageResult(instance=i, semantic=s) for i, s in zip(inst_sets, sem_sets)]

    # ------------------------------------------------------------------ dedup, scores, masks
    def _finalise(self, store: dict, B: int, h: int, w: int, T: int) -> list[MaskSet]:
        c = self.cfg
        N = h * w
        layer = torch.cat(store["layer"])
        dev = layer.device
        if layer.numel() == 0:
            D = store["feat"][0].shape[1]
            return [_empty_set(h, w, D, dev) for _ in range(B)]
        node, img = torch.cat(store["node"]), torch.cat(store["img"])
        area, hsh = torch.cat(store["area"]), torch.cat(store["hash"])
        contrast, feat = torch.cat(store["contrast"]), torch.cat(store["feat"])
        # identical masks (same image, area and subset hash) across layers
        keyrows = torch.stack([img, area, hsh], dim=1)
        _, inv = torch.unique(keyrows, dim=0, return_inverse=True)
        count = torch.bincount(inv)
        persistence = count[inv]
        if c.dedup == "unique":
            first = torch.full((count.numel(),), layer.numel(), dtype=torch.long, device=dev)
            first.scatter_reduce_(0, inv, torch.arange(layer.numel(), device=dev), reduce="amin")
            keep = torch.sort(first).values
        else:
            keep = torch.arange(layer.numel(), device=dev)
        layer, node, img, area, persistence = layer[keep], node[keep], img[keep], area[keep], persistence[keep]
        contrast, feat = contrast[keep], feat[keep]
        pers = persistence.float() / T
        if c.score == "contrast":
            score = contrast
        elif c.score == "persistence":
            score = pers
        elif c.score == "area":
            score = area.float() / N
        else:
            score = contrast.clamp(min=0) * pers
        # dense token masks, built per layer from the token -> node maps (no loop over masks)
        K = keep.numel()
        masks = torch.zeros(K, N, dtype=torch.bool, device=dev)
        tok_pos = torch.arange(N, device=dev).repeat(B)
        for t in range(T):
            sel = torch.nonzero(layer == t).squeeze(1)
            if sel.numel() == 0:
                continue
            assign = store["assign"][t]
            lut = torch.full((int(assign.max()) + 1,), -1, dtype=torch.long, device=dev)
            lut[node[sel]] = sel
            ent = lut[assign]
            ok = ent >= 0
            masks[ent[ok], tok_pos[ok]] = True
        out = []
        for b in range(B):                                           # split the batch into images
            idx = torch.nonzero(img == b).squeeze(1)
            idx = idx[torch.argsort(score[idx], descending=True, stable=True)]
            if c.dedup == "unique" and c.dedup_iou < 1.0 and idx.numel() > 1:
                m = masks[idx].float()
                inter = m @ m.t()
                ar = m.sum(1)
                iou = inter / (ar[:, None] + ar[None, :] - inter).clamp(min=1)
                higher = torch.ones_like(iou, dtype=torch.bool).tril(-1)   # row i vs better-ranked j < i
                idx = idx[~((iou > c.dedup_iou) & higher).any(1)]
            out.append(MaskSet(masks=masks[idx].reshape(-1, h, w), features=feat[idx], scores=score[idx],
                               layers=layer[idx], persistence=persistence[idx], areas=area[idx]))
        return out


def _empty_set(h: int, w: int, D: int, device: Any) -> MaskSet:
    z = torch.zeros(0, dtype=torch.long, device=device)
    return MaskSet(masks=torch.zeros(0, h, w, dtype=torch.bool, device=device),
                   features=torch.zeros(0, D, device=device), scores=torch.zeros(0, device=device),
                   layers=z, persistence=z.clone(), areas=z.clone())
