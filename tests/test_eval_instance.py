"""Instance (COCOeval) and panoptic metrics: pycocotools agreement and hand-computed PQ."""

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from labelwise.errors import LabelwiseError
from labelwise.evaluation import InstanceEvaluator, PanopticMetric
from labelwise.evaluation.panoptic import id2rgb, paint_instances, rgb2id
from labelwise.masks import encode_mask


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _gt():
    h, w = 20, 24
    masks = {1: [(1, _box(h, w, 0, 8, 0, 8)), (2, _box(h, w, 10, 18, 2, 12))],
             2: [(1, _box(h, w, 3, 9, 12, 20)), (3, _box(h, w, 0, 20, 0, 24))]}
    images, anns = [], []
    for iid, items in masks.items():
        images.append({"id": iid, "file_name": f"sub/img{iid}.jpg", "height": h, "width": w})
        for cat, m in items:
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat, "iscrowd": 0,
                         "segmentation": encode_mask(m), "area": float(m.sum()),
                         "bbox": [0, 0, 1, 1]})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "sky", "isthing": 0}]
    return {"images": images, "annotations": anns, "categories": cats}, masks


def _preds(masks):
    preds = []
    for iid, items in masks.items():
        for k, (cat, m) in enumerate(items):
            if cat == 3:
                continue
            wrong = 2 if cat == 1 else 1  # right masks, swapped categories
            preds.append({"image_id": iid, "category_id": wrong, "segmentation": encode_mask(m), "score": 0.9})
    # one poor extra detection
    preds.append({"image_id": 1, "category_id": 1, "segmentation": encode_mask(_box(20, 24, 0, 4, 0, 4)),
                  "score": 0.3})
    return preds


def _cocoeval(gt, preds, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        d = g.loadRes(copy.deepcopy(preds))
        ev = COCOeval(g, d, iou_type)
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return ev.stats


def test_class_aware_equals_pycocotools():
    gt, masks = _gt()
    preds = _preds(masks)
    ev = InstanceEvaluator(gt, class_aware=True)
    ev.update(preds)
    r = ev.compute()
    segm, bbox = _cocoeval(gt, preds, "segm"), _cocoeval(gt, preds, "bbox")
    assert [r["ap"], r["ap50"], r["ap75"], r["ar100"]] == pytest.approx([segm[0], segm[1], segm[2], segm[8]])
    assert [r["box_ap"], r["box_ap50"]] == pytest.approx([bbox[0], bbox[1]])
    assert r["ap"] < 0.5  # categories are swapped


def test_class_agnostic_collapses_and_drops_stuff_and_matches_file_names():
    gt, masks = _gt()
    preds = _preds(masks)
    ev = InstanceEvaluator(gt)
    ev.update(preds)
    r = ev.compute()
    # every thing mask is found (categories ignored), stuff GT excluded -> perfect AP and recall
    assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0) and r["ar100"] == pytest.approx(1.0)
    # same result when images are named by file name only (relative path or base name)
    by_name = []
    for p in preds:
        q = {k: v for k, v in p.items() if k != "image_id"}
        q["file_name"] = f"sub/img{p['image_id']}.jpg" if p["image_id"] == 1 else f"img{p['image_id']}.jpg"
        by_name.append(q)
    ev2 = InstanceEvaluator(gt)
    ev2.update(by_name)
    assert ev2.compute()["ap"] == pytest.approx(r["ap"])
    ev3 = InstanceEvaluator(gt)
    ev3.update([dict(by_name[0], file_name="nope.jpg")])
    with pytest.raises(LabelwiseError, match="nope.jpg"):
        ev3.compute()


def test_panoptic_hand_computed():
    cats = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]
    m = PanopticMetric(cats)
    # image 1 (4 x 4): GT seg 1 (thing) = top-left 2x2, seg 2 (stuff) = bottom half, top-right 2x2 VOID.
    g = np.zeros((4, 4), int)
    g[:2, :2] = 1
    g[2:] = 2
    p = np.zeros((4, 4), int)
    p[0, :2] = 5; p[1, 0] = 5; p[0, 2] = 5      # 3 px of seg 1 + 1 void px -> IoU 3 / (4 + 4 - 3 - 1) = 0.75
    p[2:] = 7; p[1, 1] = 7                      # bottom half + 1 px -> IoU 8 / 9
    p[0, 3] = 9; p[1, 2:] = 9                   # 3 void px: ignored, not a FP
    m.update(p, [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 2}, {"id": 9, "category_id": 1}],
             g, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}])
    # image 2: GT thing seg predicted as stuff -> FN (thing) + FP (stuff); a crowd region covered by a thing
    # prediction is ignored.
    g2 = np.zeros((4, 4), int)
    g2[:2, :2] = 1
    g2[3] = 3
    p2 = np.zeros((4, 4), int)
    p2[:2, :2] = 1
    p2[3] = 4
    m.update(p2, [{"id": 1, "category_id": 2}, {"id": 4, "category_id": 1}],
             g2, [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 1, "iscrowd": 1}])
    r = m.compute()
    assert r["per_class_pq"]["thing"] == pytest.approx(0.75 / 1.5)  # TP 1, FN 1
    assert r["per_class_pq"]["stuff"] == pytest.approx((8 / 9) / 1.5)  # TP 1, FP 1
    assert r["sq_th"] == pytest.approx(0.75) and r["rq_st"] == pytest.approx(2 / 3)
    assert r["pq"] == pytest.approx((0.5 + 16 / 27) / 2)
    assert r["pq_th"] == pytest.approx(0.5) and r["pq_st"] == pytest.approx(16 / 27)
    with pytest.raises(LabelwiseError, match="segment id 8"):
        m.update(np.full((2, 2), 8), [], np.zeros((2, 2)), [])


def test_paint_instances_and_rgb_ids():
    masks = np.zeros((2, 3, 3), bool)
    masks[0, :2] = True
    masks[1, 1:] = True
    ids, segs = paint_instances(masks, [0.9, 0.5], [1, 2])
    assert ids.tolist() == [[1, 1, 1], [1, 1, 1], [2, 2, 2]]  # higher score painted last, on top
    assert [s["category_id"] for s in segs] == [1, 2]
    big = np.array([[0, 70000], [256, 5]])
    assert np.array_equal(rgb2id(id2rgb(big)), big)


def test_hungarian_maps_clusters_to_categories_then_scores_class_aware():
    gt, masks = _gt()
    preds = _preds(masks)  # right masks, categories swapped: cluster 2 = class 1, cluster 1 = class 2
    preds.append({"image_id": 2, "category_id": 7, "segmentation": encode_mask(_box(20, 24, 15, 20, 20, 24)),
                  "score": 0.8})  # a cluster that overlaps no object: left without a category
    ev = InstanceEvaluator(gt, hungarian=True)
    ev.update(preds)
    r = ev.compute()
    things = {**gt, "categories": [c for c in gt["categories"] if c.get("isthing", 1)],
              "annotations": [a for a in gt["annotations"] if a["category_id"] != 3]}
    mapped = [{**p, "category_id": {1: 2, 2: 1}[p["category_id"]]} for p in preds if p["category_id"] != 7]
    segm = _cocoeval(things, mapped, "segm")
    assert [r["ap"], r["ap50"], r["ar100"]] == pytest.approx([segm[0], segm[1], segm[8]])
    assert r["ap50"] == pytest.approx(1.0) and r["hungarian_clusters_mapped"] == 2
    ev = InstanceEvaluator(gt, hungarian=True)  # no cluster overlaps an object: zeros, not an error
    ev.update(preds[-1:])
    r = ev.compute()
    assert r["ap"] == 0.0 and r["num_predictions"] == 0


def test_level_filter_scores_the_instance_level_by_default():
    from labelwise.evaluation.api import _select_level

    recs = [{"level": "instance", "score": 0.9}, {"level": "semantic", "score": 0.8}, {"score": 0.5}]
    assert _select_level(recs, "instance") == [recs[0], recs[2]]
    assert _select_level(recs, "semantic") == [recs[1], recs[2]]
    assert _select_level(recs, "all") == recs
    with pytest.raises(LabelwiseError, match="level 'both'"):
        _select_level(recs, "both")
