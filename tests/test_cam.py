"""The ``cam`` baseline: learns the cooc testbed (pseudo-mask mIoU well above all-background),
writes seeds/masks in the contract's format."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from labelwise.engine import api
from labelwise.evaluation import SemanticMetric


@pytest.fixture(scope="module")
def cooc(tmp_path_factory):
    from labelwise.data.synth import generate

    return generate("cooc", tmp_path_factory.mktemp("cooc") / "cooc", n_train=128, n_val=24, size=96, seed=0)


def _miou(pred_dir, root, split, fill=None):
    from labelwise.data.spec import build_dataset
    from labelwise.io import read_label

    ds = build_dataset(f"voc:{root}", split)
    m = SemanticMetric(ds.num_classes, ds.class_names)
    for i in range(len(ds)):
        gt = ds.load_mask(i)
        pred = np.full_like(gt, fill) if fill is not None else read_label(pred_dir / f"{ds.ids[i]}.png")
        m.update(pred, gt)
    return m.compute()["miou"]


@pytest.mark.slow
def test_cam_learns_cooc(cooc, tmp_path, monkeypatch):
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    t0 = time.time()
    run = api.train("cam", f"voc:{cooc}", tmp_path / "run", preset="cpu", steps=200, show_progress=False,
                    overrides=["data.crop_size=96", "data.scale_range=[1.0,1.0]", "data.flip=true",
                               "optim.warmup_steps=5", "train.eval_at_end=false"])
    t_train = time.time() - t0
    api.infer(run, f"voc:{cooc}", "val", tmp_path / "masks", what="masks", overrides=["infer.scales=[1.0,1.5]"])
    api.infer(run, f"voc:{cooc}", "val", tmp_path / "seeds", what="seeds", overrides=["infer.scales=[1.0,1.5]"])
    bg = _miou(None, cooc, "val", fill=0)
    cam = _miou(tmp_path / "masks", cooc, "val")
    print(f"\ncam cooc val mIoU {cam:.3f} vs all-background {bg:.3f}; train {t_train:.0f}s "
          f"total {time.time() - t0:.0f}s")
    # Measured (96 px, 128 train images, 200 steps, scales 1.0+1.5, bg threshold 0.5):
    # mIoU 0.239 vs 0.088 all-background, a margin of 0.151; assert about half of it.
    assert cam > bg + 0.075, (cam, bg)
    # seeds: one float16 map per present class at image size, keys = class indices
    from labelwise.data.spec import build_dataset

    ds = build_dataset(f"voc:{cooc}", "val")
    for i in range(3):
        z = np.load(tmp_path / "seeds" / f"{ds.ids[i]}.npz")
        present = np.nonzero(ds.tags(i))[0] + 1
        assert z["cams"].dtype == np.float16 and z["cams"].shape == (len(present), *ds.load_mask(i).shape)
        assert z["keys"].tolist() == present.tolist()
        assert 0.0 <= float(z["cams"].min()) and float(z["cams"].max()) <= 1.0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]


def test_cam_tiny_vit_trains_and_predicts_without_tags(tmp_path, monkeypatch):
    """ViT path + predicted classes for untagged images (folder dataset); resume across the CLI."""
    from labelwise.cli import main
    from labelwise.data.synth import generate

    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    root = generate("cooc", tmp_path / "c", n_train=8, n_val=4, size=32, seed=1)
    args = ["train", "cam", "--data", f"voc:{root}", "--out", str(tmp_path / "run"), "--steps", "2",
            "--set", "model.backbone=vit_tiny_test", "model.pretrained=false", "data.crop_size=32",
            "train.batch_size=4", "train.eval_at_end=false", "--no-progress"]
    assert main(args) == 0
    assert main(args[:7] + ["3", "--no-progress"]) == 0  # resume to 3 steps, flags from config.yaml
    from labelwise.engine.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 3
    # folder dataset: no tags -> predicted classes (threshold 0 keeps every class)
    assert main(["infer", str(tmp_path / "run"), "--data", f"folder:{root / 'JPEGImages'}", "--split", "all",
                 "--out", str(tmp_path / "seeds"), "--what", "seeds", "--set", "infer.pred_threshold=0.0",
                 "infer.scales=[1.0]"]) == 0
    files = sorted((tmp_path / "seeds").rglob("*.npz"))
    assert len(files) == 12
    z = np.load(files[0])
    assert z["keys"].tolist() == list(range(1, 11)) and z["cams"].shape == (10, 32, 32)
    assert main(["infer", str(tmp_path / "run"), "--data", f"voc:{root}", "--split", "val", "--out",
                 str(tmp_path / "m"), "--set", "optim.lr=1"]) == 2  # only infer.* may change
