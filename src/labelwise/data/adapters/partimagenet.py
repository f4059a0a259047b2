"""``partimagenet:ROOT`` — the official PartImageNet segmentation release (``PartImageNet_Seg``).

ROOT is the ``PartImageNet`` folder (or ``PartImageNet_Seg`` holding it)::

    PartImageNet/images/{train,val,test}/<wnid>_<n>.JPEG
    PartImageNet/annotations/{train,val,test}/<wnid>_<n>.png    part indices 0..39, 40 = background
    PartImageNet/annotations/{train,val,test}/{split}.json      COCO-style, categories
                                                                {id 0..39, name, supercategory}
    PartImageNet/annotations/{split}_whole/...                   (object masks; not needed)

Mapped onto the parts model: part ``v`` (0..39) -> index ``v + 1``, the release's background
40 -> 0, 255 stays ignore; 41 part classes (background + 40), and the 11 supercategories
(+ background) as the object level, derived from the parts. Part names and supercategories
come from the split's json when present, else from the built-in list (same order).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from labelwise.data.parts import ReleasePartsBase, hierarchy_arrays, pair_images_with_parts
from labelwise.data.spec import register_format
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX

SUPERCATEGORIES = ["Quadruped", "Biped", "Fish", "Bird", "Snake", "Reptile", "Car", "Bicycle", "Boat",
                   "Aeroplane", "Bottle"]
_PARTS = {
    "Quadruped": ["Head", "Body", "Foot", "Tail"], "Biped": ["Head", "Body", "Hand", "Foot", "Tail"],
    "Fish": ["Head", "Body", "Fin", "Tail"], "Bird": ["Head", "Body", "Wing", "Foot", "Tail"],
    "Snake": ["Head", "Body"], "Reptile": ["Head", "Body", "Foot", "Tail"], "Car": ["Body", "Tier", "Side Mirror"],
    "Bicycle": ["Body", "Head", "Seat", "Tier"], "Boat": ["Body", "Sail"],
    "Aeroplane": ["Head", "Body", "Engine", "Wing", "Tail"], "Bottle": ["Mouth", "Body"],
}
# (name, supercategory) of release part ids 0..39.
PARTIMAGENET_PARTS = [(f"{s} {p}", s) for s in SUPERCATEGORIES for p in _PARTS[s]]
assert len(PARTIMAGENET_PARTS) == 40
RELEASE_BACKGROUND = 40


@register_format("partimagenet")
class PartImageNetDataset(ReleasePartsBase):
    """PartImageNet_Seg release (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if not (root / "images").is_dir() and (root / "PartImageNet" / "images").is_dir():
            root = root / "PartImageNet"
        super().__init__(root, split)
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise LabelwiseError(f"{d}: not found; point partimagenet: at the PartImageNet folder of the "
                                     "PartImageNet_Seg release (holding images/ and annotations/)")
        parts = self._categories(ann_dir, split) or PARTIMAGENET_PARTS
        self._setup(*hierarchy_arrays(["background"] + SUPERCATEGORIES, parts, str(ann_dir)))
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[:RELEASE_BACKGROUND] = np.arange(1, RELEASE_BACKGROUND + 1)
        lut[RELEASE_BACKGROUND] = 0
        self._release_lut = lut
        self._images, self._parts = pair_images_with_parts(img_dir, ann_dir, (".jpeg", ".jpg", ".png"),
                                                           "restore the annotations from the release")
        self.ids = list(self._images)
        self.image_dir = img_dir

    @staticmethod
    def _categories(ann_dir: Path, split: str) -> list[tuple[str, str]] | None:
        for p in (ann_dir / f"{split}.json", ann_dir.parent / f"{split}.json"):
            if p.is_file():
                try:
                    cats = sorted(json.loads(p.read_text())["categories"], key=lambda c: c["id"])
                    if [c["id"] for c in cats] != list(range(len(cats))):
                        raise KeyError("ids")
                    return [(str(c["name"]), str(c["supercategory"])) for c in cats]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise LabelwiseError(f"{p}: expected COCO 'categories' with ids 0..N-1, name and "
                                         f"supercategory ({e}); restore the release file") from None
        return None

    def decode_label(self, key: str, raw: np.ndarray, path: Path) -> np.ndarray:
        if key != "parts":
            return raw
        counts = np.bincount(raw.reshape(-1), minlength=256)
        bad = np.flatnonzero(counts[RELEASE_BACKGROUND + 1:IGNORE_INDEX])
        if bad.size:
            raise LabelwiseError(f"{path}: label value {int(bad[0]) + RELEASE_BACKGROUND + 1} is not a PartImageNet "
                                 "part (0..39, 40 = background, 255 = ignore); restore the release file")
        return self._release_lut[raw]


__all__ = ["PartImageNetDataset", "PARTIMAGENET_PARTS", "SUPERCATEGORIES"]
