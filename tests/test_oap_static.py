"""The static (fixed-shape, sync-free) OAP path: identical output to the compact path, fixed-round
connected components, no host synchronisation inside the layer loop, data-independent op sequence."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_oap import _keys, _layout
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from labelwise.pseudo.oap import static
from labelwise.pseudo.oap.graph import cc_fixed_rounds, cc_scipy
from labelwise.pseudo.oap.pooling import Keys, OnlineAgglomerativePooling, grid_edges


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is fastest (and immune to a busy machine); restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---------------------------------------------------------------------- helpers
def _by_mask(ms, key_layer):
    out = {}
    for k in range(len(ms)):
        m = frozenset(np.flatnonzero(ms.masks[k].reshape(-1).numpy()).tolist())
        key = (m, int(ms.layers[k])) if key_layer else m
        assert key not in out
        out[key] = (int(ms.layers[k]), int(ms.persistence[k]), int(ms.areas[k]), ms.scores[k], ms.features[k])
    return out


def _assert_same(a, b, dedup_all=False, atol=1e-5):
    """Same masks per image and level (as sets), same layers / persistence / areas, close scores and
    features. Order is not compared: copies of one mask (dedup='all') tie in score up to rounding."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for lvl in ("instance", "semantic"):
            p, q = _by_mask(x.level(lvl), dedup_all), _by_mask(y.level(lvl), dedup_all)
            assert p.keys() == q.keys(), lvl
            for k in p:
                assert p[k][:3] == q[k][:3]
                torch.testing.assert_close(p[k][3], q[k][3], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(p[k][4], q[k][4], atol=atol, rtol=0)


def _run_both(keys, **kw):
    """Static vs compact. The static path merges profiles as segment sums of member rows, like the
    compact path's ``profiles="segment"`` (features equal to 1e-5); the compact default may pick
    ``profiles="features"`` — the same profiles with other rounding, which the sharp Eq. 6 softmax
    (``vote="sum"``: logits |M_i| P / σ) amplifies: the two compact modes differ by up to ~1.2e-5
    in the features here, so that comparison gets 5e-5. After a fallback the static output IS the
    compact default's."""
    kw = {"static_pairs": 1 << 14, **kw}                                   # the default is GPU-sized
    stat = OnlineAgglomerativePooling(impl="static", **kw)
    b = stat(keys)
    assert stat.last_stats["impl"] == "static"
    fallback = stat.last_stats["static_fallback"]
    for profiles, atol in ((("auto", 0.0),) if fallback else (("segment", 1e-5), ("auto", 5e-5))):
        compact = OnlineAgglomerativePooling(impl="compact", **{"profiles": profiles, **kw})
        a = compact(keys)
        assert stat.last_stats["instance_nodes"] == compact.last_stats["instance_nodes"]
        assert stat.last_stats["semantic_nodes"] == compact.last_stats["semantic_nodes"]
        _assert_same(a, b, dedup_all=kw.get("dedup") == "all", atol=atol)
    return stat.last_stats


def _smooth(B, h, w, D=16, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(B, D, h, w, generator=g), k, 1, k // 2).permute(0, 2, 3, 1).contiguous()


def _synthetic():
    return torch.stack([_keys(_layout(), seed=1), _keys(_layout().flip(1), seed=2, noise=0.1),
                        _keys(_layout().transpose(0, 1), seed=3, noise=0.2)])


# ---------------------------------------------------------------------- static == compact
CONFIGS = [{}, {"vote": "mean"}, {"semantic_pooling": False}, {"min_area": 1, "dedup": "all"},
           {"vote": "mean", "min_area": 1, "dedup": "all", "reuse_votes": False},
           {"thresholds": (0.95, 0.9, 0.85, 0.8, 0.7), "min_area": 1, "dedup": "all", "static_pairs": 1 << 15}]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_static_equals_compact_synthetic(kw):
    stats = _run_both(_synthetic(), **kw)
    assert stats["static_fallback"] is False


@pytest.mark.parametrize("kw", CONFIGS[:4], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_static_equals_compact_smooth(kw):
    keys = _smooth(3, 20, 20)
    keys[1] = keys[1].flip(0) * 2 + 0.05 * torch.randn(20, 20, 16, generator=torch.Generator().manual_seed(9))
    keys[2] = _smooth(1, 20, 20, k=9, seed=4)[0]                          # 3 different images
    stats = _run_both(keys, **kw)
    assert stats["static_fallback"] is False
    assert stats["instance_nodes"][0] > 20                                # non-trivial hierarchy


def test_static_equals_compact_single_image_and_weights():
    keys = _smooth(1, 12, 18, k=3, seed=2)                               # non-square, B = 1
    assert _run_both(keys)["static_fallback"] is False
    assert _run_both(keys, w_s=0.0, w_f=1.0, thresholds=(0.9, 0.8))["static_fallback"] is False
    assert _run_both(keys, center_features=True, min_area=1)["static_fallback"] is False
    relu = torch.relu(_smooth(2, 12, 14, k=3, seed=6) - 0.05)              # mostly zeros: sparse affinity path
    assert float((relu == 0).float().mean()) > 0.5
    assert _run_both(relu, min_area=1)["static_fallback"] is False        # (zero keys: A_tt = 0)
    assert _run_both(relu, center_features=True)["static_fallback"] is False
    assert _run_both(_smooth(2, 1, 11, k=3, seed=7), min_area=1)["static_fallback"] is False   # a 1 x w grid


@pytest.mark.parametrize("knob,value,reason", [("static_capacity", 4, "capacity"), ("static_pairs", 3, "pairs")])
def test_overflow_falls_back_to_compact(knob, value, reason):
    stats = _run_both(_synthetic(), min_area=1, dedup="all", **{knob: value})
    assert stats["static_fallback"] is True and reason in stats["static_fallback_reason"]


def test_too_few_rounds_falls_back_and_literal_is_compact():
    keys = _smooth(2, 16, 16, k=7, seed=5)
    stats = _run_both(keys, cc_rounds=1, thresholds=(0.5, 0.3))
    assert stats["static_fallback"] is True and "cc_rounds" in stats["static_fallback_reason"]
    stats = _run_both(keys, edge_update="literal")
    assert stats["static_fallback"] is True and "literal" in stats["static_fallback_reason"]


def test_pool_static_capacity_boundary_and_records():
    keys = _synthetic()
    B, N = 3, 256
    oap = OnlineAgglomerativePooling(impl="static")
    K, A = oap.prepare(keys)
    inst, _, stats = static.pool_static(oap, K, A, 16, 16, capacity=N, pairs=1 << 14)
    assert stats["static_fallback"] is False and stats["tokens"] == B * N
    most = int((inst[0].size.view(B, N) > 0).sum(1).max())             # supernodes of the fullest image
    assert 10 < most < N
    inst, sem, stats = static.pool_static(oap, K, A, 16, 16, capacity=most, pairs=1 << 14)
    assert stats["static_fallback"] is False
    assert len(inst) == len(sem) == 5
    for r in inst + sem:
        assert r.size.shape == (B * most,) and r.assign.shape == (B * N,)
        assert torch.equal(r.node_img, torch.arange(B * most) // most)
        assert torch.equal(r.size, torch.bincount(r.assign, minlength=B * most).float())
        assert bool((r.assign // most == torch.arange(B * N) // N).all())   # nodes stay in their image
    _, _, stats = static.pool_static(oap, K, A, 16, 16, capacity=most - 1, pairs=1 << 14)
    assert stats["static_fallback"] is True and "capacity" in stats["static_fallback_reason"]


# ---------------------------------------------------------------------- fixed-round components
@pytest.mark.parametrize("n,e", [(1, 0), (50, 20), (200, 150), (500, 1000), (300, 5), (400, 390)])
def test_cc_fixed_rounds_random_graphs(n, e):
    g = torch.Generator().manual_seed(n + e)
    edges = torch.randint(0, n, (2, e), generator=g)
    active = torch.rand(e, generator=g) < 0.7
    lab, conv = cc_fixed_rounds(n, edges, active, rounds=12, jumps=4)
    assert conv.dim() == 0 and conv.dtype == torch.bool and bool(conv)
    assert torch.equal(lab, cc_scipy(n, edges[:, active]))
    lab, conv = cc_fixed_rounds(n, edges)                                 # defaults, all edges
    assert bool(conv) and torch.equal(lab, cc_scipy(n, edges))


def test_cc_fixed_rounds_grids_and_chains():
    ge = grid_edges(9, 13, batch=3)
    lab, conv = cc_fixed_rounds(3 * 117, ge, None, rounds=static.CC_ROUNDS, jumps=static.CC_JUMPS)
    assert bool(conv) and torch.equal(lab, torch.arange(3).repeat_interleave(117) * 117)
    mask = torch.rand(ge.shape[1], generator=torch.Generator().manual_seed(1)) < 0.6   # random grid subgraph
    lab, conv = cc_fixed_rounds(3 * 117, ge, mask, rounds=static.CC_ROUNDS, jumps=static.CC_JUMPS)
    assert bool(conv) and torch.equal(lab, cc_scipy(3 * 117, ge[:, mask]))
    n = 2000
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    chain = torch.stack([perm[:-1], perm[1:]])                           # randomly numbered long chain
    lab, conv = cc_fixed_rounds(n, chain, None, rounds=2, jumps=1)
    assert not bool(conv)                                                # too few rounds: flagged
    assert bool((lab <= torch.arange(n)).all())                          # still a valid partial merge
    lab, conv = cc_fixed_rounds(n, chain, None, rounds=20, jumps=4)
    assert bool(conv) and torch.equal(lab, torch.zeros(n, dtype=torch.long))
    lab, conv = cc_fixed_rounds(n, chain, torch.zeros(n - 1, dtype=torch.bool), rounds=1, jumps=1)
    assert bool(conv) and torch.equal(lab, torch.arange(n))              # no active edge


# ---------------------------------------------------------------------- no host syncs in the loop
FORBIDDEN = {"aten.nonzero.default", "aten.nonzero.out", "aten._local_scalar_dense.default", "aten.equal.default",
             "aten.is_nonzero.default", "aten.masked_select.default", "aten.bincount.default",
             "aten.repeat_interleave.Tensor", "aten.masked_scatter.default", "aten.masked_scatter_.default"}
FORBIDDEN_FUNCS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "unique",
                   "unique_consecutive", "nonzero", "equal", "is_nonzero"}


class SyncRecorder(TorchDispatchMode):
    """Records every aten op (name) and the ones that synchronise with the host on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops.append(name)
        if name in FORBIDDEN or "unique" in name:
            self.bad.append(name)
        if name.startswith(("aten.index.", "aten.index_put")):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx):
                self.bad.append(name + " (bool index)")
        if name.startswith(("aten._to_copy", "aten.to.", "aten.copy_")):
            src = args[1] if name.startswith("aten.copy_") else args[0]
            dst = args[0].device if name.startswith("aten.copy_") else kwargs.get("device")
            if dst is not None and isinstance(src, torch.Tensor) and torch.device(dst) != src.device:
                self.bad.append(f"{name} ({src.device} -> {dst})")
        return func(*args, **kwargs)


class FuncRecorder(TorchFunctionMode):
    """Python-level host reads (``.tolist()``, ``int(t)``, ``.cpu()``, ...) that never reach aten on CPU."""

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in FORBIDDEN_FUNCS:
            self.bad.append(name)
        if name == "to" and any(a == "cpu" or isinstance(a, torch.device) for a in list(args[1:]) + list((kwargs or {}).values())):
            self.bad.append("to(device)")
        return func(*args, **(kwargs or {}))


def _record_loop(keys, capacity=64, **kw):
    oap = OnlineAgglomerativePooling(impl="static", **kw)
    K, A = oap.prepare(keys)
    h, w = keys.shape[1:3]
    disp, fn = SyncRecorder(), FuncRecorder()
    with fn, disp:
        res = static.static_layers(oap, K, A, h, w, capacity=capacity, pairs=2048)
    return disp, fn, res


def test_no_host_sync_inside_layer_loop():
    disp, fn, res = _record_loop(_synthetic())
    assert not disp.bad and not fn.bad, (disp.bad, fn.bad)
    assert len(disp.ops) > 100 and any("nonzero_static" in o for o in disp.ops)
    assert all(f.dim() == 0 and f.dtype == torch.bool for f in res.flags.values())


def test_sync_detector_catches_a_host_read(monkeypatch):
    orig = static._merge

    def leaky(pool, om, size, *args, **kw):
        int(size.max())                                                  # a host sync someone might add
        return orig(pool, om, size, *args, **kw)

    monkeypatch.setattr(static, "_merge", leaky)
    disp, fn, _ = _record_loop(_synthetic())
    assert "aten._local_scalar_dense.default" in disp.bad and "__int__" in fn.bad
    monkeypatch.setattr(static, "_merge", orig)

    def boolmask(pool, om, size, *args, **kw):
        _ = size[size > 0]                                               # boolean-mask indexing
        return orig(pool, om, size, *args, **kw)

    monkeypatch.setattr(static, "_merge", boolmask)
    disp, _, _ = _record_loop(_synthetic())
    assert any("bool index" in b for b in disp.bad)


def test_op_sequence_does_not_depend_on_the_data():
    g = torch.Generator().manual_seed(11)
    flat = torch.ones(3, 16, 16, 8) + 1e-3 * torch.randn(3, 16, 16, 8, generator=g)   # ~1 supernode per image
    noisy = torch.randn(3, 16, 16, 8, generator=g)                                     # many supernodes
    d1, _, r1 = _record_loop(flat, capacity=256)
    d2, _, r2 = _record_loop(noisy, capacity=256)
    n1 = [int(n) for n in r1.inst_nodes]
    n2 = [int(n) for n in r2.inst_nodes]
    assert n1[0] <= 6 and n2[0] >= 150                                              # very different graphs
    assert len(d1.ops) == len(d2.ops) and d1.ops == d2.ops


def test_traces_on_fake_cuda_tensors():
    """The whole loop traced with fake CUDA tensors (no GPU needed): every tensor stays on the keys'
    device, no op needs data to know its output shape (fake tensors raise on ``nonzero``,
    ``.item()``, ...), and the op sequence is the CPU one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    oap = OnlineAgglomerativePooling(impl="static")
    seqs = {}
    for dev in ("cpu", "cuda"):
        with FakeTensorMode():
            try:
                Fk = F.normalize(torch.randn(2, 48, 8, device=dev), dim=-1)
            except (RuntimeError, AssertionError) as e:                         # a CPU-only torch build
                pytest.skip(f"no fake {dev} tensors: {e}")
            A = torch.bmm(Fk, Fk.transpose(1, 2))
            rec = SyncRecorder()
            with rec:
                res = static.static_layers(oap, Keys(F=Fk), A, 6, 8, capacity=32, pairs=256)
            assert not rec.bad
            outs = [res.flags[k] for k in res.flags] + res.inst_nodes + res.sem_nodes
            for r in res.inst + res.sem:
                outs += [r.assign, r.size, r.node_img, r.features, r.row_in, r.total, r.self_aff]
            assert all(t.device.type == dev for t in outs)
            assert res.inst[0].features.shape == (2 * 32, 8) and res.sem[0].assign.shape == (2 * 48,)
        seqs[dev] = [o for o in rec.ops if not o.startswith("prim.")]
    assert seqs["cpu"] == seqs["cuda"]


@pytest.mark.parametrize("n,p,size", [(0, 0.5, 4), (50, 0.0, 8), (50, 0.3, 8), (50, 0.3, 40), (1000, 0.9, 1000)])
def test_nonzero_static_scan_fallback_matches_torch(n, p, size):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n + size)) < p
    want = torch.nonzero_static(mask, size=size, fill_value=-1).squeeze(1)
    assert torch.equal(static._nonzero_static_scan(mask, size), want)
    assert torch.equal(static.nonzero_static(mask, size), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_static_loop_has_no_sync_and_equals_cpu():
    """On a real GPU: CUDA's own sync detector raises on any host synchronisation in the loop,
    and the static path on the GPU gives the CPU compact path's masks."""
    keys = torch.stack([_keys(_layout(), seed=s) for s in range(3)])
    oap = OnlineAgglomerativePooling(impl="static")
    K, A = oap.prepare(keys.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        static.static_layers(oap, K, A, 16, 16, capacity=64, pairs=2048)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gpu = oap(keys.cuda())
    cpu = OnlineAgglomerativePooling(impl="compact")(keys)
    for x, y in zip(gpu, cpu):
        for lvl in ("instance", "semantic"):
            got = {frozenset(np.flatnonzero(m.reshape(-1).numpy()).tolist()) for m in x.level(lvl).masks.cpu()}
            want = {frozenset(np.flatnonzero(m.reshape(-1).numpy()).tolist()) for m in y.level(lvl).masks}
            assert got == want
