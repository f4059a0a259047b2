"""OAP's compact path recomputes only what a merge changed (profiles, score terms, votes, edge and
semantic ``S^f`` / ``S^s``) and prunes with exact bounds: here its every layer is checked against the
plain computation — literal Algorithm 1 partitions (``naive_oap``) and score terms / features from
dense membership matrices in float64 — on smooth and rough random inputs, batched, with edge cases."""


import bench_scripts
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_oap_exact import naive_oap
from test_oap_static import _one_thread, _run_both  # noqa: F401 (_one_thread: the module's autouse fixture)

from labelwise.pseudo.oap.graph import segment_rows, segment_sum
from labelwise.pseudo.oap.pooling import Keys, OAPConfig, OnlineAgglomerativePooling, _SfMatrix, gram, grid_edges


def _smooth(B, h, w, D=16, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(B, D, h, w, generator=g), k, 1, k // 2).permute(0, 2, 3, 1).contiguous()


def _rough(B, h, w, D=16, seed=0, noise=1.0):
    """Smooth content + Gaussian noise of ``noise`` x its RMS (0 dB at 1.0), like the bench's rough case."""
    x = _smooth(B, h, w, D, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    rms = (x - x.mean((1, 2), keepdim=True)).pow(2).mean((1, 2, 3), keepdim=True).sqrt()
    return x + noise * rms * torch.randn(x.shape, generator=g)


def _partition(ms, T):
    return [{frozenset(np.flatnonzero(m.reshape(-1).numpy()).tolist()) for m, t in zip(ms.masks, ms.layers) if t == k}
            for k in range(T)]


CASES = {
    "smooth": lambda s: _smooth(3, 10, 11, seed=s),
    "rough": lambda s: _rough(3, 10, 11, seed=s),
    "mixed": lambda s: torch.cat([_smooth(1, 10, 11, seed=s), _rough(1, 10, 11, seed=s, noise=3.0),
                                  _smooth(1, 10, 11, k=9, seed=s + 1)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kw", [{}, {"vote": "mean", "center_features": True},
                                {"thresholds": (0.9, 0.8, 0.7, 0.6), "w_f": 0.5, "w_s": 0.5},
                                {"block": 16, "chunk_elems": 1024}])          # upper-triangle blocks, small chunks
def test_every_layer_equals_literal_algorithm_1(case, seed, kw):
    keys = CASES[case](seed)
    base = dict(min_area=1, dedup="all", **kw)
    cfg = OAPConfig(**base)
    T = len(cfg.thresholds)
    for profiles in ("auto", "segment", "features"):
        res = OnlineAgglomerativePooling(profiles=profiles, **base)(keys)                 # batched
        for b in range(keys.shape[0]):
            want = naive_oap(keys[b], cfg)
            inst, sem = _partition(res[b].instance, T), _partition(res[b].semantic, T)
            for t in range(T):
                assert inst[t] == want[t][0], (case, profiles, b, t)
                assert sem[t] == want[t][1], (case, profiles, b, t)


def _dense_terms(keys, cfg, masks):
    """``row_in``, ``total``, ``self_aff`` and the Eq. 6 feature of each mask (``(K, N)`` bool), float64."""
    x = keys.reshape(-1, keys.shape[-1]).double()
    if cfg.center_features:
        x = x - x.mean(0, keepdim=True)
    Fk = F.normalize(x, dim=-1)
    A = Fk @ Fk.T
    M = masks.double()
    n = M.sum(1)
    P = (M @ A) / n[:, None]
    logits = M @ A if cfg.vote == "sum" else P
    feat = F.normalize(torch.softmax(logits / cfg.sigma, -1) @ Fk, dim=-1)
    return (P * M).sum(1), P.sum(1), (M * A.diagonal()).sum(1), feat


@pytest.mark.parametrize("make", [lambda: _smooth(2, 12, 12, seed=3), lambda: _rough(2, 12, 12, seed=4)],
                         ids=["smooth", "rough"])
@pytest.mark.parametrize("kw", [{}, {"vote": "mean", "center_features": True}, {"reuse_votes": False}])
def test_records_equal_the_dense_computation(make, kw):
    """Every layer's score terms (incremental: feature sums, segment sums of the diagonal) and the features
    of every node that finalise keeps (votes of merged nodes only; semantic votes after the loop) equal
    the plain dense formulas."""
    keys = make()
    oap = OnlineAgglomerativePooling(min_area=3, **kw)
    K, A = oap.prepare(keys)
    B, h, w, _ = keys.shape
    N = h * w
    inst, sem, _ = oap.pool_compact(K, A, h, w)
    for level, recs in (("instance", inst), ("semantic", sem)):
        for t, r in enumerate(recs):
            S = r.size.numel()
            assert torch.equal(r.size, torch.bincount(r.assign, minlength=S).to(r.size.dtype))
            for b in range(B):
                nodes = torch.nonzero(r.node_img == b).squeeze(1)
                masks = r.assign[b * N:(b + 1) * N][None, :] == nodes[:, None]
                row_in, total, self_aff, feat = _dense_terms(keys[b], oap.cfg, masks)
                torch.testing.assert_close(r.row_in[nodes].double(), row_in, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(r.total[nodes].double(), total, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(r.self_aff[nodes].double(), self_aff, atol=1e-5, rtol=1e-6)
                kept = r.size[nodes] >= oap.cfg.phi(N)
                if r.feat_nodes is None:
                    got = r.features[nodes[kept]]
                else:
                    lut = torch.full((S,), -1, dtype=torch.long)
                    lut[r.feat_nodes] = torch.arange(r.feat_nodes.numel())
                    assert bool((lut[nodes[kept]] >= 0).all()), (level, t)
                    got = r.features[lut[nodes[kept]]]
                torch.testing.assert_close(got.double(), feat[kept], atol=5e-5, rtol=0)


@pytest.mark.parametrize("keys", [
    torch.ones(2, 8, 9, 6),                                                      # all tokens identical
    torch.randn(2, 9, 9, 32, generator=torch.Generator().manual_seed(1)),        # pure noise: few merges
    torch.cat([torch.randn(1, 9, 9, 32, generator=torch.Generator().manual_seed(2)) * 5,
               _smooth(1, 9, 9, D=32, seed=2)]),                                 # one image without merges
], ids=["identical", "noise", "one-image-empty"])
def test_edge_cases_batched_equal_single_and_literal(keys):
    cfg = OAPConfig(min_area=1, dedup="all")
    T = len(cfg.thresholds)
    oap = OnlineAgglomerativePooling(min_area=1, dedup="all")
    batched = oap(keys)
    for b in range(keys.shape[0]):
        single = oap(keys[b:b + 1])[0]
        want = naive_oap(keys[b], cfg)
        for lvl, k in (("instance", 0), ("semantic", 1)):
            x, y = batched[b].level(lvl), single.level(lvl)
            assert torch.equal(x.masks, y.masks) and torch.equal(x.layers, y.layers)
            torch.testing.assert_close(x.scores, y.scores, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.features, y.features, atol=1e-5, rtol=1e-5)
            got = _partition(x, T)
            for t in range(T):
                assert got[t] == want[t][k], (lvl, b, t)


def test_the_incremental_paths_are_exercised(monkeypatch):
    """The cases above go through every branch: S^s read from the edge cache, block-sum pruning, the
    layer-0 bound ruling edges in, semantic S^f updated in place and compacted, no-merge shortcuts."""
    seen = set()
    cls = OnlineAgglomerativePooling
    orig_matrix, orig_first, orig_exact, orig_identify = (cls._semantic_matrix, cls._identify_first,
                                                          cls._exact_pairs, cls._identify)

    def matrix(self, nd, store, B, prev):
        out = orig_matrix(self, nd, store, B, prev)
        if prev is None:
            seen.add("semantic from scratch")
        elif prev[1] is None:
            seen.add("semantic unchanged")
        elif out.M is prev[0].M:
            seen.add("semantic in place")
        else:
            seen.add("semantic compacted")
        return out

    def first(self, A, h, w, sf, diag, u, v, tau, dim=None):
        c = self.cfg
        d2 = (diag[u] + diag[v] - 2.0 * sf).clamp(min=0.0) + 4.0 * (dim or 4096) * 1.2e-7 + 1e-6
        if bool((c.w_f * sf + c.w_s * (1.0 - d2.sqrt()) > tau + 1e-4).any()):
            seen.add("layer-0 bound rules in")
        return orig_first(self, A, h, w, sf, diag, u, v, tau, dim)

    def exact(self, nd, store, u, v, sf, tau):
        flag, ss = orig_exact(self, nd, store, u, v, sf, tau)
        if bool(torch.isnan(ss).any()):
            seen.add("block bound prunes")
        return flag, ss

    def identify(self, nd, store, u, v, sf, e_ss, tau):
        cand = 0.6 * sf + 0.4 > tau
        if bool((cand & ~torch.isnan(e_ss)).any()):
            seen.add("edge cache hit")
        return orig_identify(self, nd, store, u, v, sf, e_ss, tau)

    monkeypatch.setattr(cls, "_semantic_matrix", matrix)
    monkeypatch.setattr(cls, "_identify_first", first)
    monkeypatch.setattr(cls, "_exact_pairs", exact)
    monkeypatch.setattr(cls, "_identify", identify)
    for s in (0, 1):
        for case in CASES.values():
            OnlineAgglomerativePooling(min_area=1)(case(s))
    OnlineAgglomerativePooling(min_area=1, thresholds=(0.99, 0.98, 0.9, 0.8))(_rough(1, 16, 16, seed=3, noise=0.3))
    assert seen == {"semantic from scratch", "semantic unchanged", "semantic in place", "semantic compacted",
                    "layer-0 bound rules in", "block bound prunes", "edge cache hit"}, seen


def test_rough_batch_equals_the_static_path():
    """The static path recomputes everything on fixed slots: the compact path's incremental one agrees."""
    keys = torch.cat([_rough(2, 14, 14, seed=5), _smooth(1, 14, 14, seed=6)])
    assert _run_both(keys)["static_fallback"] is False
    assert _run_both(keys, min_area=1, dedup="all", vote="mean")["static_fallback"] is False


def test_pool_prepared_leaves_a_unchanged_and_equals_forward():
    keys = _rough(2, 10, 10, seed=7)
    oap = OnlineAgglomerativePooling()
    K, A = oap.prepare(keys)
    A0 = A.clone()
    a = oap.pool_prepared(K, A, 10, 10)
    assert torch.equal(A, A0)                                    # the profile store copied it
    b = oap(keys)                                                # forward lets the store take A over
    for x, y in zip(a, b):
        for lvl in ("instance", "semantic"):
            assert torch.equal(x.level(lvl).masks, y.level(lvl).masks)
            torch.testing.assert_close(x.level(lvl).scores, y.level(lvl).scores)


def test_gram_upper_and_symmetric_equal_the_product():
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64):
        Fk = F.normalize(torch.randn(2, 300, 20, generator=g, dtype=dtype), dim=-1)
        want = Fk @ Fk.transpose(1, 2)
        for block in (16, 64, 512):
            torch.testing.assert_close(gram(Keys(F=Fk), "symmetric", block), want)
            up = gram(Keys(F=Fk), "upper", block)
            torch.testing.assert_close(up.triu(), want.triu())


def test_segment_rows_equals_gathered_segment_sum():
    g = torch.Generator().manual_seed(9)
    P = torch.randn(40, 17, generator=g)
    rows = torch.randint(0, 40, (25,), generator=g)
    idx = torch.randint(0, 6, (25,), generator=g)
    w = torch.rand(25, generator=g)
    torch.testing.assert_close(segment_rows(P, rows, idx, 7, w), segment_sum(P[rows], idx, 7, weights=w))
    torch.testing.assert_close(segment_rows(P, rows, idx, 7), segment_sum(P[rows], idx, 7))


def test_semantic_pair_scan_reads_only_the_upper_triangle_of_live_places():
    """Brute force vs the row-maximum scan, with -inf on and below the diagonal and dead places (absorbed
    nodes) holding stale values."""
    g = torch.Generator().manual_seed(10)
    oap = OnlineAgglomerativePooling()
    B, P = 2, 45
    M = (torch.rand(B, P, P, generator=g) * 2 - 1).masked_fill_(torch.ones(P, P, dtype=torch.bool).tril(), float("-inf"))
    pos = torch.cat([torch.randperm(P, generator=g)[:30].sort().values, torch.randperm(P, generator=g)[:20].sort().values])
    img = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    G = _SfMatrix(M, img, pos)
    for tau in (0.95, 0.8, 0.5, 0.3):
        bi, pi, pj = oap._semantic_pairs(G, tau)
        got = set(zip(bi.tolist(), pi.tolist(), pj.tolist()))
        want = {(b, int(pos[i]), int(pos[j])) for i in range(50) for j in range(50)
                for b in [int(img[i])] if img[j] == b and pos[i] < pos[j]
                and 0.6 * float(M[b, pos[i], pos[j]]) + 0.4 > tau}
        assert got == want, tau


def test_first_layer_bounds_equal_brute_force():
    """Layer 0: ``S^s <= 1`` rules edges out, ``S^s >= 1 - |F_u - F_v|`` rules them in; the rest is exact."""
    g = torch.Generator().manual_seed(11)
    for case in (_smooth(2, 9, 10, D=8, seed=12), _rough(2, 9, 10, D=8, seed=13)):
        oap = OnlineAgglomerativePooling()
        K, A = oap.prepare(case)
        e = grid_edges(9, 10, 2)
        diag = torch.diagonal(A, dim1=1, dim2=2).reshape(-1)
        sf = oap._grid_feature(A, 9, 10)
        P = A.reshape(-1, 90)
        ss = 1 - (P[e[0]] - P[e[1]]).abs().sum(-1) / 90
        for tau in (0.95, 0.9, 0.8, 0.6, 0.3):
            got, cache = oap._identify_first(A, 9, 10, sf, diag, e[0], e[1], tau)
            assert torch.equal(got, 0.6 * sf + 0.4 * ss > tau), tau
            known = ~torch.isnan(cache)
            torch.testing.assert_close(cache[known], ss[known])
    assert g is not None


def test_layer_profile_script_reports_every_layer(tmp_path):
    """``bench/oap_layer_profile.py``'s timing and table on small random keys (no backbone)."""
    mod = bench_scripts.load("oap_layer_profile")
    oap = mod.build_oap(5 / 784)
    r = mod.profile_case(oap, _rough(2, 12, 12, D=24, seed=14), passes=1)
    assert r["calls"] == 2 and r["total_ms"]["median"] > 0 and len(r["instance_nodes"]) == 5
    md = mod.markdown({"rough 12x12": r}, 1)
    assert "| instance | votes |" in md and "| semantic | S^f |" in md and "layer 4" in md
    assert oap.profile is None                                   # profiling is switched off again


def test_speed_floor_script_layer0_and_table(tmp_path):
    """``bench/oap_speed_floor.py`` on small keys: layer-0 counts follow the content, and the table is written."""
    import json

    mod = bench_scripts.load("oap_speed_floor")
    olp = bench_scripts.load("oap_layer_profile")
    oap = olp.build_oap(5 / 784)
    halves = torch.zeros(1, 8, 8, 24)                               # two flat regions: edges inside are sure,
    halves[:, :, :4, 0], halves[:, :, 4:, 1] = 1.0, 1.0             # the ones between ruled out (S^f = -1)
    r = mod._layer0(oap, halves)
    assert r["supernodes"] == 2 and r["rows_needed"] == 0 and r["tokens"] == 64
    noisy = _rough(1, 8, 8, D=24, seed=15)
    r = mod._layer0(oap, noisy)
    assert r["supernodes"] > 1 and 0.0 <= r["undecided_frac"] <= 1.0
    cache = tmp_path / "keys.pt"
    torch.save({("smooth", 8): torch.relu(torch.randn(2, 8, 8, 24)), ("rough", 8): _rough(2, 8, 8, D=24, seed=16)},
               cache)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"maskcut": {"ms_per_image_8_t1": 50.0, "ms_per_image_rough_8_t1": 60.0}}))
    md, js = tmp_path / "floor.md", tmp_path / "floor.json"
    assert mod.main(["--bench-json", str(bench), "--keys-cache", str(cache), "--grids", "8", "--images", "2",
                     "--passes", "1", "--md", str(md), "--json", str(js)]) == 0
    res = json.loads(js.read_text())["results"]
    assert set(res) == {"smooth_8", "rough_8"}
    for row in res.values():
        assert row["floor_ms"] >= row["a_ms"] > 0
        assert row["best_ratio"] == pytest.approx(row["maskcut_ms"] / row["floor_ms"])
    assert "| smooth 8² | 50 |" in md.read_text()


def test_speed_floor_script_rejects_bad_input_in_one_line(tmp_path, capsys):
    mod = bench_scripts.load("oap_speed_floor")
    with pytest.raises(SystemExit) as e:
        mod.main(["--bench-json", str(tmp_path / "missing.json")])
    assert e.value.code == 2
    assert "--bench-json" in capsys.readouterr().err.strip().splitlines()[-1]
    ok = tmp_path / "bench.json"
    ok.write_text("{}")
    with pytest.raises(SystemExit):
        mod.main(["--bench-json", str(ok), "--grids", "a,b"])
    assert "--grids a,b" in capsys.readouterr().err.strip().splitlines()[-1]
