"""OAP mechanism tests on synthetic feature maps (piecewise-constant + noise)."""

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from labelwise.pseudo.oap.graph import cc_scipy, cc_torch, connected_components
from labelwise.pseudo.oap.pooling import Keys, OnlineAgglomerativePooling, _Nodes, _Store, grid_edges


def _layout(h=16, w=16):
    lab = torch.zeros(h, w, dtype=torch.long)    # 0 = background
    lab[2:6, 2:6] = 1                            # two disjoint regions with the SAME feature
    lab[10:14, 10:15] = 1
    lab[2:8, 9:14] = 2
    lab[9:15, 1:5] = 3
    return lab


def _keys(lab, D=32, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(int(lab.max()) + 1, D, generator=g), dim=-1)
    return protos[lab] + noise * torch.randn(*lab.shape, D, generator=g)


def _regions(lab):
    """Connected regions of the layout as a set of frozensets of flat token ids."""
    out = set()
    for c in lab.unique().tolist():
        cc, n = scipy.ndimage.label((lab == c).numpy())
        for k in range(1, n + 1):
            out.add(frozenset(np.flatnonzero(cc == k).tolist()))
    return out


def _as_sets(masks):
    return {frozenset(np.flatnonzero(m.reshape(-1).numpy()).tolist()) for m in masks}


def test_instances_recover_connected_regions_and_semantics_merge_disjoint_ones():
    lab = _layout()
    res = OnlineAgglomerativePooling()(_keys(lab)[None])[0]
    inst = _as_sets(res.instance.masks)
    regions = _regions(lab)
    assert regions <= inst                                  # every connected region is an instance mask
    # no instance mask mixes two regions before they are fully recovered: all instance masks
    # at the first layer are exactly the regions
    first = _as_sets(res.instance.masks[res.instance.layers == 0])
    assert first == regions
    # each instance mask is one 4-connected component
    for m in res.instance.masks:
        assert scipy.ndimage.label(m.numpy())[1] == 1
    sem = _as_sets(res.semantic.masks)
    same_feature = frozenset(np.flatnonzero((lab == 1).reshape(-1).numpy()).tolist())
    assert same_feature in sem                               # two disjoint regions, one semantic mask
    assert same_feature not in inst
    assert res.instance.features.shape[1] == 32
    torch.testing.assert_close(res.instance.features.norm(dim=-1), torch.ones(len(res.instance)))


def _partitions(res_layers, masks, T):
    return [[m for m, t in zip(masks, res_layers) if t == layer] for layer in range(T)]


def test_thresholds_order_hierarchy_fine_to_coarse():
    g = torch.Generator().manual_seed(1)
    # smooth random features: a gradual hierarchy rather than clean regions
    x = torch.randn(1, 16, 24, 24, generator=g)
    x = F.avg_pool2d(x, 5, 1, 2).permute(0, 2, 3, 1)
    th = (0.95, 0.9, 0.85, 0.8, 0.7)
    oap = OnlineAgglomerativePooling(thresholds=th, min_area=1, dedup="all", semantic_pooling=False)
    res = oap(x)[0].instance
    parts = _partitions(res.layers.tolist(), list(res.masks), len(th))
    counts = [len(p) for p in parts]
    assert all(sum(int(m.sum()) for m in p) == 24 * 24 for p in parts)    # each layer tiles the grid
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    for fine, coarse in zip(parts, parts[1:]):                            # nested: finer refines coarser
        for m in fine:
            assert any(bool((m & ~c).sum() == 0) for c in coarse)
    # a single layer with a higher threshold gives a finer partition
    n_hi = len(OnlineAgglomerativePooling(thresholds=(0.9,), min_area=1, semantic_pooling=False)(x)[0].instance)
    n_lo = len(OnlineAgglomerativePooling(thresholds=(0.7,), min_area=1, semantic_pooling=False)(x)[0].instance)
    assert n_hi > n_lo


@pytest.mark.parametrize("n,e", [(1, 0), (50, 20), (200, 150), (500, 1000), (300, 5)])
def test_gpu_and_cpu_connected_components_agree(n, e):
    g = torch.Generator().manual_seed(n + e)
    edges = torch.randint(0, n, (2, e), generator=g)
    a, b = cc_torch(n, edges), cc_scipy(n, edges)
    assert torch.equal(a, b)
    assert torch.equal(connected_components(n, edges, "auto"), b)
    # labels are the minimum node id of each component and edges join equal labels
    assert bool((a <= torch.arange(n)).all())
    if e:
        assert torch.equal(a[edges[0]], a[edges[1]])


def test_cc_torch_long_chain_and_grid():
    n = 1000
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    chain = torch.stack([perm[:-1], perm[1:]])                           # worst case for propagation
    assert torch.equal(cc_torch(n, chain), torch.zeros(n, dtype=torch.long))
    ge = grid_edges(5, 7, batch=3)
    lab = cc_torch(3 * 35, ge)
    assert torch.equal(lab, torch.arange(3).repeat_interleave(35) * 35)   # images stay separate


def test_batch_equals_image_by_image():
    lab = _layout()
    keys = torch.stack([_keys(lab, seed=s) for s in range(3)] + [_keys(lab.flip(0), seed=7)])
    oap = OnlineAgglomerativePooling()
    batched = oap(keys)
    for b in range(keys.shape[0]):
        single = oap(keys[b:b + 1])[0]
        for lvl in ("instance", "semantic"):
            x, y = batched[b].level(lvl), single.level(lvl)
            assert torch.equal(x.masks, y.masks)
            assert torch.equal(x.layers, y.layers)
            torch.testing.assert_close(x.scores, y.scores, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.features, y.features, atol=1e-5, rtol=1e-5)


def test_pruned_similarity_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    x = F.avg_pool2d(torch.randn(2, 8, 12, 12, generator=g), 3, 1, 1).permute(0, 2, 3, 1)
    oap = OnlineAgglomerativePooling()
    Fk = F.normalize(x.reshape(2, 144, 8), dim=-1)
    A = Fk @ Fk.transpose(1, 2)
    P = A.reshape(288, 144)
    V = Fk.reshape(288, 8)
    e = grid_edges(12, 12, 2)
    zeros = torch.zeros(288)
    nodes = _Nodes(size=torch.ones(288), img=torch.arange(2).repeat_interleave(144), prow=torch.arange(288),
                   self_aff=zeros, row_in=zeros, total=zeros, Q=torch.zeros(288, 3),
                   qok=torch.zeros(288, dtype=torch.bool))
    for tau in (0.9, 0.8, 0.6):
        sf = (V[e[0]] * V[e[1]]).sum(-1)
        cache = torch.full((e.shape[1],), float("nan"))                 # S^s not known yet
        got = oap._identify(nodes, _Store(P, False, V), e[0], e[1], sf, cache, tau)
        ss = 1 - (P[e[0]] - P[e[1]]).abs().mean(-1)
        want = 0.6 * sf + 0.4 * ss > tau
        assert torch.equal(got, want)


def test_vote_sum_vs_mean_follow_eq6():
    g = torch.Generator().manual_seed(4)
    Fk = F.normalize(torch.randn(1, 10, 4, generator=g), dim=-1)
    A = (Fk @ Fk.transpose(1, 2))[0]
    member = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])                  # 3 supernodes
    M = F.one_hot(member).T.float()
    P = (M @ A) / M.sum(1, keepdim=True)
    size = M.sum(1)
    img = torch.zeros(3, dtype=torch.long)
    for vote, logits in (("sum", M @ A), ("mean", P)):
        oap = OnlineAgglomerativePooling(vote=vote, sigma=0.07)
        got = oap.vote(P, size, img, Keys(F=Fk))
        want = F.normalize(torch.softmax(logits / 0.07, -1) @ Fk[0], dim=-1)
        torch.testing.assert_close(got, want)


def test_edge_update_adjacent_vs_literal():
    # 1 x 4 chain: nodes 0-1-2-3; merge {1,2}
    e = grid_edges(1, 4)
    om = torch.tensor([0, 1, 1, 2])
    adj = OnlineAgglomerativePooling(edge_update="adjacent")._update_edges(e, om, 3, 4)
    lit = OnlineAgglomerativePooling(edge_update="literal")._update_edges(e, om, 3, 4)
    assert sorted(map(tuple, adj.T.tolist())) == [(0, 1), (1, 2)]
    assert sorted(map(tuple, lit.T.tolist())) == [(0, 1), (1, 2)]          # 0 and 3 were 3 hops apart
    # without merges, the literal reading links nodes two hops apart (0-2 via 1, 1-3 via 2)
    ident = torch.arange(4)
    lit2 = OnlineAgglomerativePooling(edge_update="literal")._update_edges(e, ident, 4, 4)
    adj2 = OnlineAgglomerativePooling(edge_update="adjacent")._update_edges(e, ident, 4, 4)
    assert sorted(map(tuple, lit2.T.tolist())) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    assert sorted(map(tuple, adj2.T.tolist())) == [(0, 1), (1, 2), (2, 3)]


def test_dedup_unique_counts_persistence_and_iou_dedup():
    lab = _layout()
    keys = _keys(lab)[None]
    uniq = OnlineAgglomerativePooling(dedup="unique")(keys)[0].instance
    allm = OnlineAgglomerativePooling(dedup="all")(keys)[0].instance
    assert len(allm) > len(uniq)
    assert len(_as_sets(uniq.masks)) == len(uniq)                          # no exact duplicates left
    assert _as_sets(allm.masks) == _as_sets(uniq.masks)
    assert int(uniq.persistence.sum()) == len(allm)                        # every copy counted once
    loose = OnlineAgglomerativePooling(nms_iou=0.5)(keys)[0].instance
    assert len(loose) <= len(uniq)


@pytest.mark.parametrize("score", ["contrast", "contrast_self", "persistence", "area", "contrast_persistence"])
def test_scores_rank_masks(score):
    res = OnlineAgglomerativePooling(score=score)(_keys(_layout())[None])[0].instance
    assert torch.equal(res.scores, res.scores.sort(descending=True).values)
    if score == "area":
        torch.testing.assert_close(res.scores, res.areas.float() / 256)


def test_cc_backends_give_identical_oap_output():
    keys = torch.stack([_keys(_layout(), seed=s) for s in range(2)])
    a = OnlineAgglomerativePooling(cc_backend="torch")(keys)
    b = OnlineAgglomerativePooling(cc_backend="scipy")(keys)
    for x, y in zip(a, b):
        assert torch.equal(x.instance.masks, y.instance.masks) and torch.equal(x.semantic.masks, y.semantic.masks)


def _assert_same_output(a, b):
    for x, y in zip(a, b):
        for lvl in ("instance", "semantic"):
            p, q = x.level(lvl), y.level(lvl)
            assert torch.equal(p.masks, q.masks)
            assert torch.equal(p.layers, q.layers)
            assert torch.equal(p.persistence, q.persistence) and torch.equal(p.areas, q.areas)
            torch.testing.assert_close(p.scores, q.scores, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(p.features, q.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vote", ["sum", "mean"])
def test_vote_reuse_equals_full_vote(vote, monkeypatch):
    g = torch.Generator().manual_seed(5)
    synthetic = torch.stack([_keys(_layout(), seed=1), _keys(_layout().flip(1), seed=2, noise=0.1)])
    smooth = F.avg_pool2d(torch.randn(2, 16, 20, 20, generator=g), 3, 1, 1).permute(0, 2, 3, 1)
    smooth[1] = smooth[1].flip(0) * 2 + 0.3 * torch.randn(20, 20, 16, generator=g)   # different content
    rnd = torch.randn(2, 12, 12, 8, generator=g)
    voted = []
    orig = OnlineAgglomerativePooling.vote

    def counting(self, P, *args):
        voted.append(P.shape[0])
        return orig(self, P, *args)

    monkeypatch.setattr(OnlineAgglomerativePooling, "vote", counting)
    for keys in (synthetic, smooth, rnd):
        for kw in ({}, {"min_area": 1, "dedup": "all"}):
            voted.clear()
            full = OnlineAgglomerativePooling(vote=vote, reuse_votes=False, **kw)(keys)
            n_full = sum(voted)
            voted.clear()
            reuse = OnlineAgglomerativePooling(vote=vote, **kw)(keys)
            assert sum(voted) < n_full                                     # fewer supernodes voted
            _assert_same_output(full, reuse)


def test_quiet_sparse_silences_only_torch_sparse_notices():
    """The sparse products run without torch's "beta" notices; any other warning still reaches the user."""
    import warnings

    from labelwise.pseudo.oap.graph import quiet_sparse, segment_rows

    P = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = segment_rows(P, torch.tensor([0, 2, 5]), torch.tensor([1, 0, 1]), 2)
    assert torch.allclose(out, torch.stack([P[2], P[0] + P[5]]))
    with pytest.warns(UserWarning, match="something else"), quiet_sparse():
        warnings.warn("something else", UserWarning)
