"""Training on another stage's outputs: ``--labels PRED_DIR`` replaces the masks (tags stay the
dataset's), ``--seeds SEED_DIR`` adds CAM seeds; both are checked up front, recorded in
``run.json`` and must match on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

import toy_method  # noqa: F401  (registers _toy_seg)
from labelwise.data import build_dataset
from labelwise.data.overrides import read_seeds, with_stage_inputs
from labelwise.engine import api
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_save_npz, read_label, write_label


@pytest.fixture(scope="module")
def cooc(tmp_path_factory):
    from labelwise.data.synth import generate

    return generate("cooc", tmp_path_factory.mktemp("c") / "c", n_train=8, n_val=2, size=32, seed=1)


def _all_class(ds, folder, c):
    for i in range(len(ds)):
        m = ds.load_mask(i)
        write_label(folder / f"{ds.ids[i]}.png", np.where(m == 255, 255, c).astype(np.uint8))


def test_labels_replace_masks_but_not_tags_and_seeds_are_added(cooc, tmp_path):
    ds = build_dataset(f"voc:{cooc}", "train")
    _all_class(ds, tmp_path / "labels", 3)
    for i in range(len(ds)):
        atomic_save_npz(tmp_path / "seeds" / f"{ds.ids[i]}.npz", cams=np.full((1, 32, 32), 0.5, np.float16),
                        keys=np.array([3]))
    view = with_stage_inputs(ds, labels_dir=tmp_path / "labels", seeds_dir=tmp_path / "seeds")
    assert len(view) == len(ds) and view.ids == ds.ids and view.info == ds.info
    for i in range(len(ds)):
        item, orig = view[i], ds[i]
        assert set(np.unique(item["mask"])) <= {3, 255} and np.array_equal(item["image"], orig["image"])
        assert np.array_equal(item["tags"], orig["tags"])  # tags come from the dataset, not the pseudo labels
        assert np.array_equal(view.load_mask(i), item["mask"])
        assert item["seeds"]["keys"].tolist() == [3] and item["seeds"]["cams"].dtype == np.float32
    assert with_stage_inputs(ds) is ds
    # missing files are found before training starts, with the count and the first one
    (tmp_path / "labels" / f"{ds.ids[2]}.png").unlink()
    with pytest.raises(LabelwiseError, match=rf"1 of 8 images .* \(first: .*{ds.ids[2]}.png\)"):
        with_stage_inputs(ds, labels_dir=tmp_path / "labels")
    with pytest.raises(LabelwiseError, match="folder not found"):
        with_stage_inputs(ds, seeds_dir=tmp_path / "nope")
    # bad contents name the file
    write_label(tmp_path / "labels" / f"{ds.ids[2]}.png", np.full((32, 32), 40, np.uint8))
    with pytest.raises(LabelwiseError, match=rf"{ds.ids[2]}.png: label value 40 is out of range"):
        with_stage_inputs(ds, labels_dir=tmp_path / "labels")[2]
    atomic_save_npz(tmp_path / "bad.npz", cams=np.zeros((2, 4, 4), np.float16), keys=np.array([1]))
    with pytest.raises(LabelwiseError, match="2 keys|1 keys"):
        read_seeds(tmp_path / "bad.npz")


def test_train_on_labels_learns_them_and_records_them(cooc, tmp_path, monkeypatch):
    monkeypatch.setenv("LABELWISE_NO_PROGRESS", "1")
    ds = build_dataset(f"voc:{cooc}", "train")
    _all_class(ds, tmp_path / "ones", 4)
    run = api.train("_toy_seg", f"voc:{cooc}", tmp_path / "run", labels=tmp_path / "ones", show_progress=False)
    inputs = json.loads((run / "run.json").read_text())["inputs"]
    assert inputs == {"labels": str((tmp_path / "ones").resolve()), "seeds": None}
    api.infer(run, f"voc:{cooc}", "val", tmp_path / "pred", show_progress=False)
    pred = np.stack([read_label(p) for p in sorted((tmp_path / "pred").glob("*.png"))])
    assert (pred == 4).mean() > 0.95  # it learned the given labels, not the dataset's (mostly background)
    gt = api.train("_toy_seg", f"voc:{cooc}", tmp_path / "gt", show_progress=False)
    api.infer(gt, f"voc:{cooc}", "val", tmp_path / "pred_gt", show_progress=False)
    pred_gt = np.stack([read_label(p) for p in sorted((tmp_path / "pred_gt").glob("*.png"))])
    assert (pred_gt == 4).mean() < 0.5
    # resuming with other (or no) labels is refused
    with pytest.raises(LabelwiseError, match="--labels"):
        api.train("_toy_seg", f"voc:{cooc}", run, steps=30, show_progress=False)
    with pytest.raises(LabelwiseError, match="cam method trains on image-level tags only"):
        api.train("cam", f"voc:{cooc}", tmp_path / "cam", labels=tmp_path / "ones", steps=1, show_progress=False)
