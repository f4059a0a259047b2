"""``vocaug:ROOT`` — PASCAL VOC 2012 with the SBD augmentation (the standard WSSS training set).

ROOT may be ``VOC2012``, ``VOCdevkit`` (holding ``VOC2012/``) or the folder holding
``VOCdevkit/VOC2012``. Expected release layout::

    VOC2012/JPEGImages/<id>.jpg                 17,125 images (VOC2012 trainval + SBD)
    VOC2012/SegmentationClassAug/<id>.png       SBD-augmented labels (0..20, 255)
    VOC2012/SegmentationClass/<id>.png          official labels (used if Aug lacks an id)
    VOC2012/ImageSets/Segmentation/train_aug.txt   10,582 ids (also accepted: trainaug.txt,
                                                ImageSets/SegmentationAug/train_aug.txt;
                                                lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
                                                are reduced to the id)
    VOC2012/ImageSets/Segmentation/val.txt      1,449 ids

Split ``train`` means ``train_aug``; other names (``val``, ``trainval``, ``train_aug``) are
files under ``ImageSets/Segmentation``. Labels come from ``SegmentationClassAug`` first.
"""

from __future__ import annotations

from pathlib import Path

from labelwise.data.spec import register_format
from labelwise.data.voc import VOCDataset
from labelwise.errors import LabelwiseError

TRAIN_AUG_SIZE = 10582


@register_format("vocaug")
class VOCAugDataset(VOCDataset):
    label_dirs = ("SegmentationClassAug", "SegmentationClass")

    @classmethod
    def find_root(cls, root: Path) -> Path:
        for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
            if (cand / "JPEGImages").is_dir():
                return cand
        raise LabelwiseError(f"{root}: no VOC2012/JPEGImages found; point vocaug: at VOC2012, VOCdevkit "
                             "or the folder holding VOCdevkit/VOC2012")

    def split_file(self, split: str) -> Path:
        seg = self.root / "ImageSets" / "Segmentation"
        if split in ("train", "train_aug", "trainaug"):
            cands = [seg / "train_aug.txt", seg / "trainaug.txt",
                     self.root / "ImageSets" / "SegmentationAug" / "train_aug.txt"]
            for c in cands:
                if c.is_file():
                    return c
            raise LabelwiseError(f"{cands[0]}: SBD train_aug list not found ({TRAIN_AUG_SIZE} ids); "
                                 "add it from the SBD augmentation release")
        return seg / f"{split}.txt"


__all__ = ["VOCAugDataset", "TRAIN_AUG_SIZE"]
