"""Dataset SPEC parsing (``FORMAT:PATH``), the format registry, validation and bad-item skipping.

* :data:`FORMATS` maps a format name to its :class:`~labelwise.data.base.SegDataset`
  subclass; a loader joins with ``@register_format("name")``. Built-in formats
  (``voc``, ``coco``, ``parts``, ``folder``) and the adapters for official releases
  (``vocaug``, ``coco-wsss``, ``partimagenet``, ``pascalpart``) are registered on first use.
* :func:`build_dataset` builds a split; ``skip_bad=True`` scans the split eagerly
  (every image decoded + labels), drops bad items, warns with the count and writes
  ``report_dir/skipped.txt`` (``file<TAB>reason`` per line).
* :func:`validate` returns ``[(file, reason), ...]`` for every problem in a split
  (the engine of ``labelwise data check``).

:class:`~labelwise.data.files.FileDataset` (``data/files.py``) is the shared base of the
built-in loaders.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable

from labelwise.data.base import SegDataset
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_text

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
        p = check(i, decode=True)  # a truncated image passes a header read and fails mid-training
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


__all__ = ["FORMATS", "register_format", "available_formats", "parse_spec", "build_dataset", "validate",
           "skip_bad_items", "skip_report_dir"]
