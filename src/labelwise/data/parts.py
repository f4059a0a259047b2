"""``parts:ROOT`` — part segmentation with an object level.

::

    ROOT/hierarchy.json        {"objects": ["background", ...],
                                "parts": [{"name": "background", "object": "background"},
                                          {"name": "...", "object": "..."}, ...]}
    ROOT/images/SPLIT/<id>.<ext>
    ROOT/parts/SPLIT/<id>.png   part indices (0 = background, 255 = ignore)
    ROOT/objects/SPLIT/<id>.png object indices (optional: derived from parts when absent)

Parts are listed in index order. Index 0 is background; a hierarchy whose first part is
not named ``background`` gets one prepended (so ``parts`` may list only the foreground
parts). Ids are image paths relative to ``images/SPLIT`` without suffix. Items carry
``parts``, ``objects`` and ``mask`` (= ``objects``: the semantic level is the object level,
so ``class_names == object_names``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from labelwise.data.base import DatasetInfo
from labelwise.data.files import FileDataset
from labelwise.data.spec import register_format
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX, IMAGE_EXTENSIONS


def load_hierarchy(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(object_names, part_names, part_to_object)`` from a hierarchy.json."""
    if not path.is_file():
        raise LabelwiseError(f"{path}: hierarchy file not found; create it with 'objects' and 'parts' lists")
    try:
        h = json.loads(path.read_text())
        objects = [str(o) for o in h["objects"]]
        parts = [(str(p["name"]), str(p["object"])) for p in h["parts"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LabelwiseError(f"{path}: expected {{\"objects\": [...], \"parts\": [{{\"name\", \"object\"}}]}} "
                             f"({type(e).__name__}: {e}); fix the file") from None
    return hierarchy_arrays(objects, parts, str(path))


def hierarchy_arrays(objects: list[str], parts: list[tuple[str, str]], where: str):
    if not objects or objects[0] != "background":
        objects = ["background"] + objects
    if not parts or parts[0][0] != "background":
        parts = [("background", "background")] + parts
    index = {o: i for i, o in enumerate(objects)}
    p2o = np.zeros(len(parts), dtype=np.int64)
    for k, (name, obj) in enumerate(parts):
        if obj not in index:
            raise LabelwiseError(f"{where}: part {name!r} belongs to object {obj!r}, which is not in 'objects'; "
                                 f"add it or use one of: {', '.join(objects[1:])}")
        p2o[k] = index[obj]
    if len(parts) > 255 or len(objects) > 255:
        raise LabelwiseError(f"{where}: more than 255 parts/objects do not fit uint8 labels")
    return objects, [p for p, _ in parts], p2o


def _list_split(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes and not any(s.startswith(".") for s in p.relative_to(folder).parts):
            out.setdefault(p.relative_to(folder).with_suffix("").as_posix(), p)
    return out


def pair_images_with_parts(img_dir: Path, ann_dir: Path, image_suffixes: tuple[str, ...],
                           fix: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images of a release split and their part PNGs (by id); every image must have one."""
    images = _list_split(img_dir, image_suffixes)
    if not images:
        raise LabelwiseError(f"{img_dir}: no images; the split is empty")
    parts = _list_split(ann_dir, (".png",))
    missing = [i for i in images if i not in parts]
    if missing:
        raise LabelwiseError(f"{ann_dir}: no part PNG for image {missing[0]!r} ({len(missing)} missing); {fix}")
    return images, parts


class PartsBase(FileDataset):
    """Shared part/object machinery; subclasses set names, ``ids`` and the per-id files."""

    mask_key = "objects"

    def _setup(self, object_names, part_names, part_to_object) -> None:
        self.object_names = list(object_names)
        self.class_names = self.object_names
        self.part_names = list(part_names)
        self.part_to_object = np.asarray(part_to_object, dtype=np.int64)
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[: len(self.part_to_object)] = self.part_to_object
        self._p2o_lut = lut

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(class_names=list(self.object_names), part_names=list(self.part_names),
                           part_to_object=[int(x) for x in self.part_to_object])

    def part_files(self, index: int) -> Path | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def object_files(self, index: int) -> Path | None:
        return None

    def label_files(self, index: int) -> list[tuple[str, Path, int]]:
        out = []
        p = self.part_files(index)
        if p is not None:
            out.append(("parts", p, self.num_parts))
        o = self.object_files(index)
        if o is not None:
            out.append(("objects", o, len(self.object_names)))
        return out

    def parts_to_objects(self, parts: np.ndarray) -> np.ndarray:
        """Object map implied by a part map (background -> 0, ignore -> 255)."""
        return self._p2o_lut[parts]

    def load_parts(self, index: int) -> np.ndarray | None:
        p = self.part_files(index)
        return None if p is None else self._read("parts", p, self.num_parts, None)

    def load_objects(self, index: int) -> np.ndarray | None:
        o = self.object_files(index)
        if o is not None:
            return self._read("objects", o, len(self.object_names), None)
        parts = self.load_parts(index)
        return None if parts is None else self.parts_to_objects(parts)

    def load_mask(self, index: int) -> np.ndarray | None:
        return self.load_objects(index)

    def load_labels(self, index: int, size=None) -> dict[str, np.ndarray]:
        out = super().load_labels(index, size)
        if "parts" in out and "objects" not in out:
            out["objects"] = self.parts_to_objects(out["parts"])
        if "objects" in out:
            out["mask"] = out["objects"]
        return out

    def has_masks(self) -> bool:
        return len(self) > 0 and bool(self.label_files(0))

    def label_signature_files(self) -> list[Path]:
        return [p for i in range(len(self)) for _, p, _ in self.label_files(i)]


class ReleasePartsBase(PartsBase):
    """A release laid out as an image folder plus a part-PNG folder per split; subclasses set
    ``image_dir`` and ``_images``/``_parts`` (id -> path, from :func:`pair_images_with_parts`)."""

    def image_path(self, index: int) -> Path:
        return self._images[self.ids[index]]

    def file_name(self, index: int) -> str:
        return self.image_path(index).relative_to(self.image_dir).as_posix()

    def part_files(self, index: int) -> Path | None:
        return self._parts[self.ids[index]]


@register_format("parts")
class PartsDataset(PartsBase):
    """Generic parts layout (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__(root, split)
        root = self.root
        self._setup(*load_hierarchy(root / "hierarchy.json"))
        img_dir = root / "images" / split
        if not img_dir.is_dir():
            avail = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
            raise LabelwiseError(f"{img_dir}: split folder not found; "
                                 + (f"available splits: {', '.join(avail)}" if avail else "expected ROOT/images/SPLIT/"))
        self._images = _list_split(img_dir, IMAGE_EXTENSIONS)
        if not self._images:
            raise LabelwiseError(f"{img_dir}: no images; the split is empty")
        self.ids = list(self._images)
        self._parts = _list_split(root / "parts" / split, (".png",))
        self._objects = _list_split(root / "objects" / split, (".png",))
        for kind, idx in (("parts", self._parts), ("objects", self._objects)):
            if idx:
                missing = [i for i in self.ids if i not in idx]
                if missing:
                    raise LabelwiseError(f"{root / kind / split}: no label PNG for image {missing[0]!r} "
                                         f"({len(missing)} missing); add the labels or remove the images")

    def image_path(self, index: int) -> Path:
        return self._images[self.ids[index]]

    def file_name(self, index: int) -> str:
        return self.image_path(index).relative_to(self.root / "images" / self.split).as_posix()

    def part_files(self, index: int) -> Path | None:
        return self._parts.get(self.ids[index])

    def object_files(self, index: int) -> Path | None:
        return self._objects.get(self.ids[index])


__all__ = ["PartsDataset", "PartsBase", "load_hierarchy", "hierarchy_arrays"]
