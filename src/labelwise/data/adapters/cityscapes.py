"""``cityscapes:ROOT`` — Cityscapes, the official layout (OAP's zero-shot semantic, instance and
panoptic evaluation)::

    ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     label ids 0..33
    ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png  id x 1000 + k for
                                                                                 instances, else the label id

Classes are the 19 evaluation classes (``trainId`` 0..18) behind a ``background`` class 0 that no
pixel takes: masks hold ``trainId + 1``, every other label id is ignore (255), so the semantic
mIoU is the usual 19-class one. Instances are the eight classes with instances (person, rider,
car, truck, bus, train, motorcycle, bicycle); thing pixels without an instance id are a crowd
region. For instance and panoptic evaluation the split's ground truth is turned once into a COCO
instances file (RLE) under ``$LABELWISE_CACHE/cityscapes/`` -- never inside the dataset -- and the
split is then a COCO split (``coco:`` machinery: ``--split val`` of ``evaluate instance`` /
``panoptic``, ``show --gt``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from labelwise.data.coco import COCODataset
from labelwise.data.spec import register_format
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json
from labelwise.utils import progress

# (label id, name, has instances) of the 19 evaluation classes, in trainId order
CITYSCAPES_CLASSES = [
    (7, "road", False), (8, "sidewalk", False), (11, "building", False), (12, "wall", False), (13, "fence", False),
    (17, "pole", False), (19, "traffic light", False), (20, "traffic sign", False), (21, "vegetation", False),
    (22, "terrain", False), (23, "sky", False), (24, "person", True), (25, "rider", True), (26, "car", True),
    (27, "truck", True), (28, "bus", True), (31, "train", True), (32, "motorcycle", True), (33, "bicycle", True),
]


def label_lut() -> np.ndarray:
    """label id (0..255) -> mask value: trainId + 1 for the 19 classes, 255 otherwise."""
    lut = np.full(256, 255, dtype=np.uint8)
    for k, (lid, _, _) in enumerate(CITYSCAPES_CLASSES):
        lut[lid] = k + 1
    return lut


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, ValueError) as e:
        raise LabelwiseError(f"{path}: unreadable ground-truth PNG ({e}); re-extract gtFine") from None


def build_coco_json(root: Path, split: str, out: Path, show_progress: bool = True) -> None:
    """The COCO instances file of a Cityscapes split: one annotation per instance, per stuff region
    and per crowd region of a thing class (RLE), categories 1..19 in trainId order."""
    from labelwise.masks import encode_masks, mask_to_bbox

    images_root = root / "leftImg8bit" / split
    files = sorted(images_root.glob("*/*_leftImg8bit.png"))
    if not files:
        raise LabelwiseError(f"{images_root}: no <city>/*_leftImg8bit.png images; point cityscapes: at the folder "
                             "holding leftImg8bit/ and gtFine/")
    lut = label_lut()
    images, anns = [], []
    for iid, f in enumerate(progress(files, desc=f"cityscapes {split} ground truth") if show_progress else files, 1):
        stem = f.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / f.parent.name / f"{stem}_gtFine_instanceIds.png"
        if not gt.is_file():
            raise LabelwiseError(f"{gt}: missing; the gtFine download is incomplete (or pick a split with labels)")
        inst = _read_png(gt).astype(np.int64)
        h, w = inst.shape
        images.append({"id": iid, "file_name": f"{f.parent.name}/{f.name}", "height": h, "width": w})
        label = np.where(inst >= 1000, inst // 1000, inst)
        cls = lut[np.clip(label, 0, 255)]
        masks, meta = [], []
        for v in np.unique(inst):
            c = int(cls[inst == v].flat[0]) if v < 1000 else int(lut[min(int(v) // 1000, 255)])
            if c == 255:
                continue
            thing = CITYSCAPES_CLASSES[c - 1][2]
            masks.append(inst == v)
            meta.append((c, bool(thing and v < 1000)))  # a thing class without an instance id: crowd
        if masks:
            stack = np.stack(masks)
            boxes = mask_to_bbox(stack)
            for m, rle, box, (c, crowd) in zip(stack, encode_masks(stack), boxes, meta):
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": c, "segmentation": rle,
                             "area": int(m.sum()), "bbox": [float(x) for x in box], "iscrowd": int(crowd)})
    cats = [{"id": k + 1, "name": n, "isthing": int(t), "supercategory": "cityscapes"}
            for k, (_, n, t) in enumerate(CITYSCAPES_CLASSES)]
    atomic_write_json(out, {"images": images, "annotations": anns, "categories": cats}, indent=None)


@register_format("cityscapes")
class CityscapesDataset(COCODataset):
    """Cityscapes split (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root).expanduser()
        if not (root / "leftImg8bit").is_dir():
            raise LabelwiseError(f"{root}: no leftImg8bit/ folder; point cityscapes: at the folder holding "
                                 "leftImg8bit/ and gtFine/")
        ann = self._ground_truth_json(root, split)
        super().__init__(f"{ann},{root / 'leftImg8bit' / split}", split)
        self.root = root
        self._lut = label_lut()

    @staticmethod
    def _ground_truth_json(root: Path, split: str) -> Path:
        from labelwise.data.tags import cache_root

        gt_dir = root / "gtFine" / split
        if not gt_dir.is_dir():
            raise LabelwiseError(f"{gt_dir}: not found; Cityscapes needs gtFine/ beside leftImg8bit/ (the test "
                                 "split has no public labels)")
        stamp = max((p.stat().st_mtime_ns for p in gt_dir.glob("*/*_instanceIds.png")), default=0)
        key = hashlib.sha1(f"{root.resolve()}|{split}|{stamp}".encode()).hexdigest()[:16]
        out = cache_root() / "cityscapes" / f"{key}-{split}.json"
        if not out.is_file():
            build_coco_json(root, split, out)
        return out

    def _render(self, index: int) -> tuple[np.ndarray, list[dict]]:
        """The semantic map from the label ids (void = 255, not background), instances from the COCO
        annotations."""
        _, inst = super()._render(index)
        im = self._images[index]
        city, name = im["file_name"].split("/", 1)
        lab = self.root / "gtFine" / self.split / city / name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        return self._lut[_read_png(lab).astype(np.int64).clip(0, 255)], inst


__all__ = ["CityscapesDataset", "CITYSCAPES_CLASSES", "build_coco_json", "label_lut"]
