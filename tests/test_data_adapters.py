"""Adapters for official releases, each against a miniature in the release's own layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from labelwise.data import build_dataset
from labelwise.data.adapters.coco_wsss import COCO80_IDS, COCO80_NAMES, coco91_to_80_lut
from labelwise.data.adapters.partimagenet import PARTIMAGENET_PARTS
from labelwise.errors import LabelwiseError
from labelwise.io import write_image, write_label


def test_vocaug_release_layout(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    ids = ["2007_000032", "2008_000002", "2011_003276"]
    for k, i in enumerate(ids):
        write_image(voc / "JPEGImages" / f"{i}.jpg", np.zeros((10, 12, 3), np.uint8))
        m = np.full((10, 12), k + 1, np.uint8)
        write_label(voc / "SegmentationClassAug" / f"{i}.png", m)
    # official label for one id differs: Aug wins for vocaug, the official one for voc
    write_label(voc / "SegmentationClass" / "2007_000032.png", np.full((10, 12), 9, np.uint8))
    (seg / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    (seg / "val.txt").write_text("2007_000032\n")
    ds = build_dataset(f"vocaug:{tmp_path}", "train")  # parent of VOCdevkit accepted
    assert ds.root == voc and ds.ids == ids
    assert ds[0]["mask"][0, 0] == 1 and ds.tags(2)[2] == 1
    assert build_dataset(f"vocaug:{voc}", "val")[0]["mask"][0, 0] == 1
    (seg / "train.txt").write_text("2007_000032\n")
    assert build_dataset(f"voc:{voc}", "train")[0]["mask"][0, 0] == 9
    (seg / "train_aug.txt").unlink()
    with pytest.raises(LabelwiseError, match="train_aug.txt: SBD train_aug list not found"):
        build_dataset(f"vocaug:{voc}", "train")


def test_coco_wsss_label_png_layout(tmp_path):
    root = tmp_path / "coco"
    ids = ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    for k, i in enumerate(ids):
        write_image(root / "JPEGImages" / "train2014" / f"{i}.jpg", np.zeros((6, 8, 3), np.uint8))
        m = np.zeros((6, 8), np.uint8); m[:2] = 80 if k else 1; m[5, 7] = 255
        write_label(root / "SegmentationClass" / "train2014" / f"{i}.png", m)
    ds = build_dataset(f"coco-wsss:{root}", "train")
    assert ds.num_classes == 81 and ds.class_names[1] == "person" and ds.class_names[80] == "toothbrush"
    assert ds.ids == ids
    assert ds.tags(1)[79] == 1 and ds.tags(1).sum() == 1 and ds.tags(0)[0] == 1
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text(ids[1] + "\n")
    assert build_dataset(f"coco-wsss:{root}", "train").ids == [ids[1]]


def test_coco_91_to_80_mapping():
    assert len(COCO80_IDS) == 80 and COCO80_IDS[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert COCO80_IDS[-1] == 90 and COCO80_NAMES[COCO80_IDS.index(44)] == "bottle"
    lut = coco91_to_80_lut()
    assert lut[0] == 0 and lut[1] == 1 and lut[13] == 12 and lut[90] == 80 and lut[12] == 255 and lut[255] == 255


def test_coco_wsss_falls_back_to_instances_json(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "train2014" / "a.jpg", np.zeros((10, 10, 3), np.uint8))
    cats = [{"id": cid, "name": n} for cid, n in zip(COCO80_IDS, COCO80_NAMES)]
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}], "categories": cats,
            "annotations": [{"id": 1, "image_id": 1, "category_id": 90, "area": 25, "iscrowd": 0,
                             "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(data))
    ds = build_dataset(f"coco-wsss:{root}", "train")
    assert ds.num_classes == 81 and ds[0]["mask"][2, 2] == 80  # id 90 -> index 80


def test_partimagenet_release_layout(tmp_path):
    root = tmp_path / "PartImageNet_Seg" / "PartImageNet"
    cats = [{"id": k, "name": n, "supercategory": s} for k, (n, s) in enumerate(PARTIMAGENET_PARTS)]
    for split in ("train", "val"):
        (root / "annotations" / split).mkdir(parents=True)
        (root / "annotations" / split / f"{split}.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": cats}))
    raw = np.full((8, 8), 40, np.uint8)  # release background
    raw[0:3, 0:3] = 0    # Quadruped Head
    raw[4:6, 4:6] = 39   # Bottle Body
    raw[7, 7] = 255
    write_image(root / "images" / "train" / "n01440764_10029.JPEG", np.zeros((8, 8, 3), np.uint8))
    write_label(root / "annotations" / "train" / "n01440764_10029.png", raw)
    ds = build_dataset(f"partimagenet:{tmp_path / 'PartImageNet_Seg'}", "train")
    assert ds.num_parts == 41 and len(ds.object_names) == 12
    assert ds.part_names[1] == "Quadruped Head" and ds.object_names[1] == "Quadruped"
    assert ds.object_names[ds.part_to_object[40]] == "Bottle"
    it = ds[0]
    assert it["parts"][1, 1] == 1 and it["parts"][5, 5] == 40 and it["parts"][3, 7] == 0 and it["parts"][7, 7] == 255
    assert it["objects"][1, 1] == 1 and it["objects"][5, 5] == 11 and it["objects"][3, 7] == 0
    assert it["tags"].tolist() == [1.0] + [0.0] * 9 + [1.0]
    assert ds[0]["file_name"] == "n01440764_10029.JPEG"
    raw[0, 0] = 50
    write_label(root / "annotations" / "train" / "n01440764_10029.png", raw)
    with pytest.raises(LabelwiseError, match="label value 50 is not a PartImageNet part"):
        build_dataset(f"partimagenet:{root}", "train")[0]
    with pytest.raises(LabelwiseError, match="images/val: not found|images/val"):
        build_dataset(f"partimagenet:{root}", "val")


def test_pascal_part_release_layout(tmp_path):
    root = tmp_path / "PascalPart108"
    parts = np.zeros((6, 6), np.uint8)
    parts[0, :] = 1      # aero body
    parts[1, :] = 77     # person head
    parts[2, :] = 107    # tv screen
    parts[5, 5] = 255
    write_image(root / "img_dir" / "train" / "2008_000002.jpg", np.zeros((6, 6, 3), np.uint8))
    write_label(root / "ann_dir" / "train" / "2008_000002.png", parts)
    ds = build_dataset(f"pascalpart:{root}", "train")
    assert ds.object_names[1] == "aeroplane" and len(ds.object_names) == 21
    assert ds.part_names[77] == "person head" and ds.num_parts == 108
    it = ds[0]
    assert it["objects"][0, 0] == 1 and it["objects"][1, 0] == 15 and it["objects"][2, 0] == 20
    assert it["objects"][5, 5] == 255 and it["objects"][4, 0] == 0
    parts[3, 0] = 120
    write_label(root / "ann_dir" / "train" / "2008_000002.png", parts)
    with pytest.raises(LabelwiseError, match="label value 120 is out of range"):
        build_dataset(f"pascalpart:{root}", "train")[0]


def _mini_cityscapes(root):
    """Two val images in the official layout: road (7) / sky (23) / void (0), two cars (26 x 1000 + k)
    and a crowd of persons without instance ids (24)."""
    from PIL import Image

    from labelwise.io import write_image

    rng = np.random.default_rng(0)
    for k, (city, frame) in enumerate((("frankfurt", "000000_000294"), ("lindau", "000001_000019"))):
        (root / "leftImg8bit/val" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine/val" / city).mkdir(parents=True, exist_ok=True)
        write_image(root / "leftImg8bit/val" / city / f"{city}_{frame}_leftImg8bit.png",
                    rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
        lab = np.full((32, 64), 7, np.int32)
        lab[:8] = 23
        lab[:, :2] = 0
        inst = lab.copy()
        inst[10:20, 5:20] = 26000 + k
        inst[10:20, 30:40] = 26001 + k
        inst[22:30, 45:60] = 24  # persons, no instance ids
        lab = np.where(inst >= 1000, inst // 1000, inst)
        base = root / "gtFine/val" / city / f"{city}_{frame}_gtFine"
        Image.fromarray(lab.astype(np.uint8)).save(f"{base}_labelIds.png")
        Image.fromarray(inst.astype(np.uint16)).save(f"{base}_instanceIds.png")  # 16-bit, as released


def test_cityscapes_official_layout_semantic_instances_and_evaluation(tmp_path, monkeypatch):
    """cityscapes:ROOT reads leftImg8bit/ + gtFine/: 19-class masks with void as ignore, the cars as
    instances and the persons without ids as a crowd; instance and panoptic evaluation run on it
    (a perfect prediction scores 1)."""
    import json

    from labelwise.data import build_dataset
    from labelwise.evaluation import evaluate
    from labelwise.masks import encode_mask

    monkeypatch.setenv("LABELWISE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cityscapes"
    _mini_cityscapes(root)
    ds = build_dataset(f"cityscapes:{root}", "val")
    assert len(ds) == 2 and ds.class_names[1] == "road" and ds.class_names[-1] == "bicycle"
    item = ds[0]
    road, sky, car, person = (ds.class_names.index(n) for n in ("road", "sky", "car", "person"))
    assert item["mask"][20, 25] == road and item["mask"][0, 10] == sky and (item["mask"][:, :2] == 255).all()
    assert item["mask"][12, 10] == car and item["mask"][25, 50] == person
    cars = [i for i in item["instances"] if i["category"] == car]
    crowd = [i for i in item["instances"] if i["iscrowd"]]
    assert len(cars) == 2 and len(crowd) == 1 and crowd[0]["category"] == person
    assert not (tmp_path / "cityscapes" / "gtFine" / "val" / "x.json").exists()  # nothing written into the dataset
    # a perfect instance prediction: AP 1
    preds = [{"file_name": ds.file_name(i), "category_id": 1, "score": 1.0, "segmentation": encode_mask(m["mask"])}
             for i in range(len(ds)) for m in ds[i]["instances"] if not m["iscrowd"]]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    res = evaluate("instance", tmp_path / "pred.json", f"cityscapes:{root}", "val", progress=False)
    assert res["ap50"] == pytest.approx(1.0)
    pan = evaluate("panoptic", tmp_path / "pred.json", f"cityscapes:{root}", "val", class_agnostic=True,
                   progress=False)
    assert 0.0 < pan["pq"] <= 1.0
    from labelwise.cli import main

    assert main(["data", "check", f"cityscapes:{root}", "--split", "val"]) == 0


def test_uvo_style_frame_json_loads_through_coco(tmp_path):
    """UVO's frame annotations are COCO-style (one 'object' category, RLE masks, frames under video
    folders): `coco:ANNOTATIONS.json,FRAME_DIR` reads them and instance evaluation runs."""
    import json

    from labelwise.data import build_dataset
    from labelwise.evaluation import evaluate
    from labelwise.io import write_image
    from labelwise.masks import encode_mask

    frames = tmp_path / "uvo_videos_sparse_frames"
    m = np.zeros((24, 32), bool)
    m[4:12, 6:20] = True
    images, anns = [], []
    for k, vid in enumerate(("-0aRJ5", "zWqX0")):
        (frames / vid).mkdir(parents=True)
        write_image(frames / vid / "0.png", np.full((24, 32, 3), 90 + k, np.uint8))
        images.append({"id": k + 1, "file_name": f"{vid}/0.png", "height": 24, "width": 32, "video_id": k})
        anns.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "segmentation": encode_mask(m),
                     "area": int(m.sum()), "bbox": [6.0, 4.0, 14.0, 8.0], "iscrowd": 0})
    ann = tmp_path / "UVO_frame_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}))
    spec = f"coco:{ann},{frames}"
    ds = build_dataset(spec, "val")
    assert len(ds) == 2 and ds[1]["instances"][0]["mask"].sum() == m.sum()
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps([{"file_name": im["file_name"], "category_id": 1, "score": 0.9,
                                 "segmentation": encode_mask(m)} for im in images]))
    assert evaluate("instance", pred, spec, "val", progress=False)["ap50"] == pytest.approx(1.0)
