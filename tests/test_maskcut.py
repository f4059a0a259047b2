"""MaskCut / TokenCut baselines on synthetic feature maps with known regions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labelwise.blocks.crf as crf_mod
import labelwise.pseudo.maskcut as mc
from labelwise.errors import LabelwiseError
from labelwise.pseudo.maskcut import MaskCut, MaskCutConfig
from labelwise.pseudo.ncut import binary_affinity, bipartition, second_eigenvector
from labelwise.pseudo.tokencut import TokenCut, TokenCutConfig, default_tau


def _scene(seed=0, h=20, w=20, D=32):
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[11:18, 10:19] = 1      # 63 tokens: the largest object
    lab[2:9, 2:9] = 2          # 49
    lab[2:8, 12:18] = 3        # 36
    protos = F.normalize(torch.randn(4, D, generator=g), dim=-1)
    return lab, protos[lab] + 0.1 * torch.randn(h, w, D, generator=g)


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_maskcut_finds_the_objects(solver):
    lab, keys = _scene()
    r = MaskCut(MaskCutConfig(solver=solver))(keys[None])[0]
    found = [set(lab[m].unique().tolist()) for m in r["masks"]]
    assert sorted(map(sorted, found)) == [[1], [2], [3]]              # each mask is one object, all found
    for m, f in zip(r["masks"], found):
        assert torch.equal(m, lab == f.pop())                         # exactly
    assert torch.equal(r["scores"], r["scores"].sort(descending=True).values)
    assert int(r["masks"].sum(0).max()) == 1                          # pairwise disjoint


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_tokencut_finds_one_dominant_object(solver):
    lab, keys = _scene(1)
    r = TokenCut(TokenCutConfig(solver=solver))(keys[None])[0]
    assert len(r["masks"]) == 1
    m = r["masks"][0]
    assert (lab[m] != 0).all()                                        # never the background
    assert torch.equal(m, lab == int(lab[m][0]))


def test_maskcut_round_limit_and_duplicate_rule():
    lab, keys = _scene(2)
    one = MaskCut(MaskCutConfig(rounds=1))(keys[None])[0]
    assert len(one["masks"]) == 1
    # min area rule from round 1 on: with a 50% area floor only round 0 survives (never checked)
    first = MaskCut(MaskCutConfig(min_area_frac=0.5, crf=False))(keys[None])[0]
    assert len(first["masks"]) == 1 and first["layers"].tolist() == [0]
    assert torch.equal(first["masks"][0], one["masks"][0])


def test_dense_and_lanczos_eigenvectors_agree():
    g = np.random.default_rng(0)
    x = g.normal(size=(100, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    A = np.where(x @ x.T > 0.2, 1.0, 1e-5)
    a, b = second_eigenvector(A, "dense"), second_eigenvector(A, "lanczos")
    cos = abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.999


def test_corner_rule_flips_background():
    # foreground (v > mean) covers 3 corners -> flipped even though the seed is inside
    v = np.ones((6, 6))
    v[2:4, 2:4] = -5.0
    v[5, 5] = -1.0
    part, _ = bipartition(v.reshape(-1), (6, 6), corner_rule=True)
    assert not part[0, 0] and part[2, 2]
    part2, _ = bipartition(v.reshape(-1), (6, 6), corner_rule=False)   # TokenCut: seed rule only
    assert part2[2, 2] == (np.abs(v).argmax() in (14, 15, 20, 21))


def test_per_backbone_tau_defaults():
    assert default_tau("maskcut", "dino_vitb8") == 0.15
    assert default_tau("tokencut", "dino_vits8") == 0.2
    assert default_tau("maskcut", "efficientnet_lite0") != 0.15


def test_postprocess_crf_then_fill_holes():
    from labelwise.blocks.crf import crf_available

    if not crf_available():
        pytest.skip("pydensecrf2 not installed")
    img = np.full((40, 40, 3), 20, np.uint8)
    img[10:30, 10:30] = 230                                          # a bright square
    good = np.zeros((40, 40), bool)
    good[11:29, 11:29] = True
    good[18:21, 18:21] = False                                       # a hole
    bad = np.zeros((40, 40), bool)
    bad[0:6, 0:6] = True                                             # disagrees with the image
    bad[10:30, 10:12] = True
    masks = np.stack([good, bad])
    keep = MaskCut(MaskCutConfig(crf=True)).postprocess(img, masks)
    assert keep[0] and masks[0][18:21, 18:21].all()                   # hole filled, mask kept
    assert masks[0].sum() > good.sum()
    no_crf = np.stack([good.copy()])
    MaskCut(MaskCutConfig(crf=False)).postprocess(img, no_crf)
    assert no_crf[0][18:21, 18:21].all()


# --------------------------------------------------------------------------- released round rules
H = W = 10                                                             # 100 tokens: 1 token = 1%


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


def _scripted(monkeypatch, masks):
    """Round r of MaskCut finds ``masks[r]`` (the eigen step is stubbed); returns the list of
    features each round's affinity saw and the keys to run on."""
    seen, it = [], iter(masks)

    def affinity(f, tau, eps):
        seen.append(f.copy())
        return np.eye(len(f))

    monkeypatch.setattr(mc, "binary_affinity", affinity)
    monkeypatch.setattr(mc, "second_eigenvector", lambda A, solver: np.arange(len(A), dtype=np.float64))
    monkeypatch.setattr(mc, "seed_component", lambda part, seed: next(it).copy())
    keys = torch.randn(1, H, W, 8, generator=torch.Generator().manual_seed(0))
    return seen, keys


def _run(keys, rounds=3):
    r = MaskCut(MaskCutConfig(rounds=rounds, crf=False))(keys)[0]
    return r["masks"].numpy(), r["layers"].tolist()


def _zero_rows(f):
    return ~f.any(1).reshape(H, W)


def test_maskcut_paints_only_accepted_masks(monkeypatch):
    a, tiny, b = _box(0, 4, 0, 5), _box(9, 10, 9, 10), _box(5, 9, 5, 9)
    seen, keys = _scripted(monkeypatch, [a, tiny, b, _box(0, 1, 9, 10)])
    _, layers = _run(keys, rounds=4)
    assert layers == [0, 2]                                           # round 1 (1%) and round 3 (1%) rejected
    assert not _zero_rows(seen[0]).any()
    assert np.array_equal(_zero_rows(seen[1]), a)
    assert np.array_equal(_zero_rows(seen[2]), a)                     # the rejected tiny mask is not painted
    assert np.array_equal(_zero_rows(seen[3]), a | b)
    assert seen[0].dtype == np.float32


def test_maskcut_round0_kept_whatever_its_area(monkeypatch):
    tiny0, b, tiny2 = _box(0, 1, 0, 1), _box(4, 9, 4, 9), _box(0, 1, 9, 10)
    _, keys = _scripted(monkeypatch, [tiny0, b, tiny2])
    masks, layers = _run(keys)
    assert layers == [0, 1]
    assert np.array_equal(masks[0], tiny0) and np.array_equal(masks[1], b)


@pytest.mark.parametrize("case", ["previous_differs", "previous_rejected", "previous_close"])
def test_maskcut_iou_only_against_previous_round(monkeypatch, case):
    a = _box(0, 4, 0, 5)                                              # 20 tokens
    a2 = _box(0, 5, 0, 5)                                             # IoU(a, a2) = 20/25 = 0.8
    b = _box(6, 10, 5, 10)                                            # disjoint from both
    if case == "previous_differs":                                    # round 2 ~ round 0, round 1 elsewhere
        script, want = [a, b, a2], [0, 1, 2]
    elif case == "previous_rejected":                                 # round 1 too small -> current = zeros
        script, want = [a, _box(9, 10, 0, 1), a2], [0, 2]
    else:                                                             # round 1 ~ round 0 -> rejected
        script, want = [a, a2, b], [0, 2]
    _, keys = _scripted(monkeypatch, script)
    masks, layers = _run(keys)
    assert layers == want
    if case == "previous_differs":
        assert np.array_equal(masks[2], a2 & ~a)                      # kept, minus the earlier masks


def test_maskcut_iou_uses_mask_before_overlap_removal(monkeypatch):
    a, m1 = _box(0, 4, 0, 5), _box(2, 8, 0, 5)                        # IoU 10/40: accepted, emitted rows 4-7
    m2 = _box(1, 7, 0, 6)                                             # IoU(m1, m2) = 25/41; vs m1 - a: 15/41
    seen, keys = _scripted(monkeypatch, [a, m1, m2])
    masks, layers = _run(keys)
    assert layers == [0, 1]                                           # m2 rejected against m1 as found
    assert np.array_equal(masks[1], m1 & ~a)
    assert np.array_equal(_zero_rows(seen[2]), a | m1)


def test_maskcut_overlap_removal(monkeypatch):
    a, b, c = _box(0, 5, 0, 5), _box(3, 8, 3, 8), _box(4, 10, 0, 10)
    inside = _box(1, 3, 1, 4)                                         # accepted (IoU 6/25) but covered by a
    _, keys = _scripted(monkeypatch, [a, b, c])
    masks, layers = _run(keys)
    assert layers == [0, 1, 2]
    want = [a, b & ~a, c & ~(a | b)]
    assert all(np.array_equal(m, w) for m, w in zip(masks, want))
    assert masks.sum(0).max() == 1                                    # pairwise disjoint
    _, keys = _scripted(monkeypatch, [a, inside, c])
    masks, layers = _run(keys)
    assert layers == [0, 2]                                           # round 1 emptied by the removal
    assert np.array_equal(masks[1], c & ~a)


def test_affinity_similarity_in_float32():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
    s32 = (f @ f.T).numpy().astype(np.float64)
    s64 = f.numpy().astype(np.float64) @ f.numpy().astype(np.float64).T
    i, j = np.unravel_index(np.argmax(np.where(np.eye(64, dtype=bool), -1, s64 - s32)), s64.shape)
    assert s64[i, j] > s32[i, j]                                      # a pair where the precisions disagree
    tau = float(s32[i, j])                                            # float32 cosine == tau: not above
    A = binary_affinity(f.numpy(), tau)
    assert A.dtype == np.float64 and A[i, j] == 1e-5
    assert np.array_equal(A, np.where(s32 > tau, 1.0, 1e-5))
    assert np.array_equal(binary_affinity(f.numpy().astype(np.float64), tau), A)
    keys = torch.randn(2, 4, 4, 8, generator=g)
    assert TokenCut()._prep(keys).dtype == np.float32


def test_maskcut_crf_default_follows_the_package(monkeypatch):
    from labelwise.pseudo.common import build_method, resolve_pseudo_config

    if not crf_mod.crf_available():
        pytest.skip("pydensecrf2 not installed")
    assert MaskCut(MaskCutConfig()).crf is True                      # on when installed, as released
    assert MaskCut(MaskCutConfig(crf=False)).crf is False
    assert build_method("maskcut", resolve_pseudo_config("maskcut", ["maskcut.crf=false"])).impl.crf is False
    assert build_method("maskcut", resolve_pseudo_config("maskcut")).impl.crf is True
    monkeypatch.setattr(crf_mod, "crf_available", lambda: False)
    assert MaskCut(MaskCutConfig()).crf is False
    with pytest.raises(LabelwiseError) as e:
        MaskCut(MaskCutConfig(crf=True))
    msg = str(e.value)
    assert "\n" not in msg and "maskcut.crf" in msg and "pip install pydensecrf2" in msg


def test_maskcut_crf_off_never_calls_the_crf(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("dense_crf called with the CRF off")

    monkeypatch.setattr(crf_mod, "dense_crf", boom)
    m = _box(2, 8, 2, 8)
    m[4:6, 4:6] = False
    masks = m[None].copy()
    keep = MaskCut(MaskCutConfig(crf=False)).postprocess(np.zeros((H, W, 3), np.uint8), masks)
    assert keep.all() and np.array_equal(masks[0], _box(2, 8, 2, 8))


def test_maskcut_crf_unary_is_the_released_softmax(monkeypatch):
    seen = {}

    def fake(image, probs, **kw):
        seen.update(probs=probs, **kw)
        return np.stack([1.0 - probs[1], probs[1]])                   # identity refinement

    monkeypatch.setattr(crf_mod, "crf_available", lambda: True)
    monkeypatch.setattr(crf_mod, "dense_crf", fake)
    m = _box(2, 8, 2, 8)
    masks = m[None].copy()
    keep = MaskCut(MaskCutConfig(crf=True)).postprocess(np.zeros((H, W, 3), np.uint8), masks)
    e = np.exp(1.0)
    assert np.allclose(seen["probs"][1][m], e / (1 + e)) and np.allclose(seen["probs"][1][~m], 1 / (1 + e))
    assert np.allclose(seen["probs"].sum(0), 1.0)
    assert (seen["iters"], seen["pos_xy"], seen["pos_w"], seen["bi_xy"], seen["bi_rgb"], seen["bi_w"]) == \
        (10, 3.0, 7.0, 50.0, 5.0, 10.0)
    assert keep.all() and np.array_equal(masks[0], m)


def test_maskcut_says_when_it_runs_without_the_release_crf(monkeypatch):
    """crf=None follows what is installed; without pydensecrf2 it warns in one line instead of
    dropping the release's CRF silently; crf=true stops, crf=false is quiet."""
    import warnings

    import labelwise.blocks.crf as crf
    from labelwise.errors import LabelwiseError
    from labelwise.pseudo.maskcut import _resolve_crf

    monkeypatch.setattr(crf, "crf_available", lambda: False)
    with pytest.warns(UserWarning, match="pydensecrf2 is not installed"):
        assert _resolve_crf(None) is False
    with pytest.raises(LabelwiseError, match="maskcut.crf=true needs pydensecrf2"):
        _resolve_crf(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve_crf(False) is False
