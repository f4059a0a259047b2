"""``voc:ROOT`` — PASCAL VOC layout.

::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png       (or SegmentationClassAug/<id>.png)
    ROOT/ImageSets/Segmentation/<split>.txt   one id per line
    ROOT/class_names.txt                  optional, one name per line, line 1 = background
    ROOT/ImageSets/Tags/<split>.txt       optional, "image_id cls cls ..." (names or indices)

Label PNGs hold class indices (palette or grayscale), 0 = background, 255 = ignore. For
each id the label is taken from ``SegmentationClass/`` when it has the file, else from
``SegmentationClassAug/``. A split whose ids have no label at all (e.g. ``test``) is
unlabelled (items carry no ``mask``); a split where only some ids have labels is an error.
Tags come from ``ImageSets/Tags/<split>.txt`` when present (those lines win), else they are
derived from the split's labels (:mod:`labelwise.data.tags`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelwise.data.files import FileDataset, read_class_names, read_split_file
from labelwise.data.spec import register_format
from labelwise.data.tags import read_tags_file
from labelwise.errors import LabelwiseError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@register_format("voc")
class VOCDataset(FileDataset):
    """PASCAL VOC style split (see module docstring)."""

    label_dirs = ("SegmentationClass", "SegmentationClassAug")
    split_aliases: dict[str, str] = {}

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__(self.find_root(Path(root)), split)
        root = self.root
        if not (root / "JPEGImages").is_dir():
            raise LabelwiseError(f"{root}: no JPEGImages/ folder; point voc: at the VOC root "
                                 "(the folder holding JPEGImages/ and ImageSets/)")
        names = root / "class_names.txt"
        self.class_names = read_class_names(names) if names.is_file() else list(VOC_CLASSES)
        split_file = self.split_file(split)
        self.ids = read_split_file(split_file, root / "ImageSets" / "Segmentation")
        self.split_path = split_file
        self._image_dir = root / "JPEGImages"
        self._image_files = self._index(self._image_dir)
        missing = [i for i in self.ids if i not in self._image_files]
        if missing:
            raise LabelwiseError(f"{split_file}: lists {len(missing)} id(s) without an image in {self._image_dir} "
                                 f"(first: {missing[0]!r}); remove them from the split or add the images")
        label_index = {d: self._index(root / d, (".png",)) for d in self.label_dirs if (root / d).is_dir()}
        self._labels: dict[str, Path] = {}
        for i in self.ids:
            for d, idx in label_index.items():
                if i in idx:
                    self._labels[i] = idx[i]
                    break
        if self._labels and len(self._labels) != len(self.ids):
            first = next(i for i in self.ids if i not in self._labels)
            raise LabelwiseError(f"{split_file}: id {first!r} has no label PNG in "
                                 f"{' or '.join(label_index)}; add it or remove the id from the split")
        self._explicit_tags = self.explicit_tags() or {}  # parse now: tag-file errors surface at build time

    # ---- layout hooks (adapters override)
    @classmethod
    def find_root(cls, root: Path) -> Path:
        return root

    def split_file(self, split: str) -> Path:
        split = self.split_aliases.get(split, split)
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    @staticmethod
    def _index(folder: Path, suffixes=IMAGE_SUFFIXES) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        out: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.suffix in suffixes and p.stem not in out:
                out[p.stem] = p
        return out

    # ---- FileDataset API
    def image_path(self, index: int) -> Path:
        return self._image_files[self.ids[index]]

    def label_files(self, index: int) -> list[tuple[str, Path, int]]:
        p = self._labels.get(self.ids[index])
        return [("mask", p, self.num_classes)] if p is not None else []

    def explicit_tags(self) -> dict[str, np.ndarray] | None:
        p = self.root / "ImageSets" / "Tags" / f"{self.split}.txt"
        return read_tags_file(p, self.class_names) if p.is_file() else None


__all__ = ["VOCDataset", "VOC_CLASSES"]
