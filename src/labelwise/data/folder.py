"""``folder:ROOT`` — any folder of images (recursive), optionally with image-level tags.

* Ids are image paths relative to ROOT without suffix (``cats/001.jpg`` -> ``cats/001``);
  hidden files and folders are skipped.
* ``ROOT/tags.csv`` (optional): header ``image,tags``; ``image`` is the relative path with
  or without suffix, ``tags`` class names separated by ``;`` (may be empty).
* Class names: ``ROOT/class_names.txt`` when present (line 1 = background), else
  ``background`` followed by the sorted union of the names in ``tags.csv``.
* There are no masks; the split argument only labels the dataset (the folder is one split).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from labelwise.data.files import FileDataset, read_class_names
from labelwise.data.spec import register_format
from labelwise.data.tags import names_to_tags
from labelwise.errors import LabelwiseError
from labelwise.io import list_images


@register_format("folder")
class FolderDataset(FileDataset):
    """A folder of images (see module docstring)."""

    def __init__(self, root: str | Path, split: str = "train"):
        super().__init__(root, split)
        root = self.root
        files = [p for p in list_images(root) if not any(s.startswith(".") for s in p.relative_to(root).parts)]
        if not files:
            raise LabelwiseError(f"{root}: no images found (looked for jpg/png/bmp/tif/webp recursively)")
        self._files = {p.relative_to(root).with_suffix("").as_posix(): p for p in files}
        self.ids = list(self._files)
        rows = self._read_csv(root / "tags.csv")
        names_file = root / "class_names.txt"
        if names_file.is_file():
            self.class_names = read_class_names(names_file)
        elif rows is not None:
            union = sorted({n for _, _, names in rows for n in names} - {"background"})
            self.class_names = ["background"] + union
        self._tags: dict[str, np.ndarray] | None = None
        if rows is not None:
            by_path = {p.relative_to(root).as_posix(): k for k, p in self._files.items()}
            self._tags = {}
            for lineno, image, names in rows:
                key = by_path.get(image, image if image in self._files else None)
                if key is None:
                    raise LabelwiseError(f"{root / 'tags.csv'}:{lineno}: image {image!r} not found under {root}; "
                                         "fix the path (relative to the folder) or remove the line")
                self._tags[key] = names_to_tags(names, self.class_names, f"{root / 'tags.csv'}:{lineno}")

    @staticmethod
    def _read_csv(path: Path) -> list[tuple[int, str, list[str]]] | None:
        if not path.is_file():
            return None
        rows = []
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["image", "tags"]:
                raise LabelwiseError(f"{path}: first line must be the header 'image,tags'; add it")
            for lineno, row in enumerate(reader, 2):
                if not row or not row[0].strip():
                    continue
                names = [t.strip() for t in (row[1] if len(row) > 1 else "").split(";") if t.strip()]
                rows.append((lineno, row[0].strip(), names))
        return rows

    def image_path(self, index: int) -> Path:
        return self._files[self.ids[index]]

    def file_name(self, index: int) -> str:
        return self.image_path(index).relative_to(self.root).as_posix()

    def explicit_tags(self) -> dict[str, np.ndarray] | None:
        return self._tags


__all__ = ["FolderDataset"]
