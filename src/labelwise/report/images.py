"""Image helpers for reports: label colouring, alpha overlays, a jet-like colormap, PNG data URIs.

Everything works on plain numpy arrays (``uint8`` RGB images ``H x W x 3``, integer label maps
``H x W``, float heat maps ``H x W``), so the functions serve the demo report and any notebook.
"""

from __future__ import annotations

import base64
import io as _io

import numpy as np
from PIL import Image

from labelwise.io import IGNORE_INDEX, VOC_PALETTE


def colorize_label(label: np.ndarray, palette: np.ndarray = VOC_PALETTE,
                   ignore_color: tuple[int, int, int] | None = (255, 255, 255)) -> np.ndarray:
    """Class indices ``H x W`` -> RGB ``uint8`` ``H x W x 3`` with the VOC palette.

    ``ignore_color`` (default white) replaces the palette colour of ``IGNORE_INDEX`` (255);
    pass None to keep the palette's own colour for it.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    pal = np.asarray(palette, dtype=np.uint8)
    if ignore_color is not None and len(pal) > IGNORE_INDEX:
        pal = pal.copy()
        pal[IGNORE_INDEX] = ignore_color
    idx = np.clip(label.astype(np.int64), 0, len(pal) - 1)
    return pal[idx]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5,
            where: np.ndarray | None = None) -> np.ndarray:
    """Alpha-blend ``color`` over ``image``: ``(1 - alpha) * image + alpha * color``.

    ``color`` is an ``H x W x 3`` image or a single RGB triple; ``where`` (bool ``H x W``)
    restricts the blend to those pixels (elsewhere the image is kept). Returns ``uint8``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = np.asarray(image, dtype=np.float64)
    col = np.broadcast_to(np.asarray(color, dtype=np.float64), img.shape)
    out = (1.0 - alpha) * img + alpha * col
    if where is not None:
        out = np.where(np.asarray(where, dtype=bool)[..., None], out, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def label_overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55,
                  skip_background: bool = True) -> np.ndarray:
    """Overlay a label map (VOC palette) on an image; background (0) left as the photo."""
    where = None
    if skip_background:
        where = np.asarray(label) != 0
    return overlay(image, colorize_label(label), alpha=alpha, where=where)


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap: values in [0, 1] (clipped) -> RGB ``uint8``, shape ``(*values.shape, 3)``.

    Piecewise linear like the classic jet: each channel is a tent ``clip(1.5 - |4x - p|, 0, 1)``
    peaking (flat top) at ``p / 4`` with ``p`` = 3 (red), 2 (green), 1 (blue). Known points:
    0 -> (0, 0, 128) dark blue, 0.5 -> (128, 255, 128), 1 -> (128, 0, 0) dark red.
    """
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return np.rint(np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


def normalize_map(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale a map to [0, 1] (min/max of the map unless given); a constant map gives zeros."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    lo = float(v.min()) if vmin is None else float(vmin)
    hi = float(v.max()) if vmax is None else float(vmax)
    if hi - lo <= 1e-12:
        return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def heatmap(cam: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.5,
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour a CAM with :func:`jet` (normalised to [0, 1]) and optionally blend it on ``image``.

    ``cam`` is ``H x W`` (resized to the image size, bilinear, if they differ).
    """
    cam = np.asarray(cam, dtype=np.float64)
    if image is not None and cam.shape != np.asarray(image).shape[:2]:
        cam = resize_map(cam, np.asarray(image).shape[:2])
    colored = jet(normalize_map(cam, vmin, vmax))
    if image is None:
        return colored
    return overlay(image, colored, alpha=alpha)


def resize_map(values: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``(H, W)``."""
    h, w = int(size_hw[0]), int(size_hw[1])
    img = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float64)


def resize_image(image: np.ndarray, max_side: int, nearest: bool = False) -> np.ndarray:
    """Downscale so the longer side is at most ``max_side`` (labels: ``nearest=True``)."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(arr)
    return np.asarray(img.resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``H x W x 3`` (or ``H x W``) ``uint8`` array as PNG bytes."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_data_uri(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` URI of an image (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


_FONTS: dict = {}


def ui_font(size: int = 11):
    """Pillow's default font at ``size`` (cached); the fixed bitmap font on Pillow < 10.1."""
    from PIL import ImageFont

    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]
