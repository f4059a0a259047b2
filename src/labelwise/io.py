"""File I/O shared by every part of labelwise: atomic writes, image and label PNG decoding.

* Writes go to a temporary file in the same directory and are renamed into place, so a
  killed process never leaves a half-written checkpoint, mask or JSON behind. The file gets
  the permissions the umask gives any new file (``file_mode``), as other tools' outputs do.
* :func:`read_image` returns an RGB ``uint8`` array whatever the file holds (EXIF
  orientation applied; grayscale, RGBA, palette and 16-bit images converted).
* :func:`read_label` returns the *indices* stored in a label PNG (palette or grayscale),
  never the palette colours.
"""

from __future__ import annotations

import io as _io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from labelwise.errors import LabelwiseError

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# --------------------------------------------------------------------------- atomic writes

_FILE_MODE: int | None = None


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 less the process umask
    (read once; the temporary files of atomic writes start as 0o600 and get this mode)."""
    global _FILE_MODE
    if _FILE_MODE is None:
        mask = os.umask(0o022)
        os.umask(mask)
        _FILE_MODE = 0o666 & ~mask
    return _FILE_MODE



def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb", sync: bool = True) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and rename it into place.

    The rename alone guarantees that readers never see a half-written file, even if the
    process is killed. ``sync`` adds an fsync so the data also survives a power loss; it
    costs ~10 ms per file, so bulk outputs (masks, testbed images) pass ``sync=False``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp's 0o600 would hide outputs from the group and others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes, sync: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), "wb", sync=sync)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save_torch(path: str | Path, obj: Any) -> None:
    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | Path, missing: str, invalid: str = "not a valid JSON file") -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line error ``"{path}: {missing|invalid}"``."""
    path = Path(path)
    if not path.is_file():
        raise LabelwiseError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LabelwiseError(f"{path}: {invalid}") from None


# --------------------------------------------------------------------------- palettes


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), ``n x 3`` uint8."""
    idx = np.arange(n)
    pal = np.zeros((n, 3), dtype=np.int64)
    c = idx.copy()
    for j in range(8):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return pal.astype(np.uint8)


VOC_PALETTE = voc_palette()


# --------------------------------------------------------------------------- images


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise LabelwiseError(f"{path}: file not found; check the dataset layout")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LabelwiseError(f"{path}: corrupt or unreadable image ({type(e).__name__}); "
                             "re-export the file or remove it from the split") from None
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as RGB ``uint8`` ``H x W x 3`` with EXIF orientation applied."""
    path = Path(path)
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not make an image unreadable
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # composite on white
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_label(path: str | Path) -> np.ndarray:
    """Read the class indices of a label PNG (palette or grayscale) as ``uint8`` ``H x W``."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img)
        if arr.max() > 255:
            raise LabelwiseError(f"{path}: label value {int(arr.max())} does not fit the uint8 label format; "
                                 "store class indices 0..254 and 255 for ignore")
        return arr.astype(np.uint8)
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8).copy()
    raise LabelwiseError(f"{path}: label PNG has mode {img.mode} (colour); save class indices as a "
                         "palette ('P') or grayscale ('L') PNG")


def write_label(path: str | Path, label: np.ndarray, sync: bool = False) -> None:
    """Write class indices as a VOC-palette PNG, atomically (see :func:`atomic_write` for ``sync``)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label values must be in 0..255")
        label = label.astype(np.uint8)
    img = Image.fromarray(label, mode="P")
    img.putpalette(VOC_PALETTE.reshape(-1).tolist())
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), sync=sync)


def write_cluster_map(path: str | Path, ids: np.ndarray, num_clusters: int, sync: bool = False) -> None:
    """Write cluster ids (``0..num_clusters-1``, ``-1`` = no cluster) as a PNG, atomically: a
    VOC-palette ``uint8`` PNG with 255 = none when ``num_clusters <= 255`` (a label PNG), else a
    16-bit grayscale PNG with 65535 = none (OAP's K = 512). :func:`read_cluster_map` reads both."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"cluster map must be 2-D, got shape {ids.shape}")
    if ids.size and (ids.min() < -1 or ids.max() >= num_clusters):
        raise ValueError(f"cluster ids must be in -1..{num_clusters - 1}")
    if num_clusters <= 255:
        write_label(path, np.where(ids < 0, 255, ids).astype(np.uint8), sync=sync)
        return
    if num_clusters > 65535:
        raise ValueError(f"at most 65535 clusters fit a 16-bit PNG, got {num_clusters}")
    buf = _io.BytesIO()
    Image.fromarray(np.where(ids < 0, 65535, ids).astype(np.uint16)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), sync=sync)


def read_cluster_map(path: str | Path) -> np.ndarray:
    """Cluster ids of a PNG written by :func:`write_cluster_map` (or any label PNG) as ``int64``
    ``H x W`` with ``-1`` = no cluster (255 in an 8-bit PNG, 65535 in a 16-bit one)."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.int64)
        return np.where(arr == 65535, -1, arr)
    arr = read_label(path).astype(np.int64)
    return np.where(arr == 255, -1, arr)


def write_image(path: str | Path, image: np.ndarray, quality: int = 95, sync: bool = False) -> None:
    """Write an RGB ``uint8`` image (format from the suffix), atomically (see :func:`atomic_write`)."""
    path = Path(path)
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
    buf = _io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    atomic_write_bytes(path, buf.getvalue(), sync=sync)


def list_images(root: str | Path) -> list[Path]:
    """All image files below ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise LabelwiseError(f"{root}: image folder not found; pass an existing directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))
