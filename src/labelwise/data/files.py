"""The file-backed dataset base every built-in loader extends, and per-file checks.

:class:`FileDataset`: an id list, per-item image/label paths, label checks (size, value
range) and image-level tags (explicit, or derived from the label PNGs). The checks
(:func:`image_size`, :func:`check_label`) are shared by loading, ``--skip-bad`` and
``labelwise data check``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from labelwise.data.base import SegDataset
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX, read_image, read_label

# --------------------------------------------------------------------------- per-file checks


def image_header_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """``((H, W), None)`` from the image header (EXIF rotation applied), or ``(None, reason)``."""
    if not path.is_file():
        return None, "image file missing"
    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable: reopen for EXIF
            try:
                orient = im.getexif().get(0x0112, 1)
            except Exception:
                orient = 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError) as e:
        return None, f"corrupt or unreadable image ({type(e).__name__})"
    if orient in (5, 6, 7, 8):
        h, w = w, h
    return (h, w), None


def image_size(path: Path, decode: bool = False) -> tuple[tuple[int, int] | None, str | None]:
    """Like :func:`image_header_size`; with ``decode`` the whole image is decoded (catches truncation)."""
    size, reason = image_header_size(path)
    if reason is None and decode:
        try:
            size = read_image(path).shape[:2]
        except LabelwiseError as e:
            reason = str(e).split(": ", 1)[-1]
    return size, reason


def check_label(path: Path, num_values: int, size: tuple[int, int] | None,
                label: np.ndarray | None = None) -> str | None:
    """Reason why label PNG ``path`` is bad (size vs ``size``, values >= ``num_values`` other than 255), or None."""
    try:
        if label is None:
            label = read_label(path)
    except LabelwiseError as e:
        msg = str(e)
        return msg.split(": ", 1)[1] if msg.startswith(str(path)) else msg
    if size is not None and tuple(label.shape[:2]) != tuple(size):
        return (f"label size {label.shape[1]}x{label.shape[0]} differs from image size {size[1]}x{size[0]} "
                "(WxH); re-export the label at the image resolution")
    bad = _out_of_range(label, num_values)
    if bad is not None:
        return (f"label value {bad} is out of range (classes 0..{num_values - 1}, 255 = ignore); "
                "fix the label or the class list")
    return None


def _out_of_range(label: np.ndarray, num_values: int) -> int | None:
    counts = np.bincount(label.reshape(-1), minlength=256)
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[num_values:])
    return int(bad[0] + num_values) if bad.size else None


# --------------------------------------------------------------------------- the base class


class FileDataset(SegDataset):
    """Shared machinery: ``ids``, per-item paths, checks, explicit or derived tags.

    Subclasses fill ``self.ids`` and ``self.class_names`` and implement
    :meth:`image_path`, :meth:`label_files` (``[(key, path, num_values)]``: the label PNGs of
    an item) and optionally :meth:`decode_label` (raw PNG -> indices) and :meth:`explicit_tags`.
    """

    default_split = "train"
    mask_key = "mask"  # which label_files key is the semantic mask

    def __init__(self, root: str | Path, split: str):
        super().__init__(root, split)
        self._explicit_tags: dict[str, np.ndarray] | None = None
        self._derived_tags: np.ndarray | None = None

    # ---- per-item files
    def file_name(self, index: int) -> str:
        return self.image_path(index).name

    def label_files(self, index: int) -> list[tuple[str, Path, int]]:
        return []

    def decode_label(self, key: str, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map the stored label values to indices (identity; adapters remap release encodings).

        Raise :class:`LabelwiseError` naming ``path`` for values the encoding does not allow."""
        return raw

    def _read(self, key: str, path: Path, num_values: int, size: tuple[int, int] | None) -> np.ndarray:
        label = self.decode_label(key, read_label(path), path)
        reason = check_label(path, num_values, size, label)
        if reason is not None:
            raise LabelwiseError(f"{path}: {reason}")
        return label

    def load_mask(self, index: int) -> np.ndarray | None:
        for key, path, n in self.label_files(index):
            if key == self.mask_key:
                return self._read(key, path, n, None)
        return None

    def load_labels(self, index: int, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        return {key: self._read(key, path, n, size) for key, path, n in self.label_files(index)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = read_image(self.image_path(index))
        item: dict[str, Any] = {"image_id": self.ids[index], "file_name": self.file_name(index), "image": image}
        item.update(self.load_labels(index, image.shape[:2]))
        tags = self.tags(index)
        if tags is not None:
            item["tags"] = tags
        return item

    # ---- checks
    def check_item(self, index: int, decode: bool = False) -> list[tuple[str, str]]:
        img = self.image_path(index)
        size, reason = image_size(img, decode)
        if reason is not None:
            return [(str(img), reason)]
        out = []
        for key, path, n in self.label_files(index):
            if not path.is_file():
                out.append((str(path), f"{key} label file missing"))
                continue
            try:
                label = self.decode_label(key, read_label(path), path)
            except LabelwiseError as e:
                out.append((str(path), str(e).split(": ", 1)[-1]))
                continue
            r = check_label(path, n, size, label)
            if r is not None:
                out.append((str(path), r))
        return out

    def subset(self, keep: list[int]) -> None:
        """Keep only items ``keep`` (used by skip_bad); subclasses with parallel lists extend this."""
        self.ids = [self.ids[i] for i in keep]
        self._derived_tags = None

    # ---- tags
    def explicit_tags(self) -> dict[str, np.ndarray] | None:
        """Tags given by the user (id -> multi-hot), or None."""
        return None

    def has_masks(self) -> bool:
        return len(self) > 0 and any(k == self.mask_key for k, _, _ in self.label_files(0))

    def tags(self, index: int) -> np.ndarray | None:
        if self._explicit_tags is None:
            self._explicit_tags = self.explicit_tags() or {}
        t = self._explicit_tags.get(self.ids[index])
        if t is not None:
            return t
        if not self.has_masks():
            return None
        if self._derived_tags is None:
            from labelwise.data.tags import derive_tags

            self._derived_tags = derive_tags(self)
        return self._derived_tags[index].copy()

    def label_signature_files(self) -> list[Path]:
        """The files whose (mtime, size) invalidate cached derived tags."""
        return [p for i in range(len(self)) for k, p, _ in self.label_files(i) if k == self.mask_key]


def read_class_names(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if len(names) < 2:
        raise LabelwiseError(f"{path}: needs at least two class names (line 1 = background); add the classes")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LabelwiseError(f"{path}: class name {dup!r} is listed twice; make names unique")
    if len(names) > 255:
        raise LabelwiseError(f"{path}: {len(names)} classes do not fit uint8 labels (max 255); merge classes")
    return names


def read_split_file(path: Path, available_dir: Path | None = None) -> list[str]:
    """Ids listed in a split file (first token per line; path-like tokens reduced to their stem)."""
    if not path.is_file():
        avail = sorted(p.stem for p in available_dir.glob("*.txt")) if available_dir and available_dir.is_dir() else []
        hint = f"available splits: {', '.join(avail)}" if avail else "create it with one image id per line"
        raise LabelwiseError(f"{path}: split file not found; {hint}")
    ids = []
    for ln in path.read_text().splitlines():
        tok = ln.split()
        if not tok:
            continue
        t = tok[0]
        if "/" in t or "." in Path(t).name:
            t = Path(t).stem
        ids.append(t)
    if not ids:
        raise LabelwiseError(f"{path}: split file is empty; list one image id per line")
    return ids


__all__ = ["FileDataset", "image_header_size", "image_size", "check_label", "read_class_names", "read_split_file"]
