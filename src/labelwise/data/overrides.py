"""Train on another stage's outputs: ``labelwise train ... --labels PRED_DIR --seeds SEED_DIR``.

* ``--labels PRED_DIR``: per-image label PNGs (``PRED_DIR/<image_id>.png``, class indices,
  255 = ignore, e.g. the pseudo-masks of ``labelwise infer --what masks``) replace the
  dataset's ``mask``. Image-level tags still come from the dataset (its tag files or its
  own label PNGs), never from the pseudo labels.
* ``--seeds SEED_DIR``: CAM seeds (``SEED_DIR/<image_id>.npz`` with ``cams`` K x H x W and
  ``keys``, from ``--what seeds`` of any method) are added to each item as ``seeds``
  (``{"cams": float32 K x H x W, "keys": int64 K}``). A file may also hold a scalar
  ``bg_threshold`` (CoBra writes one per image, from its ViT's semantic-agnostic
  attention); it is passed through as ``seeds["bg_threshold"]`` (a float) for refiners
  that set their thresholds per image (``irn``, ``irn.thresholds: auto``).

:func:`with_stage_inputs` checks up front that every item of the split has its file, so
a run does not stop halfway on a missing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labelwise.data.base import SegDataset
from labelwise.data.files import check_label
from labelwise.errors import LabelwiseError
from labelwise.io import read_label

__all__ = ["StageInputs", "with_stage_inputs", "read_seeds"]


def read_seeds(path: str | Path) -> dict:
    """``{"cams": float32 K x H x W, "keys": int64 K}`` of a seeds ``.npz``, plus ``"bg_threshold"``
    (a float) when the file holds that scalar; errors name the file."""
    path = Path(path)
    bg = None
    try:
        with np.load(path) as z:
            cams, keys = z["cams"].astype(np.float32), np.asarray(z["keys"]).astype(np.int64).reshape(-1)
            if "bg_threshold" in z.files:
                bg = np.asarray(z["bg_threshold"])
    except (OSError, KeyError, ValueError) as e:
        raise LabelwiseError(f"{path}: not a CAM seeds file with 'cams' and 'keys' ({type(e).__name__}); "
                             "write seeds with labelwise infer RUN --what seeds") from None
    if cams.ndim != 3 or cams.shape[0] != len(keys):
        raise LabelwiseError(f"{path}: 'cams' has shape {cams.shape} but there are {len(keys)} keys; "
                             "rewrite the seeds with labelwise infer RUN --what seeds")
    out: dict = {"cams": cams, "keys": keys}
    if bg is not None:
        ok = bg.size == 1 and np.issubdtype(bg.dtype, np.number) and 0.0 <= float(bg.reshape(-1)[0]) <= 1.0
        if not ok:
            raise LabelwiseError(f"{path}: 'bg_threshold' must be one number in [0, 1], got {bg.tolist()!r}; "
                                 "rewrite the seeds with labelwise infer RUN --what seeds")
        out["bg_threshold"] = float(bg.reshape(-1)[0])
    return out


class StageInputs(SegDataset):
    """``base`` with its masks replaced by ``labels_dir`` PNGs and/or ``seeds_dir`` seeds added."""

    def __init__(self, base: SegDataset, labels_dir: Path | None, seeds_dir: Path | None):
        self.base = base
        self.labels_dir = Path(labels_dir) if labels_dir is not None else None
        self.seeds_dir = Path(seeds_dir) if seeds_dir is not None else None
        self.format = base.format

    # delegate everything else (ids, class names, tags, image paths, ...) to the base split
    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def info(self):
        return self.base.info

    def label_path(self, index: int) -> Path:
        return self.labels_dir / f"{self.base.ids[index]}.png"

    def seeds_path(self, index: int) -> Path:
        return self.seeds_dir / f"{self.base.ids[index]}.npz"

    def load_mask(self, index: int) -> np.ndarray | None:
        if self.labels_dir is None:
            return self.base.load_mask(index)
        return self._label(index, None)

    def _label(self, index: int, size) -> np.ndarray:
        path = self.label_path(index)
        label = read_label(path)
        reason = check_label(path, self.base.num_classes, size, label)
        if reason is not None:
            raise LabelwiseError(f"{path}: {reason}")
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        if self.labels_dir is not None:
            item["mask"] = self._label(index, item["image"].shape[:2])
        if self.seeds_dir is not None:
            seeds = read_seeds(self.seeds_path(index))
            if seeds["cams"].shape[1:] != item["image"].shape[:2]:
                raise LabelwiseError(f"{self.seeds_path(index)}: seeds are {seeds['cams'].shape[2]}x"
                                     f"{seeds['cams'].shape[1]} but the image is {item['image'].shape[1]}x"
                                     f"{item['image'].shape[0]} (WxH); write the seeds from this dataset")
            item["seeds"] = seeds
        return item


def _check_complete(ds: SegDataset, folder: Path, suffix: str, flag: str, what: str) -> None:
    if not folder.is_dir():
        raise LabelwiseError(f"{flag} {folder}: folder not found; pass the --out folder of "
                             f"labelwise infer RUN --what {what}")
    missing = [i for i in ds.ids if not (folder / f"{i}{suffix}").is_file()]
    if missing:
        raise LabelwiseError(f"{flag} {folder}: {len(missing)} of {len(ds)} images of split '{ds.split}' have no "
                             f"{suffix} file (first: {folder / (missing[0] + suffix)}); write them with labelwise "
                             f"infer RUN --split {ds.split} --what {what}")


def with_stage_inputs(ds: SegDataset, labels_dir: str | Path | None = None,
                      seeds_dir: str | Path | None = None) -> SegDataset:
    """``ds`` itself when neither folder is given, else a :class:`StageInputs` view of it."""
    if labels_dir is None and seeds_dir is None:
        return ds
    if labels_dir is not None:
        _check_complete(ds, Path(labels_dir), ".png", "--labels", "masks")
    if seeds_dir is not None:
        _check_complete(ds, Path(seeds_dir), ".npz", "--seeds", "seeds")
    return StageInputs(ds, labels_dir, seeds_dir)
