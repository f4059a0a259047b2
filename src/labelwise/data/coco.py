"""``coco:...`` — COCO instance annotations (polygons or RLE) as semantic + instance items.

Three ways to point at the data (tried in this order):

1. explicit paths, ``coco:ANNOTATIONS.json,IMAGE_DIR`` (comma-separated), e.g.
   ``coco:/data/coco/annotations/instances_val2017.json,/data/coco/val2017``; the split
   argument is then only a label;
2. ``coco:ANNOTATIONS.json`` alone: images are looked up in ``<json>/../../<name>``,
   ``<json>/../../images/<name>`` or ``<json>/../<name>`` where ``<name>`` is the json stem
   without ``instances_`` (``instances_val2017.json`` -> ``val2017``);
3. ``coco:ROOT`` with split ``SPLIT``: annotations ``ROOT/annotations/instances_SPLIT.json``
   and images ``ROOT/images/SPLIT/`` (labelwise layout) or ``ROOT/SPLIT/`` (official COCO
   layout, e.g. ``ROOT/train2017``). Split ``train``/``val`` fall back to ``train2017``/
   ``val2017`` and then ``train2014``/``val2014`` when ``instances_train.json`` is absent.

Categories are sorted by COCO id and mapped to contiguous indices ``1..K`` (0 =
background); :attr:`COCODataset.category_ids` is the inverse map (``category_ids[k]`` = COCO
id of index ``k``, ``category_ids[0] = 0``). The semantic ``mask`` paints every annotation
(crowd regions included) in *decreasing area* order, so where annotations overlap the
smaller one wins (ties: the later annotation in the file wins). ``instances`` lists the
annotations of *thing* categories (``isthing`` absent or 1); categories with ``isthing: 0``
(stuff) only appear in the semantic mask. Tags are the categories annotated on the image.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from labelwise.data.files import FileDataset, image_size
from labelwise.data.spec import register_format
from labelwise.errors import LabelwiseError
from labelwise.io import read_image


def annotation_mask(segmentation: Any, h: int, w: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygons, uncompressed or compressed RLE) to a bool ``H x W``;
    ``ValueError`` naming the problem for one that cannot be decoded faithfully."""
    from labelwise.masks import segmentation_problem

    problem = segmentation_problem(segmentation, h, w)
    if problem is not None:
        raise ValueError(problem)
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def resolve_coco_paths(root: Path, split: str) -> tuple[Path, Path, Path, str]:
    """``(annotation_json, image_dir, dataset_root, split_name)`` for a ``coco:`` path (see module doc)."""
    s = str(root)
    if "," in s:
        a, b = s.split(",", 1)
        ann, img = Path(a).expanduser(), Path(b).expanduser()
        if not ann.is_file():
            raise LabelwiseError(f"{ann}: COCO annotation file not found; write coco:ANNOTATIONS.json,IMAGE_DIR")
        if not img.is_dir():
            raise LabelwiseError(f"{img}: image folder not found; write coco:ANNOTATIONS.json,IMAGE_DIR")
        return ann, img, ann.parent.parent, split
    if root.suffix == ".json":
        if not root.is_file():
            raise LabelwiseError(f"{root}: COCO annotation file not found; check the path")
        name = root.stem[len("instances_"):] if root.stem.startswith("instances_") else root.stem
        for cand in (root.parent.parent / name, root.parent.parent / "images" / name, root.parent / name):
            if cand.is_dir():
                return root, cand, root.parent.parent, name
        raise LabelwiseError(f"{root}: no image folder {name}/ next to the annotations; "
                             "give it explicitly as coco:ANNOTATIONS.json,IMAGE_DIR")
    if not root.is_dir():
        raise LabelwiseError(f"{root}: dataset folder not found; check the coco: path")
    names = [split]
    if split in ("train", "val", "test"):
        names += [f"{split}2017", f"{split}2014"]
    for name in names:
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            for img in (root / "images" / name, root / name):
                if img.is_dir():
                    return ann, img, root, name
            raise LabelwiseError(f"{ann}: found, but no image folder {root / 'images' / name} or {root / name}; "
                                 "add the images")
    avail = sorted(p.stem[len("instances_"):] for p in (root / "annotations").glob("instances_*.json"))
    hint = f"available splits: {', '.join(avail)}" if avail else "expected annotations/instances_SPLIT.json"
    raise LabelwiseError(f"{root / 'annotations' / f'instances_{split}.json'}: not found; {hint}")


@register_format("coco")
class COCODataset(FileDataset):
    """COCO json split (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "train"):
        ann, img_dir, ds_root, name = resolve_coco_paths(Path(root), split)
        super().__init__(ds_root, split)
        self.split_name = name
        self.annotation_file = ann
        self.image_dir = img_dir
        self._coco = None
        try:
            data = json.loads(ann.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LabelwiseError(f"{ann}: not valid JSON ({e}); re-export the annotations") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise LabelwiseError(f"{ann}: missing the {key!r} list of a COCO instances file; re-export it")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if len(cats) > 254:
            raise LabelwiseError(f"{ann}: {len(cats)} categories do not fit uint8 masks (max 254)")
        self.category_ids: list[int] = [0] + [int(c["id"]) for c in cats]
        self.class_names = ["background"] + [str(c["name"]) for c in cats]
        self.cat_index = {int(c["id"]): k for k, c in enumerate(cats, 1)}
        self.isthing = [False] + [bool(c.get("isthing", 1)) for c in cats]
        self._images: list[dict] = list(data["images"])
        if not self._images:
            raise LabelwiseError(f"{ann}: the split has no images; add images or pick another split")
        by_img: dict[int, list[dict]] = {int(im["id"]): [] for im in self._images}
        for a in data["annotations"]:
            if a.get("category_id") not in self.cat_index:
                raise LabelwiseError(f"{ann}: annotation {a.get('id')} has category_id {a.get('category_id')} "
                                     "missing from 'categories'; fix the annotation or add the category")
            if a.get("image_id") not in by_img:
                raise LabelwiseError(f"{ann}: annotation {a.get('id')} refers to image_id {a.get('image_id')} "
                                     "missing from 'images'; fix the annotation")
            by_img[a["image_id"]].append(a)
        self._anns = by_img
        self.ids = [Path(im["file_name"]).with_suffix("").as_posix() for im in self._images]
        if len(set(self.ids)) != len(self.ids):
            self.ids = [str(im["id"]) for im in self._images]

    # ---- pycocotools object, built lazily
    @property
    def coco(self):
        if self._coco is None:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(_io.StringIO()):
                self._coco = COCO(str(self.annotation_file))
        return self._coco

    @property
    def coco_image_ids(self) -> list[int]:
        return [int(im["id"]) for im in self._images]

    def subset(self, keep: list[int]) -> None:
        self._images = [self._images[i] for i in keep]
        super().subset(keep)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[index]["file_name"]

    def file_name(self, index: int) -> str:
        return str(self._images[index]["file_name"])

    def annotations(self, index: int) -> list[dict]:
        return self._anns[int(self._images[index]["id"])]

    def _render(self, index: int) -> tuple[np.ndarray, list[dict]]:
        im = self._images[index]
        h, w = int(im["height"]), int(im["width"])
        sem = np.zeros((h, w), dtype=np.uint8)
        decoded = []
        for a in self.annotations(index):
            try:
                m = annotation_mask(a["segmentation"], h, w)
            except Exception as e:
                raise LabelwiseError(f"{self.annotation_file}: annotation {a.get('id')} has an undecodable "
                                     f"segmentation ({e}); fix or remove it") from None
            area = float(a["area"]) if "area" in a else float(m.sum())
            decoded.append((a, m, area))
        order = sorted(range(len(decoded)), key=lambda j: -decoded[j][2])  # stable: later wins ties
        for j in order:
            a, m, _ = decoded[j]
            sem[m] = self.cat_index[a["category_id"]]
        inst = []
        for a, m, _ in decoded:
            k = self.cat_index[a["category_id"]]
            if self.isthing[k]:
                inst.append({"category": k, "category_id": int(a["category_id"]), "mask": m,
                             "iscrowd": bool(a.get("iscrowd", 0)), "id": a.get("id"), "bbox": a.get("bbox")})
        return sem, inst

    def load_mask(self, index: int) -> np.ndarray:
        return self._render(index)[0]

    def load_instances(self, index: int) -> list[dict]:
        return self._render(index)[1]

    def tags(self, index: int) -> np.ndarray:
        t = np.zeros(self.num_classes - 1, dtype=np.float32)
        for a in self.annotations(index):
            t[self.cat_index[a["category_id"]] - 1] = 1.0
        return t

    def has_masks(self) -> bool:
        return True

    def label_signature_files(self) -> list[Path]:
        return [self.annotation_file]

    def _size_reason(self, index: int, size: tuple[int, int]) -> str | None:
        im = self._images[index]
        if tuple(size) != (int(im["height"]), int(im["width"])):
            return (f"image is {size[1]}x{size[0]} but {self.annotation_file.name} says "
                    f"{im['width']}x{im['height']} (WxH); fix the annotation or the image")
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        path = self.image_path(index)
        image = read_image(path)
        reason = self._size_reason(index, image.shape[:2])
        if reason:
            raise LabelwiseError(f"{path}: {reason}")
        sem, inst = self._render(index)
        return {"image_id": self.ids[index], "file_name": self.file_name(index), "image": image,
                "mask": sem, "tags": self.tags(index), "instances": inst}

    def check_item(self, index: int, decode: bool = False) -> list[tuple[str, str]]:
        path = self.image_path(index)
        size, reason = image_size(path, decode)
        if reason is None:
            reason = self._size_reason(index, size)
        if reason is None:
            try:
                self._render(index)
            except LabelwiseError as e:
                return [(str(self.annotation_file), str(e).split(": ", 1)[-1])]
            return []
        return [(str(path), reason)]


__all__ = ["COCODataset", "annotation_mask", "resolve_coco_paths"]
