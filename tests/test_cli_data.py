"""``labelwise data synth|check`` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import labelwise.data as data
from labelwise.cli import main


def test_synth_writes_testbed_and_meta(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["data", "synth", "cooc", str(out), "--train", "3", "--val", "2", "--size", "40", "--seed", "5",
               "--context-rate", "0.6", "--opt", "pair_rate=0.9"])
    assert rc == 0
    assert "voc:" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["size"] == 40 and meta["splits"] == {"train": 3, "val": 2}
    assert meta["options"]["context_rate"] == 0.6 and meta["options"]["pair_rate"] == 0.9
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 5


@pytest.mark.parametrize("argv, needle", [
    (["--size", "16"], "--size"),
    (["--train", "-2"], "--train"),
    (["--opt", "contxt_rate=0.5"], "context_rate"),
    (["--opt", "noequals"], "KEY=VALUE"),
    (["--opt", "context_rate=2"], "out of range"),
])
def test_synth_bad_input_is_one_line_error(tmp_path, capsys, argv, needle):
    rc = main(["data", "synth", "cooc", str(tmp_path / "x"), "--train", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("labelwise: error:") and "\n" not in err and needle in err


def test_synth_refuses_foreign_nonempty_dir(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    assert main(["data", "synth", "objects", str(tmp_path), "--train", "1", "--val", "0", "--size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synth", "objects", str(tmp_path), "--train", "1", "--val", "0", "--size", "32",
                 "--overwrite"]) == 0
    assert (tmp_path / "annotations" / "instances_train.json").is_file() and (tmp_path / "f.txt").is_file()


def test_cooc_only_flags_rejected_for_other_kinds(tmp_path, capsys):
    assert main(["data", "synth", "parts", str(tmp_path / "p"), "--pair-rate", "0.5"]) == 2
    assert "cooc" in capsys.readouterr().err


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "default 200" in text and "default 50" in text and "default 128" in text
    assert "context_rate" in text and "touch_rate" in text


def test_check_reports_problems(tmp_path, capsys):
    """A real testbed with real defects: each bad file is listed with its reason, exit code 1."""
    from PIL import Image

    from labelwise.io import write_label

    root = tmp_path / "c"
    assert main(["data", "synth", "cooc", str(root), "--train", "4", "--val", "2", "--size", "48"]) == 0
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    write_label(root / "SegmentationClass" / f"{ids[0]}.png", np.full((48, 48), 42, np.uint8))  # 42 >= 11 classes
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")
    Image.new("P", (20, 48)).save(root / "SegmentationClass" / f"{ids[2]}.png")  # wrong size
    capsys.readouterr()
    rc = main(["data", "check", f"voc:{root}", "--split", "train"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert any(f"{ids[0]}.png" in ln and "label value 42" in ln for ln in lines)
    assert any(f"{ids[1]}.jpg" in ln and "corrupt" in ln for ln in lines)
    assert any(f"{ids[2]}.png" in ln and "differs from image size" in ln for ln in lines)
    assert "3 problem" in err
    # the untouched split is clean, and the default split is train
    assert main(["data", "check", f"voc:{root}", "--split", "val"]) == 0
    assert "OK (2 images, 11 classes)" in capsys.readouterr().out
    assert main(["data", "check", f"voc:{root}"]) == 1


@pytest.mark.skipif(not (hasattr(data, "build_dataset") and hasattr(data, "validate")),
                    reason="labelwise.data.build_dataset/validate not available")
@pytest.mark.parametrize("kind, fmt", [("cooc", "voc"), ("parts", "parts"), ("objects", "coco")])
def test_check_accepts_generated_testbeds(tmp_path, capsys, kind, fmt):
    out = tmp_path / kind
    assert main(["data", "synth", kind, str(out), "--train", "3", "--val", "2", "--size", "48"]) == 0
    for split in ("train", "val"):
        assert main(["data", "check", f"{fmt}:{out}", "--split", split]) == 0, capsys.readouterr()


def _mini_voc_and_sbd(tmp_path):
    """A miniature VOC 2012 folder and SBD benchmark_RELEASE with .mat labels in the official
    structure (struct GTcls with Segmentation / Boundaries / CategoriesPresent)."""
    from scipy.io import savemat

    from labelwise.io import write_image, write_label

    rng = np.random.default_rng(0)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    for d in ("cls", "img"):
        (sbd / d).mkdir(parents=True)

    def label(cls):
        lab = np.zeros((40, 48), np.uint8)
        lab[8:30, 10:40] = cls
        lab[30, 10:40] = 255
        return lab

    voc_ids, sbd_ids = [f"2008_00000{i}" for i in range(6)], [f"2008_00000{i}" for i in range(3, 9)]
    cells = np.empty((20, 1), dtype=object)  # a MATLAB cell array: one boundary map per class
    for r in range(20):
        cells[r, 0] = np.zeros((40, 48), np.uint8)
    for k, i in enumerate(voc_ids):
        write_image(voc / "JPEGImages" / f"{i}.jpg", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        write_label(voc / "SegmentationClass" / f"{i}.png", label(1 + k % 20))
    for k, i in enumerate(sbd_ids):
        write_image(sbd / "img" / f"{i}.jpg", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        seg = label(1 + (k + 5) % 20)
        seg[seg == 255] = 0  # SBD has no ignore band
        savemat(sbd / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": seg, "Boundaries": cells,
                                                     "CategoriesPresent": np.unique(seg[seg > 0])}})
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(voc_ids[:4]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(voc_ids[4:]) + "\n")
    (sbd / "train.txt").write_text("\n".join(sbd_ids[:4]) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_ids[4:]) + "\n")
    return voc, sbd.parent, voc_ids, sbd_ids


def test_convert_sbd_writes_the_vocaug_layout_that_loads_and_trains(tmp_path, capsys):
    from labelwise.data import build_dataset
    from labelwise.data.convert import read_sbd_label
    from labelwise.io import read_label

    voc, sbd, voc_ids, sbd_ids = _mini_voc_and_sbd(tmp_path)
    assert main(["data", "convert", "sbd", str(sbd), str(voc)]) == 0
    assert "use --data vocaug:" in capsys.readouterr().out
    train_aug = (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert train_aug == sorted((set(voc_ids[:4]) | set(sbd_ids)) - set(voc_ids[4:]))  # VOC val left out
    for i in sbd_ids:
        assert (read_label(voc / "SegmentationClassAug" / f"{i}.png") == read_sbd_label(sbd / "dataset/cls" /
                                                                                      f"{i}.mat")).all()
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file()
    ds = build_dataset(f"vocaug:{voc}", "train")
    assert len(ds) == len(train_aug) and ds[0]["mask"].shape == (40, 48)
    assert main(["data", "check", f"vocaug:{voc}", "--split", "train"]) == 0
    assert main(["data", "convert", "sbd", str(sbd), str(voc)]) == 0  # idempotent
    # trains (cpu preset named), and without --preset it takes the voc preset, as said
    assert main(["train", "cam", "--data", f"vocaug:{voc}", "--out", str(tmp_path / "run"), "--preset", "cpu",
                 "--steps", "1", "--set", "model.pretrained=false", "data.crop_size=32", "train.batch_size=2",
                 "train.eval_at_end=false", "--no-progress"]) == 0
    from labelwise.engine.api import choose_preset
    from labelwise.engine.registry import get_method

    assert choose_preset(get_method("cam"), f"vocaug:{voc}")[0] == "voc"
    capsys.readouterr()
    (sbd / "dataset/cls" / f"{sbd_ids[0]}.mat").write_bytes(b"not a mat file")
    (voc / "SegmentationClassAug" / f"{sbd_ids[0]}.png").unlink()
    assert main(["data", "convert", "sbd", str(sbd), str(voc)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{sbd_ids[0]}.mat" in err and "not an SBD class file" in err


def _mat_structs(fields, rows):
    """A 1 x N MATLAB struct array for scipy.io.savemat (``rows``: tuples in ``fields`` order)."""
    arr = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for k, r in enumerate(rows):
        for f, v in zip(fields, r):
            arr[0, k][f] = v
    return arr


def _mini_pascal_part(tmp_path):
    """VOC 2010 images and Pascal-Part Annotations_Part/*.mat in the official structure (struct anno:
    imname, objects(i).class / class_ind / mask / parts(j).part_name / mask)."""
    from scipy.io import savemat

    from labelwise.io import write_image

    voc = tmp_path / "VOCdevkit" / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    ann = tmp_path / "trainval" / "Annotations_Part"
    ann.mkdir(parents=True)
    H, W = 40, 48
    rng = np.random.default_rng(0)

    def box(y0, y1, x0, x1):
        m = np.zeros((H, W), np.uint8)
        m[y0:y1, x0:x1] = 1
        return m

    no_parts = np.zeros((0, 0))
    images = {
        # a person: head with an eye and an eyebrow inside, two arm parts; row 30 of the body has no part
        "2008_000001": [("person", 15, box(2, 32, 4, 20), [("head", box(2, 10, 4, 20)), ("leye", box(4, 6, 6, 8)),
                                                          ("lebrow", box(3, 4, 10, 14)), ("luarm", box(10, 20, 4, 8)),
                                                          ("ruarm", box(10, 20, 16, 20)), ("torso", box(10, 30, 8, 16))]),
                        ("boat", 4, box(20, 38, 24, 46), no_parts)],
        # a bus with numbered doors and two sides; a bicycle whose headlight no 108 part holds
        "2008_000002": [("bus", 6, box(4, 30, 2, 30), [("door_1", box(10, 20, 4, 8)), ("door_2", box(10, 20, 10, 14)),
                                                        ("leftside", box(4, 30, 16, 30)), ("frontside", box(4, 10, 2, 16))]),
                        ("bicycle", 2, box(30, 40, 30, 48), [("fwheel", box(30, 40, 30, 38)), ("bwheel", box(30, 40, 40, 48)),
                                                              ("headlight_1", box(30, 32, 38, 40))])],
        "2008_000003": [("tvmonitor", 20, box(5, 35, 5, 40), [("screen", box(8, 30, 8, 36))])],
    }
    for i, objs in images.items():
        write_image(voc / "JPEGImages" / f"{i}.jpg", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        rows = []
        for cls, ind, mask, parts in objs:
            pa = parts if isinstance(parts, np.ndarray) else _mat_structs(("part_name", "mask"), parts)
            rows.append((cls, ind, mask, pa))
        savemat(ann / f"{i}.mat", {"anno": {"imname": i, "objects": _mat_structs(("class", "class_ind", "mask",
                                                                                    "parts"), rows)}})
    write_image(voc / "JPEGImages" / "2008_000009.jpg", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))  # no .mat
    (voc / "ImageSets/Main/train.txt").write_text("2008_000001\n2008_000002\n2008_000009\n")
    (voc / "ImageSets/Main/val.txt").write_text("2008_000003\n")
    return voc, ann.parent, images


def test_convert_pascal_part_writes_a_parts_dataset_with_the_108_grouping(tmp_path, capsys):
    from labelwise.data import build_dataset
    from labelwise.data.adapters.pascal_part import PASCAL_PART108
    from labelwise.io import read_label

    voc, src, images = _mini_pascal_part(tmp_path)
    out = tmp_path / "pp108"
    assert main(["data", "convert", "pascal-part", str(src), str(out), "--images", str(voc), "--no-progress"]) == 0
    msg = capsys.readouterr().out
    assert "2 train / 1 val images, 107 parts" in msg and f"--data pascalpart:{out}" in msg
    idx = {p: k + 1 for k, p in enumerate(PASCAL_PART108)}
    parts = read_label(out / "parts/train/2008_000001.png")
    objects = read_label(out / "objects/train/2008_000001.png")
    assert (parts[4:6, 6:8] == idx[("person reye", "person")]).all()  # left eye: 108 keeps "reye" for both eyes
    assert parts[8, 5] == idx[("person head", "person")]
    assert parts[3, 12] == idx[("person head", "person")]  # eyebrow -> head
    assert parts[15, 5] == parts[15, 17] == idx[("person ruarm", "person")]  # both upper arms -> ruarm
    assert parts[30, 10] == 255 and objects[30, 10] == 15  # object pixels no part covers: ignore part, the object
    assert parts[30, 30] == idx[("boat", "boat")] and objects[30, 30] == 4  # a part-less object is its own part
    assert parts[39, 0] == 0 and objects[39, 0] == 0
    bus = read_label(out / "parts/train/2008_000002.png")
    assert bus[15, 5] == bus[15, 11] == idx[("bus door", "bus")]  # door_1, door_2 -> door
    assert bus[20, 20] == bus[6, 5] == idx[("bus rightside", "bus")]  # left and front sides -> rightside
    assert bus[31, 39] == 255  # the bicycle headlight: no Pascal-Part-108 part holds it
    assert bus[35, 45] == idx[("bike fwheel", "bicycle")]
    assert "2008_000009" not in {p.stem for p in (out / "images/train").iterdir()}  # no annotation, not listed
    ds = build_dataset(f"parts:{out}", "val")
    item = ds[0]
    assert len(ds) == 1 and item["parts"].shape == (40, 48) and (item["parts"] == 107).sum() == 22 * 28
    assert main(["data", "check", f"parts:{out}", "--split", "train"]) == 0
    pp = build_dataset(f"pascalpart:{out}", "train")  # the adapter reads the converted objects, not parts-derived
    k = pp.ids.index("2008_000001")
    assert pp.load_objects(k)[30, 10] == 15 and pp.load_parts(k)[30, 10] == 255
    assert main(["data", "check", f"pascalpart:{out}", "--split", "train"]) == 0
    # every part pixel lies on its object (the hierarchy agrees with the object map)
    fg = (parts > 0) & (parts < 255)
    assert (ds.part_to_object[parts[fg]] == objects[fg]).all()
    # fine: every official part; numbered instances merged
    fine = tmp_path / "ppfine"
    assert main(["data", "convert", "pascal-part", str(src), str(fine), "--images", str(voc), "--parts", "fine",
                 "--no-progress"]) == 0
    h = json.loads((fine / "hierarchy.json").read_text())
    names = [p["name"] for p in h["parts"]]
    assert "person lebrow" in names and "bus door" in names and "bus door_1" not in names
    assert read_label(fine / "parts/train/2008_000002.png")[31, 39] == names.index("bicycle headlight") + 1
    capsys.readouterr()
    # bad inputs: one line naming the file or option and the fix
    assert main(["data", "convert", "pascal-part", str(src), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--images" in capsys.readouterr().err
    (src / "Annotations_Part/2008_000003.mat").write_bytes(b"not a mat file")
    assert main(["data", "convert", "pascal-part", str(src), str(tmp_path / "y"), "--images", str(voc),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2008_000003.mat" in err and "not a Pascal-Part annotation" in err
