"""Dataset formats: SPEC parsing, voc/coco/parts/folder loading, validation and skip_bad."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelwise.data import DatasetInfo, SegDataset, build_dataset, parse_spec, validate
from labelwise.errors import LabelwiseError
from labelwise.io import write_image, write_label


def blocks_label(h=24, w=32, classes=(1, 2)) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    for j, c in enumerate(classes):
        lab[4:12, 2 + 12 * j: 10 + 12 * j] = c
    lab[0, 0] = 255
    return lab


def make_voc(root: Path, ids=("a", "b", "c"), split="train", labels=None, size=(24, 32)) -> Path:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, i in enumerate(ids):
        write_image(root / "JPEGImages" / f"{i}.jpg", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        lab = labels[k] if labels is not None else blocks_label(*size, classes=(1 + k % 3, 15))
        write_label(root / "SegmentationClass" / f"{i}.png", lab)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


# --------------------------------------------------------------------------- spec


def test_parse_spec_and_unknown_format(tmp_path):
    assert parse_spec(f"voc:{tmp_path}") == ("voc", tmp_path)
    assert parse_spec("VOC:/x/y") == ("voc", Path("/x/y"))
    with pytest.raises(LabelwiseError) as e:
        parse_spec("nope:/x")
    msg = str(e.value)
    assert "unknown format 'nope'" in msg and "voc" in msg and "coco" in msg and "\n" not in msg
    with pytest.raises(LabelwiseError, match="no format"):
        parse_spec("/just/a/path")


def test_exports():
    ds_cls = build_dataset.__module__
    assert ds_cls == "labelwise.data.spec"
    assert DatasetInfo(["background", "a"]).num_foreground == 1
    assert issubclass(__import__("labelwise.data.voc", fromlist=["x"]).VOCDataset, SegDataset)


# --------------------------------------------------------------------------- voc


def test_voc_items_and_derived_tags(tmp_path):
    root = make_voc(tmp_path / "voc")
    ds = build_dataset(f"voc:{root}", "train")
    assert len(ds) == 3 and ds.ids == ["a", "b", "c"] and ds.num_classes == 21
    it = ds[1]
    assert it["image_id"] == "b" and it["file_name"] == "b.jpg"
    assert it["image"].dtype == np.uint8 and it["image"].shape == (24, 32, 3)
    assert it["mask"].dtype == np.uint8 and it["mask"].shape == (24, 32)
    assert it["tags"].dtype == np.float32 and it["tags"].shape == (20,)
    assert set(np.flatnonzero(it["tags"]) + 1) == {2, 15}
    assert np.array_equal(ds.load_mask(1), it["mask"])
    assert ds.image_path(0) == root / "JPEGImages" / "a.jpg"
    assert ds.info.class_names[15] == "person"


def test_voc_class_names_and_explicit_tags(tmp_path):
    root = make_voc(tmp_path / "voc", labels=[blocks_label(classes=(1,)), blocks_label(classes=(2,)),
                                              blocks_label(classes=(1, 2))])
    (root / "class_names.txt").write_text("background\ncat\ndog\n")
    (root / "ImageSets" / "Tags").mkdir(parents=True)
    (root / "ImageSets" / "Tags" / "train.txt").write_text("a dog\nb 1 2\n")
    ds = build_dataset(f"voc:{root}", "train")
    assert ds.class_names == ["background", "cat", "dog"]
    assert ds.tags(0).tolist() == [0.0, 1.0]  # explicit wins over the label's "cat"
    assert ds.tags(1).tolist() == [1.0, 1.0]  # indices accepted
    assert ds.tags(2).tolist() == [1.0, 1.0]  # not listed: derived
    (root / "ImageSets" / "Tags" / "train.txt").write_text("a dog\nb horse\n")
    with pytest.raises(LabelwiseError) as e:
        build_dataset(f"voc:{root}", "train").tags(0)
    assert "train.txt:2" in str(e.value) and "unknown class name 'horse'" in str(e.value)


def test_voc_split_errors(tmp_path):
    root = make_voc(tmp_path / "voc")
    with pytest.raises(LabelwiseError) as e:
        build_dataset(f"voc:{root}", "val")
    assert "val.txt" in str(e.value) and "available splits: train" in str(e.value)
    (root / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n\n")
    with pytest.raises(LabelwiseError, match="empty.txt: split file is empty"):
        build_dataset(f"voc:{root}", "empty")
    (root / "ImageSets" / "Segmentation" / "bad.txt").write_text("a\nzzz\n")
    with pytest.raises(LabelwiseError) as e:
        build_dataset(f"voc:{root}", "bad")
    assert "bad.txt" in str(e.value) and "'zzz'" in str(e.value)
    with pytest.raises(LabelwiseError, match="no JPEGImages"):
        build_dataset(f"voc:{tmp_path}", "train")


def test_voc_bad_items_raise_and_validate(tmp_path):
    big = blocks_label(); big[5, 5] = 30
    root = make_voc(tmp_path / "voc", ids=("a", "b", "c", "d"),
                    labels=[blocks_label(), big, blocks_label(10, 10), blocks_label()])
    (root / "JPEGImages" / "d.jpg").write_bytes(b"not an image at all")
    ds = build_dataset(f"voc:{root}", "train")
    with pytest.raises(LabelwiseError) as e:
        ds[1]
    assert "b.png" in str(e.value) and "label value 30 is out of range" in str(e.value)
    with pytest.raises(LabelwiseError) as e:
        ds[2]
    assert "c.png" in str(e.value) and "differs from image size" in str(e.value)
    with pytest.raises(LabelwiseError) as e:
        ds[3]
    assert "d.jpg" in str(e.value) and "corrupt" in str(e.value)
    problems = validate(ds)
    files = sorted(Path(f).name for f, _ in problems)
    assert files == ["b.png", "c.png", "d.jpg"]
    assert all(r and "\n" not in r for _, r in problems)


def test_skip_bad_drops_warns_and_reports(tmp_path):
    big = blocks_label(); big[5, 5] = 99
    root = make_voc(tmp_path / "voc", labels=[blocks_label(), big, blocks_label()])
    with pytest.warns(UserWarning, match="skipped 1 bad item"):
        ds = build_dataset(f"voc:{root}", "train", skip_bad=True, report_dir=tmp_path / "rep")
    assert ds.ids == ["a", "c"]
    report = (tmp_path / "rep" / "skipped.txt").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(str(root / "SegmentationClass" / "b.png"))
    assert "out of range" in report[0]
    assert ds[1]["image_id"] == "c"
    # clean dataset: no warning, empty report
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = build_dataset(f"voc:{make_voc(tmp_path / 'ok')}", "train", skip_bad=True, report_dir=tmp_path / "r2")
    assert len(ok) == 3 and (tmp_path / "r2" / "skipped.txt").read_text() == ""


def test_voc_unlabelled_split_and_partial_labels(tmp_path):
    root = make_voc(tmp_path / "voc")
    write_image(root / "JPEGImages" / "t.jpg", np.zeros((8, 8, 3), np.uint8))
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("t\n")
    it = build_dataset(f"voc:{root}", "test")[0]
    assert "mask" not in it and "tags" not in it
    (root / "ImageSets" / "Segmentation" / "mix.txt").write_text("a\nt\n")
    with pytest.raises(LabelwiseError, match="'t' has no label PNG"):
        build_dataset(f"voc:{root}", "mix")


# --------------------------------------------------------------------------- image decoding


def test_image_variants_decode_to_rgb(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    arr = np.zeros((6, 10, 3), np.uint8)
    arr[:, :5] = (200, 10, 10)
    Image.fromarray(arr[:, :, 0], "L").save(root / "gray.png")
    rgba = np.dstack([arr, np.full((6, 10), 255, np.uint8)]); rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(arr).convert("P").save(root / "pal.png")
    Image.fromarray((np.arange(60).reshape(6, 10) * 1000).astype(np.uint16)).save(root / "deep.png")
    ex = Image.fromarray(arr)
    exif = ex.getexif(); exif[0x0112] = 6  # rotate 90 CW on display
    ex.save(root / "exif.jpg", exif=exif, quality=100)
    ds = build_dataset(f"folder:{root}")
    by = {ds.ids[i]: ds[i]["image"] for i in range(len(ds))}
    for k, im in by.items():
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3, k
    assert by["gray"].shape == (6, 10, 3) and by["gray"][0, 0].tolist() == [200, 200, 200]
    assert by["rgba"][0, 0].tolist() == [255, 255, 255] and by["rgba"][1, 0].tolist() == [200, 10, 10]
    assert by["pal"][0, 0, 0] > 150 and by["pal"][0, 9].tolist() == [0, 0, 0]
    assert by["deep"].shape == (6, 10, 3) and by["deep"][-1, -1, 0] == round(59000 / 65535 * 255) and by["deep"][0, 0, 0] == 0
    assert by["exif"].shape == (10, 6, 3)  # EXIF orientation applied
    # header-based validation agrees with the rotated size
    assert validate(ds) == []


# --------------------------------------------------------------------------- folder


def test_folder_tags_and_class_names(tmp_path):
    root = tmp_path / "f"
    for rel in ("cats/1.jpg", "cats/2.png", "dogs/x.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(root / rel, np.zeros((5, 5, 3), np.uint8))
    (root / "tags.csv").write_text("image,tags\ncats/1.jpg,cat\ncats/2,cat;dog\ndogs/x.jpg,\n")
    ds = build_dataset(f"folder:{root}", "train")
    assert ds.ids == ["cats/1", "cats/2", "dogs/x"]
    assert ds.class_names == ["background", "cat", "dog"]
    assert ds[0]["file_name"] == "cats/1.jpg"
    assert ds.tags(1).tolist() == [1.0, 1.0] and ds.tags(2).tolist() == [0.0, 0.0]
    assert "mask" not in ds[0]
    (root / "tags.csv").write_text("image,tags\ncats/9.jpg,cat\n")
    with pytest.raises(LabelwiseError, match=r"tags.csv:2: image 'cats/9.jpg' not found"):
        build_dataset(f"folder:{root}")
    (root / "class_names.txt").write_text("background\ncat\n")
    (root / "tags.csv").write_text("image,tags\ncats/1.jpg,cow\n")
    with pytest.raises(LabelwiseError, match=r"tags.csv:2: unknown class name 'cow'"):
        build_dataset(f"folder:{root}")


# --------------------------------------------------------------------------- parts


def make_parts(root: Path, split="train", n=2, with_objects=True):
    h = {"objects": ["background", "cat", "car"],
         "parts": [{"name": "background", "object": "background"}, {"name": "cat head", "object": "cat"},
                   {"name": "cat body", "object": "cat"}, {"name": "car wheel", "object": "car"}]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "hierarchy.json").write_text(json.dumps(h))
    for i in range(n):
        parts = np.zeros((12, 16), np.uint8)
        parts[2:6, 2:6] = 1; parts[6:10, 2:6] = 2; parts[2:6, 9:14] = 3; parts[11, 15] = 255
        write_image(root / "images" / split / f"im{i}.jpg", np.zeros((12, 16, 3), np.uint8))
        write_label(root / "parts" / split / f"im{i}.png", parts)
        if with_objects:
            write_label(root / "objects" / split / f"im{i}.png", np.array([0, 1, 1, 2] + [0] * 251 + [255],
                                                                            np.uint8)[parts])
    return root


def test_parts_dataset(tmp_path):
    root = make_parts(tmp_path / "p")
    ds = build_dataset(f"parts:{root}", "train")
    assert ds.object_names == ds.class_names == ["background", "cat", "car"]
    assert ds.part_names == ["background", "cat head", "cat body", "car wheel"]
    assert ds.part_to_object.dtype == np.int64 and ds.part_to_object.tolist() == [0, 1, 1, 2]
    it = ds[0]
    assert it["parts"][3, 3] == 1 and it["objects"][3, 3] == 1 and it["objects"][3, 10] == 2
    assert np.array_equal(it["mask"], it["objects"]) and it["tags"].tolist() == [1.0, 1.0]
    assert np.array_equal(ds.load_parts(0), it["parts"]) and np.array_equal(ds.load_objects(0), it["objects"])
    info = ds.info
    assert info.part_names == ds.part_names and info.part_to_object == [0, 1, 1, 2]
    # objects derived from parts when objects/ is absent
    root2 = make_parts(tmp_path / "p2", with_objects=False)
    ds2 = build_dataset(f"parts:{root2}", "train")
    assert np.array_equal(ds2[0]["objects"], it["objects"])


def test_parts_hierarchy_validation(tmp_path):
    root = make_parts(tmp_path / "p")
    h = json.loads((root / "hierarchy.json").read_text())
    h["parts"].append({"name": "tail", "object": "dog"})
    (root / "hierarchy.json").write_text(json.dumps(h))
    with pytest.raises(LabelwiseError) as e:
        build_dataset(f"parts:{root}", "train")
    assert "hierarchy.json" in str(e.value) and "'dog'" in str(e.value)
    make_parts(tmp_path / "q")
    with pytest.raises(LabelwiseError, match="available splits: train"):
        build_dataset(f"parts:{tmp_path / 'q'}", "val")


# --------------------------------------------------------------------------- coco


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mu

    r = mu.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def make_coco(root: Path, layout="labelwise", split="val"):
    img_dir = root / "images" / split if layout == "labelwise" else root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    write_image(img_dir / "x.jpg", np.zeros((20, 30, 3), np.uint8))
    write_image(img_dir / "y.jpg", np.zeros((20, 30, 3), np.uint8))
    small = np.zeros((20, 30), bool); small[5:9, 5:9] = True
    data = {
        "images": [{"id": 7, "file_name": "x.jpg", "height": 20, "width": 30},
                   {"id": 8, "file_name": "y.jpg", "height": 20, "width": 30}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"},
                       {"id": 200, "name": "sky", "isthing": 0}],
        "annotations": [
            # small RLE dog listed first, big polygon car later: smaller must still win
            {"id": 1, "image_id": 7, "category_id": 18, "segmentation": _rle(small), "area": 16, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "segmentation": [[0, 0, 20, 0, 20, 15, 0, 15]],
             "area": 300, "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 200, "segmentation": [[25, 0, 30, 0, 30, 5, 25, 5]],
             "area": 25, "iscrowd": 0},
        ],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def test_coco_semantic_instances_and_ids(tmp_path):
    root = make_coco(tmp_path / "c")
    ds = build_dataset(f"coco:{root}", "val")
    assert ds.class_names == ["background", "car", "dog", "sky"]  # sorted by COCO id
    assert ds.category_ids == [0, 3, 18, 200]
    assert ds.annotation_file == root / "annotations" / "instances_val.json"
    assert ds.ids == ["x", "y"]
    it = ds[0]
    m = it["mask"]
    assert m[6, 6] == 2  # small dog on top of big car
    assert m[12, 12] == 1 and m[2, 27] == 3 and m[18, 28] == 0
    assert it["tags"].tolist() == [1.0, 1.0, 1.0]
    inst = it["instances"]
    assert [d["category"] for d in inst] == [2, 1]  # stuff "sky" excluded
    assert inst[0]["mask"].dtype == bool and inst[0]["mask"].sum() == 16 and inst[0]["iscrowd"] is False
    assert np.array_equal(ds.load_mask(0), m)
    assert ds[1]["mask"].max() == 0 and ds[1]["instances"] == []
    assert ds.coco.getImgIds() == [7, 8]  # lazily built pycocotools object


def test_coco_official_and_explicit_layouts(tmp_path):
    root = make_coco(tmp_path / "c", layout="official", split="val2017")
    assert len(build_dataset(f"coco:{root}", "val")) == 2  # val -> val2017
    ann = root / "annotations" / "instances_val2017.json"
    assert build_dataset(f"coco:{ann}").image_dir == root / "val2017"
    ds = build_dataset(f"coco:{ann},{root / 'val2017'}", "val")
    assert ds.image_path(1) == root / "val2017" / "y.jpg"
    with pytest.raises(LabelwiseError, match="available splits: val2017"):
        build_dataset(f"coco:{root}", "train")


def test_coco_validation(tmp_path):
    root = make_coco(tmp_path / "c")
    write_image(root / "images" / "val" / "y.jpg", np.zeros((21, 30, 3), np.uint8))  # wrong size
    ds = build_dataset(f"coco:{root}", "val")
    with pytest.raises(LabelwiseError, match=r"y.jpg: image is 30x21 but instances_val.json says 30x20"):
        ds[1]
    assert [Path(f).name for f, _ in validate(ds)] == ["y.jpg"]
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    data["annotations"][0]["category_id"] = 99
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    with pytest.raises(LabelwiseError, match="annotation 1 has category_id 99"):
        build_dataset(f"coco:{root}", "val")
