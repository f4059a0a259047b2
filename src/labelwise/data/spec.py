"""Dataset SPEC parsing (``FORMAT:PATH``), the format registry, validation and bad-item skipping.

* :data:`FORMATS` maps a format name to its :class:`~labelwise.data.base.SegDataset`
  subclass; a loader joins with ``@register_format("name")``. Built-in formats
  (``voc``, ``coco``, ``parts``, ``folder``) and the adapters for official releases
  (``vocaug``, ``coco-wsss``, ``partimagenet``, ``pascalpart``) are registered on first use.
* :func:`build_dataset` builds a split; ``skip_bad=True`` scans the split eagerly
  (image headers + labels), drops bad items, warns with the count and writes
  ``report_dir/skipped.txt`` (``file<TAB>reason`` per line).
* :func:`validate` returns ``[(file, reason), ...]`` for every problem in a split
  (the engine of ``labelwise data check``).

:class:`FileDataset` is the shared base of the built-in loaders: an id list, per-item
image/label paths, label checks (size, value range) and derived tags.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import importlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from labelwise.data.base import DatasetInfo, SegDataset
from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX, atomic_write_text, read_image, read_label

log = logging.getLogger(__name__)

FORMATS: dict[str, type[SegDataset]] = {}

# Modules whose import registers the built-in formats and adapters.
_BUILTIN_MODULES = (
    "labelwise.data.voc",
    "labelwise.data.coco",
    "labelwise.data.parts",
    "labelwise.data.folder",
    "labelwise.data.adapters",
)


def register_format(name: str) -> Callable[[type[SegDataset]], type[SegDataset]]:
    """Class decorator: make ``name:PATH`` specs build this dataset class."""

    def deco(cls: type[SegDataset]) -> type[SegDataset]:
        FORMATS[name] = cls
        if not getattr(cls, "format", ""):
            cls.format = name
        return cls

    return deco


def _load_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def available_formats() -> list[str]:
    _load_builtin()
    return sorted(FORMATS)


def parse_spec(spec: str) -> tuple[str, Path]:
    """Split ``FORMAT:PATH`` into the (lower-case) format and the path; check the format exists."""
    spec = str(spec)
    fmts = available_formats()
    if ":" not in spec:
        raise LabelwiseError(f"dataset spec {spec!r} has no format; write FORMAT:PATH with FORMAT one of "
                             f"{', '.join(fmts)} (e.g. voc:/data/VOC2012)")
    fmt, path = spec.split(":", 1)
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise LabelwiseError(f"dataset spec {spec!r}: unknown format {fmt!r}; valid formats: {', '.join(fmts)}")
    if not path:
        raise LabelwiseError(f"dataset spec {spec!r} has an empty path; write {fmt}:PATH")
    return fmt, Path(path).expanduser()


_SKIP_REPORT_DIR: ContextVar[Path | None] = ContextVar("labelwise_skip_report_dir", default=None)


@contextmanager
def skip_report_dir(path: str | Path | None):
    """Within this block, ``build_dataset(..., skip_bad=True)`` writes ``skipped.txt`` to ``path``
    unless given a ``report_dir`` (the trainer points it at the run directory)."""
    token = _SKIP_REPORT_DIR.set(Path(path) if path is not None else None)
    try:
        yield
    finally:
        _SKIP_REPORT_DIR.reset(token)


def build_dataset(spec: str, split: str | None = None, *, skip_bad: bool = False,
                  report_dir: str | Path | None = None) -> SegDataset:
    """Build split ``split`` (format default when None, usually ``train``) of dataset ``spec``.

    ``skip_bad`` drops unreadable/invalid items with a counted warning and lists them in
    ``report_dir/skipped.txt`` (default: the :func:`skip_report_dir` in effect, if any).
    """
    if report_dir is None:
        report_dir = _SKIP_REPORT_DIR.get()
    fmt, path = parse_spec(spec)
    cls = FORMATS[fmt]
    if split is None:
        split = getattr(cls, "default_split", "train")
    ds = cls(path, split)
    if skip_bad:
        skip_bad_items(ds, report_dir=report_dir)
    return ds


# --------------------------------------------------------------------------- validation


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


def validate(dataset: SegDataset, *, decode: bool = False) -> list[tuple[str, str]]:
    """Every problem in ``dataset`` as ``(file, reason)``; ``decode=True`` fully decodes images too."""
    problems: list[tuple[str, str]] = []
    check = getattr(dataset, "check_item", None)
    for i in range(len(dataset)):
        if check is not None:
            problems.extend(check(i, decode=decode))
        else:  # a foreign SegDataset: fall back to loading the item
            try:
                dataset[i]
            except LabelwiseError as e:
                problems.append((str(dataset.image_path(i)), str(e)))
    return problems


def skip_bad_items(dataset: SegDataset, report_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Drop the bad items of ``dataset`` in place; warn with the count; write ``report_dir/skipped.txt``."""
    bad_idx: dict[int, list[tuple[str, str]]] = {}
    check = getattr(dataset, "check_item")
    for i in range(len(dataset)):
        p = check(i)
        if p:
            bad_idx[i] = p
    problems = [p for ps in bad_idx.values() for p in ps]
    if bad_idx:
        keep = [i for i in range(len(dataset)) if i not in bad_idx]
        dataset.subset(keep)
        where = ""
        if report_dir is not None:
            out = Path(report_dir) / "skipped.txt"
            atomic_write_text(out, "".join(f"{f}\t{r}\n" for f, r in problems))
            where = f"; list in {out}"
        msg = (f"{dataset.format}:{dataset.root} split {dataset.split!r}: skipped {len(bad_idx)} bad item(s) "
               f"of {len(bad_idx) + len(keep)}{where}")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        if not keep:
            raise LabelwiseError(f"{dataset.root}: every item of split {dataset.split!r} is bad{where}; "
                                 "fix the dataset (see `labelwise data check`)")
    elif report_dir is not None:
        atomic_write_text(Path(report_dir) / "skipped.txt", "")
    return problems


# --------------------------------------------------------------------------- shared base


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


__all__ = [
    "FORMATS", "register_format", "available_formats", "parse_spec", "build_dataset", "validate",
    "skip_bad_items", "FileDataset", "DatasetInfo", "SegDataset", "image_header_size", "image_size", "check_label",
    "read_class_names", "read_split_file",
]
