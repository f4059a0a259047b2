"""OAP against a naive, literal Algorithm 1 (dense membership matrices, loops, float64), and the
exact speed-ups (affinity modes, profile modes, bounds) against the plain computations."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.csgraph import connected_components as scipy_cc

from labelwise.pseudo.oap.pooling import (Keys, LayerRecord, OAPConfig, OnlineAgglomerativePooling, _Nodes, _Store,
                                          gram, grid_edges, nms_keep, sparse_gram)


def _cc(n, pairs):
    if not pairs:
        return np.arange(n)
    a = np.array(pairs).T
    g = sp.coo_matrix((np.ones(a.shape[1]), (a[0], a[1])), shape=(n, n))
    _, lab = scipy_cc(g, directed=False)
    first = {}
    return np.array([first.setdefault(v, i) for i, v in enumerate(lab)])   # label = smallest member


def naive_oap(keys: torch.Tensor, cfg: OAPConfig):
    """Algorithm 1 read literally for one image ``(h, w, D)``: returns per layer the instance and the
    semantic partitions as sets of frozensets of token ids (every node, no area filter)."""
    h, w, D = keys.shape
    N = h * w
    x = keys.reshape(N, D).double()
    if cfg.center_features:
        x = x - x.mean(0, keepdim=True)
    Fk = F.normalize(x, dim=-1)
    A = Fk @ Fk.T
    M = torch.eye(N, dtype=torch.float64)                       # M^0 = I
    V = Fk.clone()                                              # V^0 = F
    e = grid_edges(h, w).T.tolist()
    E = {(min(a, b), max(a, b)) for a, b in e}
    wf, ws = cfg.w_f, cfg.w_s
    out = []

    def sim(V, P, i, j):
        return wf * float(V[i] @ V[j]) + ws * (1 - float((P[i] - P[j]).abs().sum()) / N)   # Eqs. 2-4

    def vote(M):
        logits = M @ A if cfg.vote == "sum" else (M @ A) / M.sum(1, keepdim=True)
        return F.normalize(torch.softmax(logits / cfg.sigma, -1) @ Fk, dim=-1)          # Eq. 6

    for tau in cfg.thresholds:
        P = (M @ A) / M.sum(1, keepdim=True)                    # Eq. 3 profiles
        S = M.shape[0]
        lab = _cc(S, [(i, j) for i, j in sorted(E) if sim(V, P, i, j) > tau])
        ids = sorted(set(lab.tolist()))
        Om = torch.zeros(S, len(ids), dtype=torch.float64)
        Om[torch.arange(S), torch.tensor([ids.index(v) for v in lab])] = 1
        M = Om.T @ M                                            # Eq. 5, masks
        E = {(min(a, b), max(a, b)) for i, j in E for a, b in [(ids.index(lab[i]), ids.index(lab[j]))] if a != b}
        V = vote(M)
        inst = {frozenset(torch.nonzero(m).squeeze(1).tolist()) for m in M}
        # semantic pooling: one step on the fully connected graph of this layer's supernodes
        P = (M @ A) / M.sum(1, keepdim=True)
        S = M.shape[0]
        g = _cc(S, [(i, j) for i in range(S) for j in range(i + 1, S) if sim(V, P, i, j) > tau])
        sem = {frozenset(torch.nonzero(M[torch.from_numpy(g == k)].sum(0)).squeeze(1).tolist()) for k in set(g.tolist())}
        out.append((inst, sem))
    return out


def _layers(ms, T):
    return [{frozenset(np.flatnonzero(m.reshape(-1).numpy()).tolist()) for m, t in zip(ms.masks, ms.layers) if t == k}
            for k in range(T)]


def _cases():
    g = torch.Generator().manual_seed(11)
    lab = torch.zeros(10, 12, dtype=torch.long)
    lab[1:4, 1:5] = 1
    lab[6:9, 7:11] = 1
    lab[1:6, 7:10] = 2
    protos = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    regions = protos[lab] + 0.15 * torch.randn(10, 12, 16, generator=g)
    smooth = F.avg_pool2d(torch.randn(1, 12, 11, 13, generator=g), 3, 1, 1)[0].permute(1, 2, 0)
    relu = torch.relu(F.avg_pool2d(torch.randn(1, 40, 9, 9, generator=g), 3, 1, 1)[0].permute(1, 2, 0) - 0.3)
    return {"regions": regions, "smooth": smooth, "relu": relu}


@pytest.mark.parametrize("case", ["regions", "smooth", "relu"])
@pytest.mark.parametrize("kw", [{}, {"vote": "mean", "center_features": True},
                                {"thresholds": (0.9, 0.75, 0.6), "w_f": 0.5, "w_s": 0.5}])
def test_matches_naive_algorithm_1(case, kw):
    keys = _cases()[case]
    base = dict(min_area=1, dedup="all", **kw)
    cfg = OAPConfig(**{k: v for k, v in base.items()})
    want = naive_oap(keys, cfg)
    T = len(cfg.thresholds)
    for affinity in ("dense", "symmetric", "sparse"):
        for profiles in ("segment", "features"):
            res = OnlineAgglomerativePooling(affinity=affinity, profiles=profiles, **base)(keys[None])[0]
            inst, sem = _layers(res.instance, T), _layers(res.semantic, T)
            for t in range(T):
                assert inst[t] == want[t][0], (affinity, profiles, t)
                assert sem[t] == want[t][1], (affinity, profiles, t)


def test_affinity_modes_equal_the_plain_product():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(2, 150, 24, generator=g) - 0.8)      # ReLU-like: ~80% zeros
    for centre in (False, True):
        mu = x.mean(1, keepdim=True) if centre else None
        xc = x - mu if centre else x
        norm = xc.norm(dim=-1).clamp_min(1e-12)
        Fk = xc / norm[..., None]
        want = Fk @ Fk.transpose(1, 2)
        for mode, k in (("dense", Keys(F=Fk)), ("symmetric", Keys(F=Fk)),
                        ("sparse", Keys(F=Fk, x=x, mu=mu, inv_norm=1 / norm))):
            for block in (16, 64, 512):
                A = gram(k, mode, block)
                torch.testing.assert_close(A, want, atol=2e-6, rtol=1e-5)



@pytest.mark.parametrize("centre", [False, True])
def test_sparse_gram_any_channel_split_equals_the_plain_product(centre):
    # channels from always-on to rare (plus two dead ones), so every split below leaves work on both sides
    g = torch.Generator().manual_seed(4)
    N, D = 400, 48
    use = torch.linspace(0.0, 1.0, D)
    use[:2] = 0.0
    x = torch.rand(N, D, generator=g) * (torch.rand(N, D, generator=g) < use).float()
    mu = x.mean(0, keepdim=True) if centre else None
    xc = x - mu if centre else x
    norm = xc.norm(dim=-1).clamp_min(1e-12)
    Fk = xc / norm[:, None]
    want = (Fk.double() @ Fk.double().t()).float()
    for heavy in (0.0, 0.05, 0.3, 0.7, 2.0):                     # all dense ... all sparse
        out = torch.full((N, N), float("nan"))
        sparse_gram(x, Fk, 1 / norm, mu, out, heavy)
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


def test_forward_reuses_its_affinity_memory_without_touching_earlier_results():
    g = torch.Generator().manual_seed(5)
    k1, k2 = (torch.relu(torch.randn(1, 9, 10, 32, generator=g) - 0.5) for _ in range(2))
    oap = OnlineAgglomerativePooling(min_area=1)
    r1 = oap(k1)[0]
    before = [t.clone() for lv in ("instance", "semantic") for t in (r1.level(lv).masks, r1.level(lv).features,
                                                                    r1.level(lv).scores)]
    ptr = oap._a_buffer.data_ptr()
    oap(k2)                                                        # same shape: same memory, overwritten
    assert oap._a_buffer.data_ptr() == ptr
    after = [t for lv in ("instance", "semantic") for t in (r1.level(lv).masks, r1.level(lv).features,
                                                           r1.level(lv).scores)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    again = oap(k1)[0]
    fresh = OnlineAgglomerativePooling(min_area=1)(k1)[0]
    for lv in ("instance", "semantic"):
        assert torch.equal(again.level(lv).masks, fresh.level(lv).masks)
        assert torch.equal(again.level(lv).scores, fresh.level(lv).scores)
    oap(torch.relu(torch.randn(2, 9, 10, 32, generator=g)))      # another shape: a new buffer
    assert oap._a_buffer.shape == (2, 90, 90)

def test_block_bound_pruning_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    oap = OnlineAgglomerativePooling()
    Fk = F.normalize(torch.randn(40, 8, generator=g), dim=-1)
    P = torch.softmax(torch.randn(40, 300, generator=g), -1) * 300 * 0.2 + 0.1
    u, v = torch.triu_indices(40, 40, 1)
    sf = (Fk[u] * Fk[v]).sum(-1)
    # every node's block sums at hand, so the block-sum bound prunes before Eq. 3
    zeros = torch.zeros(40)
    nodes = _Nodes(size=torch.ones(40), img=torch.zeros(40, dtype=torch.long), prow=torch.arange(40),
                   self_aff=zeros, row_in=zeros, total=zeros, Q=oap._block_sums(P),
                   qok=torch.ones(40, dtype=torch.bool))
    store = _Store(P, False, Fk)
    want_all = {}
    for tau in (0.9, 0.7, 0.5, 0.3):
        want = 0.6 * sf + 0.4 * (1 - (P[u] - P[v]).abs().sum(-1) / 300) > tau
        got = oap._exact_pairs(nodes, store, u, v, sf, tau)[0]
        assert torch.equal(got, want)
        want_all[tau] = int(want.sum())
    assert 0 < want_all[0.5] < u.numel()                               # the case is not trivial


def _record(masks: torch.Tensor, A: torch.Tensor, Fk: torch.Tensor) -> LayerRecord:
    """A record for a given partition (masks (S, N) disjoint, covering) of one image."""
    S, N = masks.shape
    assign = masks.float().argmax(0)
    size = masks.sum(1).float()
    P = (masks.double() @ A.double()).float() / size[:, None]
    row_in = torch.stack([P[i][masks[i]].sum() for i in range(S)])
    return LayerRecord(assign, size, torch.zeros(S, dtype=torch.long), Fk[:S].clone(), row_in, P.sum(1),
                       torch.stack([A.diagonal()[masks[i]].sum() for i in range(S)]))


def test_contrast_scores_equal_direct_computation():
    g = torch.Generator().manual_seed(4)
    h = w = 6
    Fk = F.normalize(torch.randn(h * w, 5, generator=g), dim=-1)
    A = Fk @ Fk.T
    lab = torch.randint(0, 4, (h * w,), generator=g)
    masks = torch.stack([lab == k for k in range(4)])
    rec = _record(masks, A, Fk)
    for score in ("contrast", "contrast_self"):
        res = OnlineAgglomerativePooling(score=score, min_area=1).finalise([rec], 1, h, w, 1)[0]
        for m, s in zip(res.masks.reshape(len(res), -1), res.scores):
            inside = A[m][:, m]
            n = int(m.sum())
            if score == "contrast":
                want_in = (inside.sum() - inside.diagonal().sum()) / (n * (n - 1))
            else:
                want_in = inside.mean()
            want = want_in - A[m][:, ~m].mean()
            assert abs(float(s) - float(want)) < 1e-5
    # the self-affinity term inflates small masks: a 2-token mask gains (1 - A_01) / 2 over 1
    rec2 = _record(torch.stack([torch.arange(36) < 2, torch.arange(36) >= 2]), A, Fk)
    a = OnlineAgglomerativePooling(score="contrast", min_area=1).finalise([rec2], 1, h, w, 1)[0]
    b = OnlineAgglomerativePooling(score="contrast_self", min_area=1).finalise([rec2], 1, h, w, 1)[0]
    small_a = a.scores[a.areas == 2]
    small_b = b.scores[b.areas == 2]
    assert float(small_b - small_a) == pytest.approx(float((1 - A[0, 1]) / 2), abs=1e-5)


def test_nms_is_standard_greedy():
    # A suppresses B; B overlaps C but B is suppressed, so C stays (the old rule dropped C too)
    N = 10
    A = torch.zeros(N, dtype=torch.bool)
    A[0:4] = True
    B = torch.zeros(N, dtype=torch.bool)
    B[1:6] = True
    C = torch.zeros(N, dtype=torch.bool)
    C[3:8] = True
    keep = nms_keep(torch.stack([A, B, C]), 0.4)
    assert keep.tolist() == [True, False, True]
    g = torch.Generator().manual_seed(5)
    for _ in range(20):                                              # random sets vs a plain greedy loop
        m = torch.rand(15, 30, generator=g) < 0.3
        got = nms_keep(m, 0.3)
        kept = []
        for i in range(15):
            ok = True
            for j in kept:
                inter = float((m[i] & m[j]).sum())
                union = float((m[i] | m[j]).sum())
                if union and inter / union > 0.3:
                    ok = False
            if ok:
                kept.append(i)
        assert torch.nonzero(got).squeeze(1).tolist() == kept


def test_min_area_frac_scales_with_the_grid():
    c = OAPConfig(min_area_frac=5 / 784)
    assert c.phi(784) == 5 and c.phi(3136) == 20 and c.phi(196) == 1
    assert OAPConfig().phi(3136) == 5
    keys = _cases()["regions"][None]
    few = OnlineAgglomerativePooling(min_area_frac=0.2)(keys)[0].instance
    assert len(few) and bool((few.areas >= 24).all())


def test_adjacent_instance_masks_are_connected_literal_may_not_be():
    import scipy.ndimage

    g = torch.Generator().manual_seed(6)
    keys = F.avg_pool2d(torch.randn(1, 8, 24, 24, generator=g), 3, 1, 1).permute(0, 2, 3, 1)
    kw = dict(min_area=1, semantic_pooling=False, thresholds=(0.9, 0.8, 0.7, 0.6))
    adj = OnlineAgglomerativePooling(**kw)(keys)[0].instance
    assert all(scipy.ndimage.label(m.numpy())[1] == 1 for m in adj.masks)
    lit = OnlineAgglomerativePooling(edge_update="literal", **kw)(keys)[0].instance
    assert any(scipy.ndimage.label(m.numpy())[1] > 1 for m in lit.masks)


def test_compact_op_count_does_not_grow_with_supernodes():
    """Per-layer work is whole-tensor ops: the number of aten calls of a forward does not grow with
    the number of supernodes (rough content on a 12x12 and on a 32x32 grid: 7x the nodes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(7)
    small = torch.randn(1, 12, 12, 8, generator=g)
    large = torch.randn(1, 32, 32, 8, generator=g)
    counts, nodes = [], []
    for keys in (small, large):
        oap = OnlineAgglomerativePooling(affinity="dense", profiles="segment", cc_backend="scipy",
                                         chunk_elems=1 << 30)     # one memory chunk: count the per-layer ops
        Count.n = 0
        with Count():
            oap(keys)
        counts.append(Count.n)
        nodes.append(oap.last_stats["instance_nodes"][0])
    assert nodes[1] > 5 * nodes[0]
    assert abs(counts[0] - counts[1]) <= 0.1 * counts[0], counts


@pytest.mark.parametrize("vote", ["sum", "mean"])
def test_vote_embeddings_reproduce_the_mask_features(vote):
    from labelwise.pseudo.oap.pooling import vote_embeddings

    keys = _cases()["regions"]
    oap = OnlineAgglomerativePooling(vote=vote, center_features=True)
    res = oap(keys[None])[0]
    K, A = oap.prepare(keys[None])
    for lvl in ("instance", "semantic"):
        ms = res.level(lvl)
        got = vote_embeddings(ms.masks.reshape(len(ms), -1), A[0], K.F[0], oap.cfg.sigma, vote)
        torch.testing.assert_close(got, ms.features, atol=2e-5, rtol=1e-4)
    # another feature space: the same vote weights applied to X
    X = torch.randn(keys.shape[0] * keys.shape[1], 7)
    e = vote_embeddings(res.instance.masks.reshape(len(res.instance), -1), A[0], X, oap.cfg.sigma, vote)
    assert e.shape == (len(res.instance), 7)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(e)))
