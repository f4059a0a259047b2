"""MaskCut / TokenCut baselines on synthetic feature maps with known regions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.pseudo.maskcut import MaskCut, MaskCutConfig
from labelwise.pseudo.ncut import bipartition, second_eigenvector
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
    # min area rule: with a 50% area floor nothing survives
    none = MaskCut(MaskCutConfig(min_area_frac=0.5))(keys[None])[0]
    assert len(none["masks"]) == 0


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
