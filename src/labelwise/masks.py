"""Binary masks <-> COCO run-length encoding (RLE), plus bbox/area helpers.

Everything goes through ``pycocotools.mask`` so the encodings are bit-identical to
what COCO tools produce and read. ``counts`` is returned as a ``str`` (ASCII) so that
RLEs can be written to JSON directly; :func:`decode_mask` accepts ``str`` or ``bytes``
counts, uncompressed RLE (``counts`` as a list of ints) and polygons (given the image
``height`` and ``width``). Round trips are exact for any size, including empty, full,
single-pixel and odd-sized masks.

Boxes are COCO ``[x, y, w, h]`` in pixels, the tight box around the foreground pixels
(``w = x_max - x_min + 1``), as ``pycocotools.mask.toBbox`` computes them; an empty mask
gives ``[0, 0, 0, 0]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["encode_mask", "encode_masks", "decode_mask", "decode_masks", "mask_to_bbox", "mask_area",
           "rle_counts", "segmentation_problem", "results_to_dataset",
           "write_coco_dataset"]


def _to_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):  # torch tensor on any device
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def _as_str(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode_mask(mask: Any) -> dict:
    """RLE of one ``H x W`` mask (bool or 0/1; numpy or torch): ``{"size": [h, w], "counts": str}``."""
    m = _to_numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"encode_mask expects an H x W mask, got shape {m.shape}; use encode_masks for N x H x W")
    return _as_str(mask_utils.encode(np.asfortranarray(m != 0, dtype=np.uint8)))


def encode_masks(masks: Any) -> list[dict]:
    """RLEs of ``N x H x W`` masks in one vectorised pycocotools call (stacked H x W x N, Fortran order)."""
    m = _to_numpy(masks)
    if m.ndim != 3:
        raise ValueError(f"encode_masks expects N x H x W masks, got shape {m.shape}")
    if m.shape[0] == 0:
        return []
    stacked = np.asfortranarray((m != 0).transpose(1, 2, 0), dtype=np.uint8)
    return [_as_str(r) for r in mask_utils.encode(stacked)]


def rle_counts(counts: str | bytes) -> np.ndarray:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, vectorised):
    6-bit characters from '0', 5 value bits and a continuation bit each, the last character of a
    value carrying its sign; from the fourth run on, each value is a difference to the run two
    before. Raises ``ValueError`` on a string that is not such an encoding."""
    b = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else bytes(counts), dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    c = b.astype(np.int64) - 48
    if (c < 0).any() or (c > 63).any():
        raise ValueError("an RLE 'counts' string has characters outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("an RLE 'counts' string ends inside a value (truncated)")
    ends = np.flatnonzero(~more)                       # the last character of every value
    starts = np.concatenate([[0], ends[:-1] + 1])
    pos = np.arange(c.size) - np.repeat(starts, ends - starts + 1)  # position of a character in its value
    val = np.zeros(ends.size, dtype=np.int64)
    np.add.at(val, np.repeat(np.arange(ends.size), ends - starts + 1), (c & 0x1F) << (5 * pos))
    neg = (c[ends] & 0x10) != 0                        # the sign bit of each value's last character
    val = np.where(neg, val - (1 << (5 * (pos[ends] + 1))), val)
    out = val.copy()
    for parity in (1, 0):                              # runs >= 3: cumulative along each parity chain
        idx = np.arange(parity if parity else 2, out.size, 2)
        if idx.size:
            out[idx] = np.cumsum(val[idx])
    return out


def segmentation_problem(segm: Any, height: int | None = None, width: int | None = None) -> str | None:
    """Why a COCO ``segmentation`` cannot be decoded faithfully (for an image of ``height x width``
    when given), or None: polygons need an even number of coordinates; an RLE needs ``size`` and
    ``counts`` whose runs are non-negative and cover ``h x w`` pixels exactly (a truncated string
    otherwise decodes to garbage without an error)."""
    try:
        if isinstance(segm, (list, tuple)):
            for p in segm:
                if not isinstance(p, (list, tuple)) or len(p) % 2:
                    return "a polygon needs an even number of coordinates [x1, y1, x2, y2, ...]"
                np.asarray(p, dtype=np.float64)
            return None
        if not isinstance(segm, dict):
            return f"a segmentation is polygons or an RLE dict, not {type(segm).__name__}"
        if "counts" not in segm or "size" not in segm:
            return "an RLE needs 'size' and 'counts'"
        h, w = int(segm["size"][0]), int(segm["size"][1])
        if height is not None and width is not None and (h, w) != (int(height), int(width)):
            return f"its RLE size {h}x{w} differs from the image's {int(height)}x{int(width)} (HxW)"
        counts = segm["counts"]
        runs = np.asarray(counts, dtype=np.int64) if isinstance(counts, list) else rle_counts(counts)
        if (runs < 0).any() or int(runs.sum()) != h * w:
            return f"its RLE runs cover {int(runs.sum())} pixels, not {h}x{w}: the counts are corrupt or truncated"
    except (ValueError, TypeError, UnicodeError) as e:
        return str(e)
    return None


def _to_rle(segm: Any, height: int | None, width: int | None) -> dict:
    """Any COCO segmentation (compressed/uncompressed RLE, polygons) -> compressed RLE with bytes counts."""
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise ValueError("an RLE needs 'size' and 'counts'")
        h, w = int(segm["size"][0]), int(segm["size"][1])
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": [h, w], "counts": counts}
    if isinstance(segm, (list, tuple)):  # polygons [[x1, y1, x2, y2, ...], ...]
        if height is None or width is None:
            raise ValueError("decoding a polygon needs height and width")
        polys = [list(map(float, p)) for p in segm if len(p) >= 6]
        if not polys:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, int(height), int(width)))
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


def decode_mask(rle: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """``bool`` ``H x W`` mask of an RLE (str/bytes/list counts) or polygon list (needs ``height``, ``width``)."""
    return mask_utils.decode(_to_rle(rle, height, width)).astype(bool)


def decode_masks(rles: Sequence[Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """``bool`` ``N x H x W`` of several segmentations (all of one size)."""
    if len(rles) == 0:
        if height is None or width is None:
            raise ValueError("decode_masks of an empty list needs height and width")
        return np.zeros((0, height, width), dtype=bool)
    objs = [_to_rle(r, height, width) for r in rles]
    return mask_utils.decode(objs).transpose(2, 0, 1).astype(bool)


def mask_to_bbox(mask: Any) -> np.ndarray:
    """COCO ``[x, y, w, h]`` (float64) of an ``H x W`` mask, or ``N x 4`` for ``N x H x W``; empty -> zeros."""
    m = _to_numpy(mask) != 0
    single = m.ndim == 2
    if single:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask_to_bbox expects H x W or N x H x W, got shape {m.shape}")
    n, h, w = m.shape
    rows = m.any(axis=2)  # N x H
    cols = m.any(axis=1)  # N x W
    nonempty = rows.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = h - 1 - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1).astype(np.float64)
    boxes[~nonempty] = 0.0
    return boxes[0] if single else boxes


def mask_area(mask: Any) -> int | np.ndarray:
    """Foreground pixel count of an ``H x W`` mask (int), or of each of ``N x H x W`` (int64 array)."""
    m = _to_numpy(mask) != 0
    if m.ndim == 2:
        return int(m.sum())
    return m.reshape(m.shape[0], -1).sum(axis=1).astype(np.int64)


def results_to_dataset(results: Sequence[dict], category: str = "object") -> dict:
    """A COCO *results* list (records with ``file_name`` and RLE ``segmentation``, as pseudo-mask
    generators and ``--what universal`` write) -> a COCO *dataset* a detector trains on, as CutLER
    writes it: ``images`` (id, file_name, height and width from the RLE size), ``annotations``
    (RLE, area, bbox, ``iscrowd`` 0, the record's score and level kept) and one class-agnostic
    category. ``pycocotools.COCO`` loads it and ``--data coco:FILE.json,IMAGE_DIR`` trains on it."""
    names: dict[str, tuple[int, int]] = {}
    for k, r in enumerate(results):
        seg = r.get("segmentation")
        if not isinstance(seg, dict) or "size" not in seg or "file_name" not in r:
            raise ValueError(f"record {k} has no RLE segmentation with a size and a file_name")
        names.setdefault(str(r["file_name"]), (int(seg["size"][0]), int(seg["size"][1])))
    ids = {n: i for i, n in enumerate(sorted(names), 1)}
    images = [{"id": ids[n], "file_name": n, "height": h, "width": w} for n, (h, w) in sorted(names.items())]
    anns = []
    for k, r in enumerate(results):
        rle = _to_rle(r["segmentation"], None, None)
        area = int(mask_utils.area(rle))
        if area == 0:
            continue
        ann = {"id": len(anns) + 1, "image_id": ids[str(r["file_name"])], "category_id": 1,
               "segmentation": _as_str(rle), "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
               "iscrowd": 0}
        for key in ("score", "level"):
            if key in r:
                ann[key] = r[key]
        anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": category, "supercategory": category, "isthing": 1}]}


def write_coco_dataset(results_path, dataset_path=None) -> bool:
    """Read the COCO results json at ``results_path`` and write it as a COCO dataset
    (:func:`results_to_dataset`) to ``dataset_path`` (default: in place), atomically. A json that
    is not a results list (e.g. a run's metadata) is left alone: returns False."""
    import json
    from pathlib import Path

    from labelwise.io import atomic_write_json

    results_path = Path(results_path)
    recs = json.loads(results_path.read_text())
    if not isinstance(recs, list):
        return False
    atomic_write_json(dataset_path or results_path, results_to_dataset(recs), indent=None)
    return True
