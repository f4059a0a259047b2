"""Image-level tags (multi-hot over the foreground classes) for weak supervision.

* :func:`derive_tags` computes the tags of a split from its label PNGs (standard WSSS
  practice: the training split's ground truth gives the image-level labels), one
  ``np.bincount`` per image, and caches them in the user cache
  ``$LABELWISE_CACHE/tags/<hash of ROOT>/tags-<format>-<split>.npz`` (default
  ``LABELWISE_CACHE=~/.cache/labelwise``) -- never in the dataset, which may be read-only
  or shared. The cache holds a signature of the id list, the class count and every label
  file's (mtime, size); any change recomputes. An unwritable cache only costs the caching.
* :func:`read_tags_file` parses explicit ``image_id cls cls ...`` lines (class names or
  indices); explicit tags always win over derived ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX, atomic_save_npz

if TYPE_CHECKING:  # pragma: no cover
    from labelwise.data.files import FileDataset


def tags_from_label(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot (float32, ``num_classes - 1``) of the foreground classes present in ``label``."""
    counts = np.bincount(label.reshape(-1), minlength=256)
    counts[IGNORE_INDEX] = 0
    return (counts[1:num_classes] > 0).astype(np.float32)


def names_to_tags(names: list[str], class_names: list[str], where: str) -> np.ndarray:
    """Multi-hot from class names or indices; ``where`` (``file:line``) names the source in errors."""
    index = {n: i for i, n in enumerate(class_names)}
    lower = {n.lower(): i for i, n in enumerate(class_names)}
    t = np.zeros(len(class_names) - 1, dtype=np.float32)
    for name in names:
        if name.isdigit():
            c = int(name)
            if not 1 <= c < len(class_names):
                raise LabelwiseError(f"{where}: class index {c} out of range 1..{len(class_names) - 1}; "
                                     "use a foreground class index or name")
        else:
            c = index.get(name, lower.get(name.lower(), -1))
            if c < 0:
                import difflib

                close = difflib.get_close_matches(name, class_names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid names: {', '.join(class_names[1:])}"
                raise LabelwiseError(f"{where}: unknown class name {name!r}; {hint}")
            if c == 0:
                continue  # background is not a tag
        t[c - 1] = 1.0
    return t


def read_tags_file(path: str | Path, class_names: list[str]) -> dict[str, np.ndarray]:
    """Parse ``image_id cls cls ...`` lines (whitespace separated) into id -> multi-hot."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    for lineno, ln in enumerate(path.read_text().splitlines(), 1):
        tok = ln.split()
        if not tok or tok[0].startswith("#"):
            continue
        out[tok[0]] = names_to_tags(tok[1:], class_names, f"{path}:{lineno}")
    return out


def cache_root() -> Path:
    """``$LABELWISE_CACHE`` or ``~/.cache/labelwise``: where labelwise caches derived data."""
    return Path(os.environ.get("LABELWISE_CACHE") or Path.home() / ".cache" / "labelwise").expanduser()


def cache_dir(root: str | Path) -> Path:
    """The cache folder of dataset ``root``: ``cache_root()/tags/<hash of the resolved ROOT>``."""
    h = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cache_root() / "tags" / h


def signature(ds: "FileDataset") -> str:
    """Hash of the id list, class count and (name, mtime_ns, size) of every label file."""
    h = hashlib.sha1()
    h.update(f"{ds.format}|{ds.split}|{ds.num_classes}|".encode())
    h.update("\n".join(ds.ids).encode())
    for p in ds.label_signature_files():
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_mtime_ns}|{st.st_size}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def derive_tags(ds: "FileDataset", use_cache: bool = True) -> np.ndarray:
    """``N x (num_classes - 1)`` float32 tags of ``ds`` from its semantic labels (cached)."""
    sig = signature(ds) if use_cache else ""
    path = None
    if use_cache:
        safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in ds.split)
        path = cache_dir(ds.root) / f"tags-{ds.format}-{safe_split}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    if str(z["signature"]) == sig and z["tags"].shape == (len(ds), ds.num_classes - 1):
                        return z["tags"].astype(np.float32)
            except Exception:
                pass  # unreadable cache: recompute
    from labelwise.utils import progress

    tags = np.zeros((len(ds), ds.num_classes - 1), dtype=np.float32)
    for i in progress(range(len(ds)), desc=f"tags {ds.split}", total=len(ds)):
        m = ds.load_mask(i)
        if m is not None:
            tags[i] = tags_from_label(m, ds.num_classes)
    if path is not None:
        try:
            atomic_save_npz(path, tags=tags, signature=np.array(sig))
        except OSError as e:  # read-only home or full disk: derive again next time
            import warnings

            warnings.warn(f"could not cache derived tags in {path.parent} ({e.strerror or e}); set LABELWISE_CACHE "
                          "to a writable folder", stacklevel=2)
    return tags


__all__ = ["tags_from_label", "names_to_tags", "read_tags_file", "cache_root", "cache_dir", "signature", "derive_tags"]
