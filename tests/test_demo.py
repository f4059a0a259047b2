"""``labelwise demo``: report assembly from demo files (fast), real-photo CAMs, end to end (slow)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from labelwise.cli import main
from labelwise.io import atomic_save_npz, write_image, write_label


def _fake_demo_folder(root: Path, n: int = 3, size: int = 24):
    """A tiny VOC testbed plus seeds / masks / seed_masks as the demo writes them."""
    data, pred = root / "data", root / "pred"
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
        atomic_save_npz(pred / "train" / "seeds" / f"{i}.npz", cams=cams, keys=np.array([1, 2]))
        write_label(pred / "train" / "masks" / f"{i}.png", gt)
    return data, pred, names, ids


def test_seeds_to_masks_uses_keys_and_threshold(tmp_path):
    from labelwise.cli.demo import seeds_to_masks
    from labelwise.io import read_label

    data, pred, names, ids = _fake_demo_folder(tmp_path)
    n = seeds_to_masks(pred / "train" / "seeds", pred / "train" / "seed_masks", bg_threshold=0.5)
    assert n == len(ids)
    lab = read_label(pred / "train" / "seed_masks" / "img0.png")
    assert (lab[4:12, 4:12] == 1).all()
    assert (lab[14:20, 14:20] == 0).all()  # 0.3 <= threshold -> background
    assert lab.sum() == 64


def test_threshold_sweep_matches_hand_computed_iou(tmp_path):
    from labelwise.report.demo import threshold_sweep

    data, pred, names, ids = _fake_demo_folder(tmp_path)
    sw = threshold_sweep(pred / "train" / "seeds", data / "SegmentationClass", 3, thresholds=[0.25, 0.5, 0.95])
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
    from labelwise.cli.demo import seeds_to_masks
    from labelwise.report.demo import build_demo_report

    data, pred, names, ids = _fake_demo_folder(tmp_path)
    seeds_to_masks(pred / "train" / "seeds", pred / "train" / "seed_masks", 0.5)
    ev = {"miou": 0.5, "pixel_acc": 0.9, "precision": 0.6, "recall": 0.7, "confusion_ratio": 0.25,
          "per_class_iou": {"background": 0.9, "disc": 0.8, "ring": 0.1},
          "per_class_confusion_ratio": {"disc": 0.1, "ring": float("inf")}}
    summary = {"headline_split": "train", "seeds_miou": 0.5, "masks_miou": 0.612, "seeds_confusion_ratio": 0.25,
               "masks_confusion_ratio": 0.1, "metrics": {"train": {"seeds": ev, "masks": ev}}, "run_dir": "r"}
    log = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 11)]
    path = build_demo_report(tmp_path / "report.html", summary=summary, data_root=data, pred_root=pred,
                             splits=["train"], log=log, photos=[], photo_note="", n_examples=2)
    html = path.read_text()
    for sec in ("Summary", "Examples (train)", "Metrics", "Training"):
        assert f">{sec}</h2>" in html
    assert "Real photos" not in html
    assert "0.612" in html and "&infin;" in html  # headline and inf confusion ratio
    assert "ring" in html and "disc" in html
    # 2 examples x 5 images (photo, gt, CAM, seeds, pseudo-mask), all inline
    assert html.count("data:image/png;base64,") == 10
    polys = re.findall(r'<polyline[^>]*points="([^"]*)"', html)
    assert len(polys) == 4  # threshold sweep (mIoU, FP/TP), loss, lr
    assert "background threshold" in html
    assert len(re.findall(r'data-series="loss" points="([^"]*)"', html)[0].split()) == 10
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html, re.I)


def test_demo_rejects_bad_flags(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--splits", "test"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2


def _classifier_or_skip():
    from labelwise.cli.demo import load_imagenet_classifier

    try:
        return load_imagenet_classifier()
    except Exception as e:  # the backbone helper's classifier is not there (yet)
        pytest.skip(f"EfficientNet-Lite0 classifier unavailable: {e}")


def test_real_photo_cam_on_chelsea():
    import skimage.data

    from labelwise.report.photos import classifier_cams

    model = _classifier_or_skip()
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
def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "3", "--train", "6", "--val", "3", "--size", "64",
            "--examples", "2", "--no-real-photos"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Report:" in text and "mIoU" in text and "elapsed" in text
    html = (out / "report.html").read_text()
    for sec in ("Summary", "Examples (train)", "Metrics", "Training"):
        assert f">{sec}</h2>" in html
    assert "<polyline" in html and "data:image/png;base64," in html
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html, re.I)
    m = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val"):
        for kind in ("seeds", "masks"):
            r = m["metrics"][split][kind]
            assert 0.0 <= r["miou"] <= 1.0 and "per_class_iou" in r and "confusion_ratio" in r
    assert len(list((out / "pred" / "train" / "masks").glob("*.png"))) == 6
    # the threshold sweep at the run's threshold reproduces the evaluator's seeds mIoU
    sw = m["threshold_sweep"]["train"]
    j = min(range(len(sw["threshold"])), key=lambda k: abs(sw["threshold"][k] - m["seed_bg_threshold"]))
    if abs(sw["threshold"][j] - m["seed_bg_threshold"]) < 1e-6:
        assert sw["miou"][j] == pytest.approx(m["metrics"]["train"]["seeds"]["miou"], abs=2e-3)
    # re-running with the same --out reuses the testbed, the run and the predictions
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "reused" in text
    # a different testbed into the same folder is refused with a one-line error
    assert main(args[:6] + ["7"] + args[7:]) == 2
