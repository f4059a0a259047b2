"""Dense CRF (labelwise.blocks.crf) and its benchmark (labelwise.benchmarks.crf)."""

import argparse
import sys

import numpy as np
import pytest
import torch

from labelwise.blocks import crf as crf_mod
from labelwise.errors import LabelwiseError


def _edge_image(h=40, w=64, edge=32):
    img = np.full((h, w, 3), 30, np.uint8)
    img[:, edge:] = (220, 200, 40)
    return img


def _blurry_probs(h=40, w=64, centre=26, width=6.0):
    x = np.arange(w, dtype=np.float32)
    p1 = 1.0 / (1.0 + np.exp(-(x - centre) / width))
    return np.stack([1 - p1, p1])[:, None, :].repeat(h, axis=1).astype(np.float32)


def test_missing_backend_raises_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    assert not crf_mod.crf_available()
    with pytest.raises(LabelwiseError) as e:
        crf_mod.dense_crf(_edge_image(), _blurry_probs())
    assert str(e.value) == "dense CRF needs pydensecrf2: pip install 'labelwise[crf]'"


def test_label_unary_values():
    lab = np.array([[0, 2], [255, 1]])
    u = crf_mod.label_unary(lab, 3, gt_prob=0.7)
    p = np.exp(-u)
    assert np.allclose(p[:, 0, 0], [0.7, 0.15, 0.15]) and np.allclose(p[:, 0, 1], [0.15, 0.15, 0.7])
    assert np.allclose(p[:, 1, 0], 1 / 3)  # ignore -> uniform
    with pytest.raises(ValueError):
        crf_mod.label_unary(np.array([[5]]), 3)


needs_crf = pytest.mark.skipif(not crf_mod.crf_available(), reason="pydensecrf2 not installed")


@needs_crf
def test_dense_crf_sharpens_blurry_map_along_image_edge():
    img, probs = _edge_image(), _blurry_probs()
    before = probs.argmax(0)
    q = crf_mod.dense_crf(img, torch.from_numpy(probs))  # torch input accepted
    assert q.shape == probs.shape and np.allclose(q.sum(0), 1, atol=1e-4)
    after = q.argmax(0)
    truth = np.zeros_like(after)
    truth[:, 32:] = 1
    assert (before != truth).mean() > 0.05  # the blurry map's boundary is off the edge ...
    assert (after == truth).mean() > 0.99  # ... the CRF moves it onto the image edge
    ent = lambda p: -(p * np.log(np.clip(p, 1e-8, 1))).sum(0).mean()  # noqa: E731
    assert ent(q) < 0.5 * ent(probs)  # and sharpens it
    # without pairwise terms the CRF keeps the unary decision
    q0 = crf_mod.dense_crf(img, probs, pos_w=0, bi_w=0)
    assert np.array_equal(q0.argmax(0), before)


@needs_crf
def test_crf_refine_label_snaps_to_edge_and_fills_ignore():
    img = _edge_image()
    lab = np.zeros(img.shape[:2], np.uint8)
    lab[:, 27:] = 1  # boundary 5 px off the image edge
    lab[:, 44:52] = 255  # a band of unknown pixels inside the right region
    out = crf_mod.crf_refine_label(img, lab, num_classes=2, gt_prob=0.7)
    assert out.dtype == np.uint8 and out.shape == lab.shape
    truth = np.zeros_like(out)
    truth[:, 32:] = 1
    assert (out == truth).mean() > 0.99
    with pytest.raises(ValueError):
        crf_mod.crf_refine_label(img[:10], lab, 2)


@needs_crf
def test_crf_benchmark_contract():
    from labelwise.benchmarks import crf as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sizes", "48", "--repeats", "1", "--classes", "5"])
    res = bench.run(args)
    assert set(res) == {"dense_crf@48x48", "label_crf@48x48"}
    for v in res.values():
        assert v["ms_per_image"] > 0 and v["pixel_acc_after"] >= v["pixel_acc_before"]
    with pytest.raises(LabelwiseError):
        bench.run(argparse.Namespace(sizes="a,b"))
