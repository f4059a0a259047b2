"""`labelwise evaluate` end to end on tiny datasets written to tmp_path."""

import json

import numpy as np
import pytest

from labelwise.cli import main
from labelwise.evaluation import evaluate
from labelwise.io import write_image, write_label
from labelwise.masks import encode_mask

GTS = {
    "a": np.array([[0, 0, 1], [0, 1, 1]], np.uint8),
    "b": np.array([[2, 2, 0], [255, 0, 0]], np.uint8),
}


def _voc(root):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    (root / "class_names.txt").write_text("background\ncat\ndog\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    for k, g in GTS.items():
        write_image(root / "JPEGImages" / f"{k}.jpg", np.zeros((*g.shape, 3), np.uint8))
        write_label(root / "SegmentationClass" / f"{k}.png", g)
    return f"voc:{root}"


def test_semantic_cli_perfect_and_background(tmp_path, capsys):
    spec = _voc(tmp_path / "voc")
    perfect, bg = tmp_path / "perfect", tmp_path / "bg"
    for k, g in GTS.items():
        write_label(perfect / f"{k}.png", g)
        write_label(bg / f"{k}.png", np.zeros_like(g))
    out = tmp_path / "r.json"
    assert main(["evaluate", "semantic", "--pred", str(perfect), "--gt", spec, "--split", "val",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["miou"] == 1.0 and r["pixel_acc"] == 1.0 and r["per_class_iou"] == {"background": 1.0, "cat": 1.0,
                                                                                 "dog": 1.0}
    assert "miou" in capsys.readouterr().out
    # all background: 11 valid pixels, 6 background -> bg IoU 6/11, cat and dog 0
    r = evaluate("semantic", bg, spec, "val", progress=False)
    assert r["miou"] == pytest.approx(6 / 11 / 3) and r["pixel_acc"] == pytest.approx(6 / 11)
    # unsupervised: cluster ids = class ids + 1 (4 clusters, cluster 0 unused) -> perfect after matching
    clusters = tmp_path / "clusters"
    for k, g in GTS.items():
        write_label(clusters / f"{k}.png", np.where(g == 255, 255, g + 1).astype(np.uint8))
    r = evaluate("unsupervised", clusters, spec, "val", progress=False)
    assert r["miou"] == 1.0 and r["assignment"] == [-1, 0, 1, 2]
    # more than 255 clusters (OAP's K = 512): 16-bit cluster maps, 65535 = none
    from labelwise.io import read_cluster_map, write_cluster_map

    wide = tmp_path / "wide"
    wide.mkdir()
    for k, g in GTS.items():
        ids = np.where(g == 255, -1, g.astype(np.int64) + 300)
        ids[0, 0] = -1  # one pixel without a cluster: wrong for its class
        write_cluster_map(wide / f"{k}.png", ids, 512)
        assert np.array_equal(read_cluster_map(wide / f"{k}.png"), ids)
    r = evaluate("unsupervised", wide, spec, "val", progress=False)
    assert r["assignment"][300:303] == [0, 1, 2] and r["pixel_acc"] == pytest.approx(9 / 11)
    assert r["per_class_iou"]["dog"] == pytest.approx(1 / 2)  # b's (0,0) pixel is a dog without a cluster


def test_semantic_cli_errors_name_the_file(tmp_path, capsys):
    spec = _voc(tmp_path / "voc")
    pred = tmp_path / "pred"
    write_label(pred / "a.png", GTS["a"])
    assert main(["evaluate", "semantic", "--pred", str(pred), "--gt", spec, "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and len(err.strip().splitlines()) == 1
    write_label(pred / "b.png", np.zeros((3, 3), np.uint8))
    assert main(["evaluate", "semantic", "--pred", str(pred), "--gt", spec, "--split", "val"]) == 2
    assert "b.png" in capsys.readouterr().err
    write_label(pred / "b.png", np.full((2, 3), 9, np.uint8))
    assert main(["evaluate", "semantic", "--pred", str(pred), "--gt", spec, "--split", "val"]) == 2
    assert "value 9" in capsys.readouterr().err


def _coco(root):
    (root / "images/val").mkdir(parents=True)
    (root / "annotations").mkdir()
    h, w = 8, 10
    thing = np.zeros((h, w), bool)
    thing[1:5, 1:5] = True
    sky = np.zeros((h, w), bool)
    sky[6:] = True
    write_image(root / "images/val/x.jpg", np.zeros((h, w, 3), np.uint8))
    gt = {"images": [{"id": 7, "file_name": "x.jpg", "height": h, "width": w}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": encode_mask(thing),
                           "area": 16.0, "bbox": [1, 1, 4, 4]},
                          {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0, "segmentation": encode_mask(sky),
                           "area": 20.0, "bbox": [0, 6, 10, 2]}],
          "categories": [{"id": 1, "name": "box", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]}
    (root / "annotations/instances_val.json").write_text(json.dumps(gt))
    return f"coco:{root}", thing, sky


def test_instance_and_panoptic_cli(tmp_path):
    spec, thing, sky = _coco(tmp_path / "coco")
    res = tmp_path / "res.json"
    res.write_text(json.dumps([
        {"file_name": "x.jpg", "category_id": 1, "segmentation": encode_mask(thing), "score": 0.9},
        {"file_name": "x.jpg", "category_id": 2, "segmentation": encode_mask(sky), "score": 0.8}]))
    out = tmp_path / "i.json"
    assert main(["evaluate", "instance", "--pred", str(res), "--gt", spec, "--split", "val", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # class-agnostic: the one thing is found (AP 1); the sky mask is an extra, lower-scored false positive
    assert r["ap"] == pytest.approx(1.0) and r["ar100"] == pytest.approx(1.0)
    # panoptic from the same results json: both segments match exactly -> PQ 1
    r = evaluate("panoptic", res, spec, "val", progress=False)
    assert r["pq"] == pytest.approx(1.0) and r["pq_th"] == pytest.approx(1.0) and r["pq_st"] == pytest.approx(1.0)
    # panoptic folder format: thing predicted half size -> IoU 8/16 = 0.5 is not > 0.5: FN + FP for the thing
    from labelwise.evaluation.panoptic import id2rgb
    from PIL import Image

    pdir = tmp_path / "pan"
    pdir.mkdir()
    ids = np.zeros(thing.shape, np.int64)
    ids[1:5, 1:3] = 300
    ids[sky] = 2
    Image.fromarray(id2rgb(ids)).save(pdir / "x.png")
    (pdir / "panoptic.json").write_text(json.dumps({"annotations": [{"file_name": "x.png", "segments_info": [
        {"id": 300, "category_id": 1}, {"id": 2, "category_id": 2}]}]}))
    r = evaluate("panoptic", pdir, spec, "val", progress=False)
    assert r["pq_th"] == 0.0 and r["pq_st"] == pytest.approx(1.0) and r["pq"] == pytest.approx(0.5)


def test_parts_cli_hand_computed(tmp_path):
    root = tmp_path / "parts"
    (root / "images/val").mkdir(parents=True)
    (root / "hierarchy.json").write_text(json.dumps({
        "objects": ["background", "animal", "car"],
        "parts": [{"name": "background", "object": "background"}, {"name": "head", "object": "animal"},
                  {"name": "body", "object": "animal"}, {"name": "wheel", "object": "car"}]}))
    write_image(root / "images/val/q.jpg", np.zeros((2, 2, 3), np.uint8))
    write_label(root / "parts/val/q.png", np.array([[1, 2], [3, 0]], np.uint8))
    write_label(root / "objects/val/q.png", np.array([[1, 1], [2, 0]], np.uint8))
    pred = tmp_path / "pred"
    write_label(pred / "parts/q.png", np.array([[1, 1], [3, 3]], np.uint8))
    write_label(pred / "objects/q.png", np.array([[1, 2], [2, 0]], np.uint8))
    out = tmp_path / "p.json"
    assert main(["evaluate", "parts", "--pred", str(pred), "--gt", f"parts:{root}", "--split", "val",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # same case as test_eval_semantic.test_parts_hand_computed
    assert r["part_miou"] == pytest.approx(0.25) and r["object_miou"] == pytest.approx(2 / 3)
    assert r["part_mavg"] == pytest.approx(0.375) and r["consistency"] == pytest.approx(0.5)


def test_corrupt_segmentations_end_in_one_line(tmp_path, capsys):
    """A prediction whose RLE is truncated (pycocotools would score it as another mask), a ground
    truth with an odd-length polygon (pycocotools: "input type is not supported"): one line naming
    the record, exit 2; `data check` finds the polygon too."""
    import shutil

    from labelwise.data.synth import generate

    root = generate("objects", tmp_path / "o", n_train=2, n_val=2, size=64, seed=0)
    gt = json.loads((root / "annotations" / "instances_val.json").read_text())
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
              "score": 0.9} for a in gt["annotations"]]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(preds))
    assert main(["evaluate", "instance", "--pred", str(good), "--gt", f"coco:{root}", "--split", "val"]) == 0
    bad = [dict(p) for p in preds]
    seg = dict(bad[1]["segmentation"])
    seg["counts"] = seg["counts"][: len(seg["counts"]) // 2]
    bad[1]["segmentation"] = seg
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    capsys.readouterr()
    assert main(["evaluate", "instance", "--pred", str(tmp_path / "bad.json"), "--gt", f"coco:{root}",
                 "--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prediction #1" in err and "truncated" in err, err
    # the ground truth: an odd-length polygon
    broken = tmp_path / "b"
    shutil.copytree(root, broken)
    gt["annotations"][0]["segmentation"] = [[1, 1, 10, 1, 10]]
    (broken / "annotations" / "instances_val.json").write_text(json.dumps(gt))
    assert main(["evaluate", "instance", "--pred", str(good), "--gt", f"coco:{broken}", "--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"annotation {gt['annotations'][0]['id']}" in err and "even number" in err, err
    assert main(["data", "check", f"coco:{broken}", "--split", "val"]) == 1
    assert "even number" in capsys.readouterr().out
