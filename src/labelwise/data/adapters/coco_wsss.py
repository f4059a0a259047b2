"""``coco-wsss:ROOT`` — MS COCO 2014 as used for weakly supervised semantic segmentation.

Expected layout (the label-PNG release used by WSSS code bases)::

    ROOT/train2014/COCO_train2014_<12 digits>.jpg      (also ROOT/JPEGImages/train2014/,
    ROOT/val2014/...                                     ROOT/images/train2014/)
    ROOT/SegmentationClass/train2014/<stem>.png        (also ROOT/SegmentationClass/<stem>.png)
    ROOT/ImageSets/train.txt, val.txt                  optional id lists (also
                                                       ROOT/ImageSets/Segmentation/SPLIT.txt)

Label PNGs hold 0 = background, 1..80 = the 80 COCO categories in COCO-id order (the
standard 91 -> 80 mapping, :data:`COCO80_IDS`), 255 = ignore. Split ``train``/``val`` means
``train2014``/``val2014``. Without an id list the split is every image with a label PNG.

Without label PNGs, but with ``ROOT/annotations/instances_SPLIT2014.json``, the split is
loaded through the ``coco:`` loader (categories are then exactly the same 1..80 mapping),
so masks are rendered from the official annotations. :func:`coco91_to_80_lut` converts
label PNGs that store raw COCO ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelwise.data.files import FileDataset, read_split_file
from labelwise.data.spec import register_format
from labelwise.data.tags import read_tags_file
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX

COCO80_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
# COCO category id of each of the 80 classes, in order (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
COCO80_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
assert len(COCO80_NAMES) == len(COCO80_IDS) == 80
COCO_WSSS_CLASSES = ["background"] + COCO80_NAMES


def coco91_to_80_lut() -> np.ndarray:
    """uint8 lookup table: raw COCO id -> 1..80 (0 -> 0, 255 -> 255, unused ids -> 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[0] = 0
    for k, cid in enumerate(COCO80_IDS, 1):
        lut[cid] = k
    return lut


def _first_dir(*cands: Path) -> Path | None:
    return next((c for c in cands if c.is_dir()), None)


@register_format("coco-wsss")
class COCOWSSSDataset(FileDataset):
    """COCO 2014 label-PNG layout (see module docstring)."""

    def __new__(cls, root: str | Path, split: str = "train"):
        root = Path(root)
        name = cls.split_name(split)
        if _first_dir(root / "SegmentationClass" / name, root / "SegmentationClass") is None:
            ann = root / "annotations" / f"instances_{name}.json"
            if ann.is_file():
                from labelwise.data.coco import COCODataset

                return COCODataset(root, name)
        return super().__new__(cls)

    @staticmethod
    def split_name(split: str) -> str:
        return {"train": "train2014", "val": "val2014"}.get(split, split)

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__(root, split)
        root, name = self.root, self.split_name(split)
        self.class_names = list(COCO_WSSS_CLASSES)
        img_dir = _first_dir(root / name, root / "JPEGImages" / name, root / "images" / name)
        if img_dir is None:
            raise LabelwiseError(f"{root / name}: image folder not found (also looked in JPEGImages/{name}, "
                                 f"images/{name}); point coco-wsss: at the COCO 2014 root")
        lab_dir = _first_dir(root / "SegmentationClass" / name, root / "SegmentationClass")
        if lab_dir is None:
            raise LabelwiseError(f"{root / 'SegmentationClass' / name}: label PNG folder not found and no "
                                 f"annotations/instances_{name}.json; add the WSSS label PNGs")
        self.image_dir, self.label_dir = img_dir, lab_dir
        list_file = next((p for p in (root / "ImageSets" / f"{split}.txt", root / "ImageSets" / f"{name}.txt",
                                      root / "ImageSets" / "Segmentation" / f"{split}.txt") if p.is_file()), None)
        if list_file is not None:
            self.ids = read_split_file(list_file)
        else:
            self.ids = sorted(p.stem for p in lab_dir.glob("*.png") if p.stem.startswith(f"COCO_{name}_")
                              or lab_dir.name == name)
            if not self.ids:
                raise LabelwiseError(f"{lab_dir}: no label PNGs for split {name}; the split is empty")
        missing = [i for i in self.ids if not (img_dir / f"{i}.jpg").is_file()]
        if missing:
            src = list_file or lab_dir
            raise LabelwiseError(f"{src}: {len(missing)} id(s) without an image in {img_dir} "
                                 f"(first: {missing[0]!r}); add the images or remove the ids")

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.ids[index]}.jpg"

    def label_files(self, index: int) -> list[tuple[str, Path, int]]:
        return [("mask", self.label_dir / f"{self.ids[index]}.png", self.num_classes)]

    def explicit_tags(self):
        p = self.root / "ImageSets" / "Tags" / f"{self.split}.txt"
        return read_tags_file(p, self.class_names) if p.is_file() else None


__all__ = ["COCOWSSSDataset", "COCO80_NAMES", "COCO80_IDS", "COCO_WSSS_CLASSES", "coco91_to_80_lut"]
