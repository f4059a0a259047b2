"""Semantic, parts and unsupervised metrics against hand-computed values; Hungarian matching."""

import math

import numpy as np
import pytest
import torch

from labelwise.blocks.matching import hungarian_match, hungarian_match_batch
from labelwise.errors import LabelwiseError
from labelwise.evaluation import PartsMetric, SemanticMetric, UnsupervisedMetric, jsonable

GT = np.array([[0, 0, 1, 1], [2, 2, 1, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 2], [2, 2, 255, 1]], dtype=np.uint8)


def test_semantic_hand_computed():
    m = SemanticMetric(3, ["bg", "a", "b"])
    m.update(PRED, GT)
    r = m.compute()
    # per class (TP, FP, FN): bg (1, 0, 1), a (1, 1, 2), b (2, 1, 0)
    assert r["per_class_iou"] == pytest.approx({"bg": 1 / 2, "a": 1 / 4, "b": 2 / 3})
    assert r["miou"] == pytest.approx(17 / 36)
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    assert r["mean_acc"] == pytest.approx(11 / 18)
    assert r["precision"] == pytest.approx(13 / 18)
    assert r["recall"] == pytest.approx(11 / 18)
    assert r["confusion_ratio"] == pytest.approx(2 / 3)  # FP (1 + 1) / TP (1 + 2) over foreground
    assert r["per_class_confusion_ratio"] == pytest.approx({"a": 1.0, "b": 0.5})
    assert "bg" in m.table(r) and "0.4722" in m.table(r)


def test_semantic_perfect_and_all_background():
    m = SemanticMetric(3)
    m.update(torch.from_numpy(GT), torch.from_numpy(GT))
    assert m.compute()["miou"] == 1.0 and m.compute()["confusion_ratio"] == 0.0
    m.reset()
    m.update(np.zeros_like(GT), GT)
    r = m.compute()
    # bg: TP 2, FP 5 -> 2/7; a, b: IoU 0
    assert r["miou"] == pytest.approx(2 / 21)
    assert r["pixel_acc"] == pytest.approx(2 / 7)
    assert r["precision"] == pytest.approx(2 / 21)  # never-predicted classes score precision 0
    assert math.isnan(r["confusion_ratio"])  # no foreground TP and no foreground FP


def test_semantic_absent_class_excluded_batched_and_logits():
    m = SemanticMetric(4)  # class 3 is absent from both
    batch_p, batch_g = np.stack([PRED, PRED]), np.stack([GT, GT])
    m.update(batch_p, batch_g)
    r = m.compute()
    assert math.isnan(r["per_class_iou"]["3"]) and r["miou"] == pytest.approx(17 / 36)
    assert jsonable(r)["per_class_iou"]["3"] is None
    # scores (B x C x H x W) are argmaxed
    logits = torch.nn.functional.one_hot(torch.from_numpy(np.where(PRED == 255, 0, PRED)).long(), 4)
    m2 = SemanticMetric(4)
    m2.update(logits.permute(2, 0, 1)[None].float(), GT[None])
    assert m2.confusion.sum() == 7


def test_semantic_rejects_out_of_range():
    m = SemanticMetric(3)
    with pytest.raises(LabelwiseError, match="value 7"):
        m.update(np.full((2, 2), 7, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(LabelwiseError, match="does not match"):
        m.update(np.zeros((2, 3), np.uint8), np.zeros((2, 2), np.uint8))


def test_parts_hand_computed():
    m = PartsMetric(["bg", "head", "body", "wheel"], ["bg", "animal", "car"], [0, 1, 1, 2])
    m.update(np.array([[1, 1], [3, 3]]), np.array([[1, 2], [3, 0]]),
             np.array([[1, 2], [2, 0]]), np.array([[1, 1], [2, 0]]))
    r = m.compute()
    assert r["per_part_iou"] == pytest.approx({"bg": 0.0, "head": 0.5, "body": 0.0, "wheel": 0.5})
    assert r["part_miou"] == pytest.approx(0.25)
    assert r["object_miou"] == pytest.approx(2 / 3)
    assert r["part_mavg"] == pytest.approx((0.25 + 0.5) / 2)
    assert r["consistency"] == pytest.approx(0.5)
    # body (gt) -> head (pred) is a sibling confusion; head and wheel keep their own pixels
    assert r["per_part_sibling_confusion"] == pytest.approx({"head": 0.0, "body": 1.0, "wheel": 0.0})
    assert r["sibling_confusion"] == pytest.approx(1 / 3)
    assert r["part_confusion"][2] == [0, 1, 0, 0, 0] and sum(map(sum, r["part_confusion"])) == 4


def test_unsupervised_more_clusters_than_classes():
    gt = np.array([0, 0, 0, 1, 1, 1, 2, 2])[None]
    pred = np.array([3, 3, 4, 0, 0, 2, 1, 1])[None]
    for k in (5, None):  # fixed or inferred number of clusters
        m = UnsupervisedMetric(k, 3)
        m.update(pred, gt)
        r = m.compute()
        assert r["assignment"] == [1, 2, -1, 0, -1]
        assert r["per_class_iou"] == pytest.approx({"0": 2 / 3, "1": 2 / 3, "2": 1.0})
        assert r["miou"] == pytest.approx(7 / 9)
        assert r["pixel_acc"] == pytest.approx(6 / 8)  # unmatched clusters 2 and 4 count as wrong
    m = UnsupervisedMetric(3, 3)
    with pytest.raises(LabelwiseError):
        m.update(pred, gt)


def test_hungarian_rectangular_and_torch():
    cost = np.array([[4.0, 1.0], [2.0, 0.0], [1.5, 5.0]])  # 3 rows, 2 cols
    r, c = hungarian_match(cost)
    assert list(zip(r.tolist(), c.tolist())) == [(1, 1), (2, 0)]  # 0 + 1.5 is the minimum
    r, c = hungarian_match(torch.tensor(cost), maximize=True)
    assert isinstance(r, torch.Tensor) and sorted(zip(r.tolist(), c.tolist())) == [(0, 0), (2, 1)]  # 4 + 5
    out = hungarian_match_batch([cost.T, np.zeros((0, 3))])
    assert list(zip(*[x.tolist() for x in out[0]])) == [(0, 2), (1, 1)] and len(out[1][0]) == 0
