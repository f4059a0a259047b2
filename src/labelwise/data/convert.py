"""Official downloads -> the layouts the loaders read (``labelwise data convert KIND SRC OUT``).

``sbd``: the Semantic Boundaries Dataset (Hariharan et al. 2011, ``benchmark_RELEASE/``) into a
PASCAL VOC 2012 tree, the standard WSSS training set (``vocaug:``)::

    SRC/dataset/cls/<id>.mat     MATLAB struct GTcls, field Segmentation (H x W class indices)
    SRC/dataset/img/<id>.jpg
    SRC/dataset/{train,val}.txt  ids

    OUT (= the VOC2012 folder, holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)
      SegmentationClassAug/<id>.png   every SBD label (VOC palette); VOC's own labels are read
                                      from SegmentationClass/ for the ids SBD lacks
      JPEGImages/<id>.jpg             SBD images VOC lacks, copied
      ImageSets/Segmentation/train_aug.txt
                                      (SBD train + SBD val + VOC train) minus VOC val, sorted

With the full downloads this gives the usual 10,582 training ids. Existing files are kept
(a re-run completes an interrupted conversion); writes are atomic.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_text, write_label
from labelwise.utils import progress

__all__ = ["convert_sbd", "read_sbd_label", "CONVERTERS"]


def read_sbd_label(path: Path) -> np.ndarray:
    """The class-index map of one SBD ``cls/<id>.mat`` (``GTcls.Segmentation``), uint8."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:  # noqa: BLE001 -- scipy raises MatReadError and friends on a bad file
        raise LabelwiseError(f"{path}: not an SBD class file (expected a MATLAB struct GTcls with a Segmentation "
                             f"field: {e}); pass the benchmark_RELEASE folder of the SBD download") from None
    if seg.ndim != 2 or seg.size == 0 or seg.max() > 255:
        raise LabelwiseError(f"{path}: GTcls.Segmentation is not an H x W class-index map")
    return seg.astype(np.uint8)


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise LabelwiseError(f"{path}: id list not found")
    return [s.split()[0] for s in path.read_text().splitlines() if s.strip()]


def convert_sbd(src: str | Path, out: str | Path, show_progress: bool = True) -> dict:
    """Write SBD's labels, images and ``train_aug.txt`` into the VOC 2012 folder ``out`` (see the
    module doc). Returns counts."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    ds = src / "dataset" if (src / "dataset").is_dir() else src
    if not (ds / "cls").is_dir():
        raise LabelwiseError(f"{src}: no dataset/cls/ folder; pass the benchmark_RELEASE folder of the SBD download")
    voc = out / "VOC2012" if (out / "VOC2012" / "JPEGImages").is_dir() else out
    sets = voc / "ImageSets" / "Segmentation"
    if not (voc / "JPEGImages").is_dir() or not (sets / "val.txt").is_file():
        raise LabelwiseError(f"{out}: not a VOC 2012 folder (JPEGImages/ and ImageSets/Segmentation/val.txt needed); "
                             "pass the VOC2012 folder of the VOCtrainval_11-May-2012 download")
    sbd_ids = sorted({*_ids(ds / "train.txt"), *_ids(ds / "val.txt")})
    aug = voc / "SegmentationClassAug"
    aug.mkdir(parents=True, exist_ok=True)
    written = copied = 0
    for i in progress(sbd_ids, desc="sbd labels") if show_progress else sbd_ids:
        dst = aug / f"{i}.png"
        if not dst.is_file():
            write_label(dst, read_sbd_label(ds / "cls" / f"{i}.mat"))
            written += 1
        img = voc / "JPEGImages" / f"{i}.jpg"
        if not img.is_file():
            src_img = ds / "img" / f"{i}.jpg"
            if not src_img.is_file():
                raise LabelwiseError(f"{src_img}: SBD image missing; the download is incomplete")
            tmp = img.with_name(f".{img.name}.tmp")
            shutil.copyfile(src_img, tmp)
            tmp.replace(img)
            copied += 1
    val = set(_ids(sets / "val.txt"))
    voc_train = _ids(sets / "train.txt") if (sets / "train.txt").is_file() else []
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - val)
    atomic_write_text(sets / "train_aug.txt", "".join(f"{i}\n" for i in train_aug))
    return {"sbd_ids": len(sbd_ids), "labels_written": written, "images_copied": copied,
            "train_aug": len(train_aug), "out": str(voc)}


CONVERTERS = {"sbd": convert_sbd}
