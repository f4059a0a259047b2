"""OAP's image-border score rules (``oap.border``) and the real-photo bench script's report."""

import json

import bench_scripts
import numpy as np
import pytest
import torch
from PIL import Image

from labelwise.pseudo.common import resolve_pseudo_config
from labelwise.pseudo.oap.pooling import OAPConfig, OnlineAgglomerativePooling, border_ring, ring_excess

H = W = 8
D = 64


def _strip_and_object_keys() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An 8x8 grid: the top row shares one key (like a zero-padding artefact, little noise), a 3x3
    interior object shares another (more noise), every other token is a random direction."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(H, W, D, generator=g)
    strip = torch.zeros(H, W, dtype=torch.bool)
    strip[0] = True
    obj = torch.zeros(H, W, dtype=torch.bool)
    obj[3:6, 3:6] = True
    base_s, base_o = torch.randn(D, generator=g), torch.randn(D, generator=g)
    keys[strip] = base_s * 4 + 0.3 * torch.randn(int(strip.sum()), D, generator=g)
    keys[obj] = base_o * 4 + 1.5 * torch.randn(int(obj.sum()), D, generator=g)
    return keys[None], strip, obj


def _rank(masks: torch.Tensor, target: torch.Tensor) -> int:
    hit = torch.nonzero((masks == target).flatten(1).all(1)).flatten()
    assert hit.numel() == 1, "the constructed region should come out as one mask"
    return int(hit[0])


def test_border_prior_ranks_the_object_above_the_border_strip():
    keys, strip, obj = _strip_and_object_keys()
    before = OnlineAgglomerativePooling(OAPConfig(border="none"))(keys)[0].instance
    after = OnlineAgglomerativePooling(OAPConfig(border="prior"))(keys)[0].instance
    assert _rank(before.masks, strip) < _rank(before.masks, obj)      # the strip outranked the object
    assert _rank(after.masks, obj) < _rank(after.masks, strip)        # and no longer does
    assert torch.equal(before.masks.sum(0), after.masks.sum(0))       # masks unchanged, only their order


def test_border_prior_is_the_boundary_connectivity_weight():
    keys, _, _ = _strip_and_object_keys()
    before = OnlineAgglomerativePooling(OAPConfig(border="none"))(keys)[0].instance
    after = OnlineAgglomerativePooling(OAPConfig(border="prior"))(keys)[0].instance
    ring = border_ring(H, W)
    ref = {}
    for m, s in zip(before.masks, before.scores):
        bnd_con = (m & ring).sum().float() / m.sum().float().sqrt()
        ref[m.numpy().tobytes()] = float(s) * float(torch.exp(-0.5 * bnd_con ** 2))
    got = {m.numpy().tobytes(): float(s) for m, s in zip(after.masks, after.scores)}
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7)


def test_border_debias_matches_a_dense_reference():
    keys, _, _ = _strip_and_object_keys()
    oap = OnlineAgglomerativePooling(OAPConfig(border="debias", score="contrast"))
    res = oap(keys)[0].instance
    K, A = oap.prepare(keys)
    A = A[0].double()
    ring = border_ring(H, W).flatten()
    N = H * W
    off = ~torch.eye(N, dtype=torch.bool)
    delta = max(float(A[ring[:, None] & ring[None] & off].mean() - A[~ring[:, None] & ~ring[None] & off].mean()), 0)
    assert float(ring_excess(oap.prepare(keys)[1], H, W)[0]) == pytest.approx(delta, rel=1e-5)
    Ad = A - delta * (ring[:, None] & ring[None] & off).double()      # the padding excess taken out
    for m, s in zip(res.masks, res.scores):
        t = m.flatten()
        n = int(t.sum())
        inner = Ad[t][:, t]
        in_ = (inner.sum() - inner.diagonal().sum()) / (n * (n - 1))
        out = Ad[t][:, ~t].mean()
        assert float(s) == pytest.approx(float(in_ - out), abs=1e-5)


def test_pseudo_masks_default_and_switch():
    assert resolve_pseudo_config("oap").oap.border == "prior"
    assert resolve_pseudo_config("oap", ["oap.border=none"]).oap.border == "none"
    assert OAPConfig().border == "none"                                # OAP training keeps its scores


# --------------------------------------------------------------------------- bench/oap_real_photos.py
def _bench_module():
    return bench_scripts.load("oap_real_photos")


def test_bench_report_on_a_tiny_synthetic_image(tmp_path):
    bench = _bench_module()
    img = np.full((96, 128, 3), 40, np.uint8)
    img[24:72, 40:96] = (220, 180, 60)                                # a bright box on a dark ground
    Image.fromarray(img).save(tmp_path / "box.png")
    poly = [{"x": 40, "y": 24}, {"x": 96, "y": 24}, {"x": 96, "y": 72}, {"x": 40, "y": 72}]
    (tmp_path / "box.json").write_text(json.dumps({"polygons": [{"keypoints": poly}]}))
    out = tmp_path / "out"
    rc = bench.main(["--quokka-image", str(tmp_path / "box.png"), "--quokka-polygon", str(tmp_path / "box.json"),
                     "--skimage", "", "--generator", "oap=oap", "--generator", "oap-none=oap:oap.border=none",
                     "--resolution", "128", "--random-init", "--out-dir", str(out), "--name", "r"])
    assert rc == 0
    rep = json.loads((out / "r.json").read_text())
    assert rep["polygon_area_frac"] == pytest.approx((48 * 56) / (96 * 128), abs=0.01)
    for name in ("oap", "oap-none"):
        row = rep["quokka"][name]
        assert 0.0 <= row["top1_iou"] <= row["best_iou"] <= 1.0
        assert (row["best_rank"] is None) == (row["masks"] == 0)
    assert "| oap-none | `oap.border=none` |" in (out / "r.md").read_text()
    assert Image.open(out / "r.png").size[0] > 0


def test_bench_quokka_row_reference():
    from labelwise.masks import encode_masks

    bench = _bench_module()
    gt = np.zeros((10, 10), bool)
    gt[2:8, 2:8] = True
    masks = np.zeros((3, 10, 10), bool)
    masks[0, 0, :] = True                                             # a border strip, ranked first
    masks[1, 2:8, 2:6] = True                                         # IoU 24 / 36
    masks[2, 2:8, 2:8] = True                                         # the object itself
    recs = [{"segmentation": r, "score": s} for r, s in zip(encode_masks(masks), (0.9, 0.5, 0.4))]
    row = bench.quokka_row(bench.rank_records(recs), gt)
    assert row == {"masks": 3, "top1_iou": 0.0, "best_iou": 1.0, "best_rank": 3, "top1_score": 0.9}


def test_bench_missing_quokka_says_how_to_get_it(tmp_path, capsys):
    bench = _bench_module()
    rc = bench.main(["--quokka-image", str(tmp_path / "nope.jpg"), "--quokka-polygon", str(tmp_path / "nope.json"),
                     "--skimage", "", "--out-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "--quokka-image" in err and "pip download imgaug" in err and "\n" not in err


@pytest.mark.parametrize("h, w", [(1, 1), (1, 5), (2, 3), (3, 3), (5, 9), (14, 14)])
def test_ring_size_counts_the_border_ring_tokens(h, w):
    """The ring's size comes from the grid's shape (no device read-back) and equals the mask's count."""
    from labelwise.pseudo.oap.pooling import border_ring, ring_size

    assert ring_size(h, w) == int(border_ring(h, w).sum())
