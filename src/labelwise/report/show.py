"""See the masks you made: overlays of predictions (and ground truth) on their images, plus one
self-contained HTML gallery. The engine of ``labelwise show``; every piece works from Python too.

Prediction kinds (:func:`detect_pred_kind`):

==========  =====================================================================================
``results`` a COCO RLE results json (a list of ``{segmentation, score, level, file_name,
            image_id, ...}`` records: ``labelwise pseudo-masks``, OAP's ``universal.json``; a
            folder holding only ``universal.json`` counts too). A record goes to the image whose
            path relative to ``--images`` is its ``file_name`` (or ends with it, when unique);
            a record without ``file_name`` goes by ``image_id`` = the 1-based position of the
            image in the sorted listing of ``--images`` (:func:`labelwise.io.list_images`).
            Per image and ``level`` (``instance`` / ``semantic``; no level = ``instance``) the
            ``top`` best-scoring masks are drawn, one overlay per level.
``labels``  a folder of label PNGs ``<image stem>.png`` (class or cluster ids, 255 = ignore;
            nested images: ``<relative path without suffix>.png``), VOC palette overlay.
``parts``   a folder with ``parts/`` and ``objects/`` label PNGs (``infer --what parts``):
            two overlays.
==========  =====================================================================================

Ground truth (``gt=SPEC``): instance masks of ``coco:``, label maps of ``voc:``, parts and
objects of ``parts:`` (and the adapters of official releases), matched to the images by file
name, id or stem.

Drawing is vectorised numpy: a fill (alpha blend of a colour per mask; the best-scoring mask
on top), a 1-px outline on the mask's own border pixels (pixels outside every mask keep their
exact value) and the rank number at the mask's centroid (or its pixel nearest to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from labelwise.errors import LabelwiseError
from labelwise.io import IGNORE_INDEX, list_images, read_cluster_map, read_image, write_image
from labelwise.masks import decode_mask
from labelwise.report.html import Section, headline, html_table, img_html, swatch, write_report
from labelwise.report.images import colorize_label, overlay, resize_image
from labelwise.report.images import ui_font as _font

__all__ = ["ACCEPTED", "PRED_KINDS", "Panel", "compose_row", "detect_pred_kind", "distinct_colors",
           "draw_label_map", "draw_masks", "label_edges", "label_positions", "load_results", "mask_outline",
           "match_label_files", "match_results", "resize_nearest", "show_predictions", "top_k_by_level"]

PRED_KINDS = ("results", "labels", "parts")
ACCEPTED = ("a COCO RLE results json (a list of records with 'segmentation'), a folder of label PNGs "
            "(<image stem>.png) or a parts prediction folder (parts/ and objects/ PNGs)")
LEVEL_ORDER = ("instance", "semantic")

# 20 well-separated colours (Sasha Trubetskoy's list); more masks get golden-ratio hues.
_COLORS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128)], dtype=np.uint8)


# --------------------------------------------------------------------------- drawing


def distinct_colors(n: int) -> np.ndarray:
    """``n x 3`` ``uint8`` colours, pairwise distinct: 20 fixed ones, then golden-ratio hues."""
    if n <= len(_COLORS):
        return _COLORS[:n].copy()
    k = np.arange(n - len(_COLORS), dtype=np.float64)
    h = (0.1 + k * 0.618033988749895) % 1.0
    s = 0.65 + 0.3 * ((k // 7) % 2)
    v = 0.95 - 0.25 * ((k // 3) % 2)
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = np.choose(i[None], [np.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                     (v, p, q))])
    extra = np.rint(rgb.T * 255.0).astype(np.uint8)
    return np.concatenate([_COLORS, extra], axis=0)


def resize_nearest(arr: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (masks ``N x H x W``, label maps ``H x W``)."""
    arr = np.asarray(arr)
    H, W = arr.shape[-2:]
    h, w = int(size_hw[0]), int(size_hw[1])
    if (H, W) == (h, w):
        return arr
    ri = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    ci = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    return arr[..., ri[:, None], ci[None, :]]


def mask_outline(masks: np.ndarray) -> np.ndarray:
    """The border pixels of each mask (``H x W`` or ``N x H x W`` bool): mask pixels with a 4-neighbour
    outside the mask (or on the image edge). The outline lies inside the mask."""
    m = np.asarray(masks, dtype=bool)
    pad = [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(m, pad, constant_values=False)
    inner = (p[..., 1:-1, 1:-1] & p[..., :-2, 1:-1] & p[..., 2:, 1:-1] & p[..., 1:-1, :-2] & p[..., 1:-1, 2:])
    return m & ~inner


def label_edges(label: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Pixels of ``label`` (``H x W``) next to a pixel of another value (4-neighbours), within ``where``."""
    lab = np.asarray(label)
    e = np.zeros(lab.shape, dtype=bool)
    dx = lab[:, 1:] != lab[:, :-1]
    dy = lab[1:, :] != lab[:-1, :]
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    e[1:, :] |= dy
    e[:-1, :] |= dy
    return e if where is None else e & np.asarray(where, dtype=bool)


def label_positions(masks: np.ndarray) -> list[tuple[float, float] | None]:
    """Where to write each mask's number: its centroid ``(x, y)`` when that pixel is in the mask,
    else the mask pixel nearest to the centroid; None for an empty mask."""
    out: list[tuple[float, float] | None] = []
    for m in np.asarray(masks, dtype=bool):  # a few dozen masks
        ys, xs = np.nonzero(m)
        if ys.size == 0:
            out.append(None)
            continue
        cy, cx = ys.mean(), xs.mean()
        iy, ix = int(round(cy)), int(round(cx))
        if not (0 <= iy < m.shape[0] and 0 <= ix < m.shape[1] and m[iy, ix]):
            j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
            iy, ix = int(ys[j]), int(xs[j])
        out.append((float(ix), float(iy)))
    return out




def _draw_tags(image: np.ndarray, tags: Sequence[tuple[float, float, str, Sequence[int]]]) -> np.ndarray:
    """Small white-on-dark text boxes centred at ``(x, y)`` (kept inside the image)."""
    if not tags:
        return image
    pil = Image.fromarray(image)
    d = ImageDraw.Draw(pil)
    font = _font(10 if min(image.shape[:2]) < 160 else 12)
    H, W = image.shape[:2]
    for x, y, text, color in tags:
        l, t, r, b = d.textbbox((0, 0), text, font=font)
        tw, th = r - l, b - t
        x0 = int(min(max(round(x - tw / 2) - 1, 0), max(W - tw - 2, 0)))
        y0 = int(min(max(round(y - th / 2) - 1, 0), max(H - th - 2, 0)))
        dark = tuple(int(c * 0.45) for c in color[:3])
        d.rectangle([x0, y0, x0 + tw + 1, y0 + th + 1], fill=dark)
        d.text((x0 + 1 - l, y0 + 1 - t), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil).copy()


def draw_masks(image: np.ndarray, masks: np.ndarray, colors: np.ndarray | None = None, alpha: float = 0.45,
               outline: bool = True, numbers: bool | Sequence[str] = True) -> np.ndarray:
    """Draw ``masks`` (``N x H x W`` bool, best first) on ``image`` (``H x W x 3`` ``uint8``).

    Each mask gets a colour (``colors``, default :func:`distinct_colors`), a semi-transparent fill
    (where masks overlap the earlier, better one wins), a 1-px outline on its border pixels and
    its rank number (``numbers=True``: 1, 2, ...; or the given strings; False: none). Pixels
    outside every mask (and away from the number boxes) keep their exact value.
    """
    img = np.asarray(image, dtype=np.uint8)
    m = np.asarray(masks, dtype=bool).reshape(-1, *img.shape[:2])
    n = m.shape[0]
    if n == 0:
        return img.copy()
    cols = distinct_colors(n) if colors is None else np.asarray(colors, dtype=np.uint8)
    covered = m.any(axis=0)
    top = m.argmax(axis=0)  # the first (best) mask at each pixel
    out = overlay(img, cols[top], alpha=alpha, where=covered)
    if outline:
        edges = mask_outline(m)
        on_edge = edges.any(axis=0)
        out[on_edge] = cols[edges.argmax(axis=0)][on_edge]
    if numbers is not False:
        texts = [str(k + 1) for k in range(n)] if numbers is True else [str(t) for t in numbers]
        tags = [(p[0], p[1], texts[k], cols[k]) for k, p in enumerate(label_positions(m)) if p is not None]
        out = _draw_tags(out, tags)
    return out


def draw_label_map(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, background: bool = True,
                   edges: bool = True) -> np.ndarray:
    """Colourise a label map (VOC palette) over ``image``: class/cluster regions blended, with a 1-px
    line where the label changes. ``background=True``: 0 is background and stays the photo;
    ``False``: 0 is a cluster like any other (coloured as ``id + 1``). 255 (ignore) is shown white."""
    lab = np.asarray(label)
    if background:
        where = lab != 0
        color = colorize_label(lab)
    else:
        where = lab != IGNORE_INDEX
        color = colorize_label(np.where(where, np.minimum(lab.astype(np.int64) + 1, 254), IGNORE_INDEX))
    out = overlay(image, color, alpha=alpha, where=where)
    if edges:
        e = label_edges(lab, where)
        out[e] = color[e]
    return out


# --------------------------------------------------------------------------- panels and rows


@dataclass
class Panel:
    """One picture of a row: the drawn image, its title and (already safe) HTML notes below it."""

    title: str
    image: np.ndarray
    caption: str = ""
    notes_html: str = ""


def compose_row(panels: Sequence[Panel], gap: int = 6, title_height: int = 16) -> np.ndarray:
    """The panels side by side (white gaps) with each title written above its image."""
    hs = [p.image.shape[0] for p in panels]
    H = max(hs) + title_height
    W = sum(p.image.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.full((H, W, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        h, w = p.image.shape[:2]
        canvas[title_height:title_height + h, x:x + w] = p.image
        x += w + gap
    pil = Image.fromarray(canvas)
    d = ImageDraw.Draw(pil)
    x = 0
    for p in panels:
        w = p.image.shape[1]
        text, font = p.title, _font(11)
        while len(text) > 1 and d.textlength(text, font=font) > w - 2:
            text = text[:-2] + "…"
        d.text((x + 2, 1), text, fill=(40, 40, 40), font=font)
        x += w + gap
    return np.asarray(pil).copy()


# --------------------------------------------------------------------------- predictions


def _png_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if p.is_file() and not p.name.startswith("."))


def detect_pred_kind(pred: str | Path) -> str:
    """``"results"``, ``"labels"`` or ``"parts"`` (see the module doc); anything else is a one-line
    :class:`LabelwiseError` naming the path and what is accepted."""
    p = Path(pred)
    if not p.exists():
        raise LabelwiseError(f"PRED {p}: not found; pass {ACCEPTED}")
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "results"
        raise LabelwiseError(f"PRED {p}: a {p.suffix or 'suffix-less'} file is not a prediction; pass {ACCEPTED}")
    if (p / "parts").is_dir() and (p / "objects").is_dir():
        return "parts"
    if any(True for _ in p.rglob("*.png")):
        return "labels"
    if (p / "universal.json").is_file():
        return "results"
    raise LabelwiseError(f"PRED {p}: folder holds no label PNGs, no parts/ + objects/ and no universal.json; "
                         f"pass {ACCEPTED}")


def load_results(path: str | Path) -> list[dict]:
    """The records of a COCO results json (a list), or of a COCO instances json (its ``annotations``,
    given ``file_name`` from its ``images``); one-line error when it is neither."""
    path = Path(path)
    if path.is_dir():
        path = path / "universal.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelwiseError(f"PRED {path}: not a readable JSON file ({type(e).__name__}); pass {ACCEPTED}") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        names = {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}
        data = [dict(a, file_name=names[a.get("image_id")]) if names.get(a.get("image_id")) and isinstance(a, dict)
                else a for a in data["annotations"]]
    if not isinstance(data, list):
        raise LabelwiseError(f"PRED {path}: JSON holds a {type(data).__name__}, not a list of result records; "
                             f"pass {ACCEPTED}")
    for k, r in enumerate(data):
        if not isinstance(r, dict) or "segmentation" not in r:
            raise LabelwiseError(f"PRED {path}: record {k} is not a dict with a 'segmentation' (COCO results "
                                 "record); re-export the results")
    return data


def _level(r: dict) -> str:
    lv = r.get("level")
    return str(lv) if lv else "instance"


def _score(r: dict) -> float:
    try:
        return float(r.get("score", 0.0))
    except (TypeError, ValueError):
        return 0.0


def match_results(records: Sequence[dict], names: Sequence[str]) -> tuple[list[list[dict]], list[dict]]:
    """Group ``records`` by image: ``names`` are the image paths relative to ``--images`` (posix, in
    the sorted listing order). A record with a ``file_name`` goes to that image (exact relative
    path, else the one image whose path ends with it or that it ends with); one without goes by
    ``image_id`` (1-based position in ``names``). Returns ``(per_image, unmatched)``."""
    exact = {n: i for i, n in enumerate(names)}
    by_base: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        by_base.setdefault(n.rsplit("/", 1)[-1], []).append(i)
    per: list[list[dict]] = [[] for _ in names]
    unmatched: list[dict] = []
    for r in records:
        idx = None
        fn = r.get("file_name")
        if fn:
            fn = Path(str(fn)).as_posix()  # drops a leading ./
            idx = exact.get(fn)
            if idx is None:
                cands = [i for i in by_base.get(fn.rsplit("/", 1)[-1], [])
                         if names[i].endswith("/" + fn) or fn.endswith("/" + names[i])]
                idx = cands[0] if len(cands) == 1 else None
        else:
            try:
                iid = int(r.get("image_id"))
            except (TypeError, ValueError):
                iid = 0
            idx = iid - 1 if 1 <= iid <= len(names) else None
        if idx is None:
            unmatched.append(r)
        else:
            per[idx].append(r)
    return per, unmatched


def top_k_by_level(records: Sequence[dict], k: int) -> dict[str, tuple[list[dict], int]]:
    """``level -> (the k best records by score, best first; how many the level had)``; records
    without a ``level`` count as ``instance``."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_level(r), []).append(r)
    return {lv: (sorted(rs, key=_score, reverse=True)[:k], len(rs)) for lv, rs in groups.items()}


def _ordered_levels(levels) -> list[str]:
    levels = set(levels)
    return [lv for lv in LEVEL_ORDER if lv in levels] + sorted(levels - set(LEVEL_ORDER))


def match_label_files(folder: Path, names: Sequence[str]) -> tuple[list[Path | None], list[Path]]:
    """Label PNG of each image (``names``: relative image paths): ``<relative path without
    suffix>.png``, else the one PNG with the image's stem. Returns ``(per_image, unmatched_pngs)``."""
    files = _png_files(folder)
    rel = {p.relative_to(folder).with_suffix("").as_posix(): p for p in files}
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    per: list[Path | None] = []
    used: set[Path] = set()
    for n in names:
        key = n.rsplit(".", 1)[0] if "." in n.rsplit("/", 1)[-1] else n
        p = rel.get(key)
        if p is None:
            c = by_stem.get(key.rsplit("/", 1)[-1], [])
            p = c[0] if len(c) == 1 else None
        per.append(p)
        if p is not None:
            used.add(p)
    return per, [p for p in files if p not in used]


# --------------------------------------------------------------------------- ground truth


class _GroundTruth:
    """A dataset split's ground truth, looked up by image path."""

    def __init__(self, spec: str, split: str):
        from labelwise.data import build_dataset

        self.spec, self.split = spec, split
        self.ds = ds = build_dataset(spec, split)
        if hasattr(ds, "load_instances"):
            self.kind = "instances"
        elif hasattr(ds, "load_parts"):
            self.kind = "parts"
        elif getattr(ds, "has_masks", lambda: True)():
            self.kind = "labels"
        else:
            raise LabelwiseError(f"--gt {spec}: split {split!r} has no ground-truth masks; pass a voc:, coco: or "
                                 "parts: dataset")
        self.class_names = list(getattr(ds, "class_names", []))
        self.part_names = list(getattr(ds, "part_names", []) or [])
        self.by_name: dict[str, int] = {}
        self.by_id: dict[str, int] = {}
        by_stem: dict[str, list[int]] = {}
        for i in range(len(ds)):
            fn = ds.file_name(i) if hasattr(ds, "file_name") else ds.image_path(i).name
            self.by_name.setdefault(Path(fn).as_posix(), i)
            self.by_id.setdefault(str(ds.ids[i]), i)
            by_stem.setdefault(Path(fn).stem, []).append(i)
        self.by_stem = {s: v[0] for s, v in by_stem.items() if len(v) == 1}

    def find(self, name: str) -> int | None:
        stem_path = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
        for table, key in ((self.by_name, name), (self.by_id, stem_path), (self.by_name, name.rsplit("/", 1)[-1]),
                           (self.by_id, stem_path.rsplit("/", 1)[-1]), (self.by_stem, stem_path.rsplit("/", 1)[-1])):
            if key in table:
                return table[key]
        return None

    def load(self, index: int) -> dict:
        ds = self.ds
        if self.kind == "instances":
            inst = ds.load_instances(index)
            return {"instances": inst} if inst else {"mask": ds.load_mask(index)}
        if hasattr(ds, "load_labels"):
            return ds.load_labels(index)
        item = ds[index]
        return {k: item[k] for k in ("mask", "parts", "objects", "instances") if k in item}


# --------------------------------------------------------------------------- HTML notes


def _name(names: Sequence[str], k: int) -> str:
    if k == IGNORE_INDEX:
        return "ignore"
    return names[k] if 0 <= k < len(names) else f"id {k}"


def _label_notes(label: np.ndarray, names: Sequence[str], background: bool, max_rows: int = 12) -> tuple[str, str]:
    """(caption, legend table) of a label map: the ids present with their colour and pixel share."""
    counts = np.bincount(np.asarray(label, dtype=np.int64).reshape(-1), minlength=256)
    total = max(int(counts.sum()), 1)
    ids = [int(k) for k in np.flatnonzero(counts) if not (background and k == 0)]
    ids.sort(key=lambda k: -counts[k])
    shown = [k for k in ids if k != IGNORE_INDEX]
    caption = f"{len(shown)} {'classes' if background else 'ids'}" if shown else "no masks"
    if not ids:
        return caption, ""
    rows = []
    for k in ids[:max_rows]:
        col = (255, 255, 255) if k == IGNORE_INDEX else colorize_label(
            np.array([[k if background else min(k + 1, 254)]]))[0, 0]
        rows.append((swatch(col) + escape(str(k)), _name(names, k), f"{100.0 * counts[k] / total:.1f}%"))
    if len(ids) > max_rows:
        rows.append(("&hellip;", f"{len(ids) - max_rows} more", ""))
    return caption, html_table(["id", "name", "pixels"], rows, raw_first_column=True)


def _records_notes(recs: Sequence[dict], areas: Sequence[int], cols: np.ndarray) -> str:
    rows = [(swatch(cols[k]) + str(k + 1), f"{_score(r):.3f}", _level(r), int(areas[k]),
             r.get("category_id", "")) for k, r in enumerate(recs)]
    return html_table(["#", "score", "level", "area", "category"], rows, raw_first_column=True)


# --------------------------------------------------------------------------- the gallery


@dataclass
class _Ctx:
    kind: str
    top: int
    alpha: float
    background: bool
    levels: list[str] = field(default_factory=list)
    results: list[list[dict]] | None = None
    label_files: list[Path | None] | None = None
    part_files: list[Path | None] | None = None
    object_files: list[Path | None] | None = None
    gt: _GroundTruth | None = None
    stats: dict[str, int] = field(default_factory=dict)


def _read_label_at(path: Path | None, size_hw: tuple[int, int], ctx: _Ctx) -> np.ndarray | None:
    if path is None:
        return None
    # label PNGs and 16-bit cluster maps (more than 255 clusters, io.write_cluster_map) alike;
    # the palette has 255 colours, so beyond that cluster colours repeat
    ids = read_cluster_map(path)
    lab = np.where(ids < 0, 255, ids % 255).astype(np.uint8)
    if lab.shape != tuple(size_hw):
        ctx.stats["size_mismatch"] = ctx.stats.get("size_mismatch", 0) + 1
    return lab


def _label_panel(title: str, disp: np.ndarray, label: np.ndarray | None, names: Sequence[str],
                 background: bool, alpha: float, missing: str = "no masks") -> Panel:
    if label is None:
        return Panel(title, disp.copy(), missing)
    lab = resize_nearest(label, disp.shape[:2])
    caption, notes = _label_notes(label, names, background)
    return Panel(title, draw_label_map(disp, lab, alpha=alpha, background=background), caption, notes)


def _prediction_panels(i: int, image: np.ndarray, disp: np.ndarray, ctx: _Ctx) -> list[Panel]:
    h, w = image.shape[:2]
    gt = ctx.gt
    if ctx.kind == "results":
        panels = []
        groups = top_k_by_level(ctx.results[i], ctx.top)
        for lv in ctx.levels:
            recs, n_all = groups.get(lv, ([], 0))
            if not recs:
                panels.append(Panel(lv, disp.copy(), "no masks"))
                continue
            full = []
            for r in recs:  # at most --top masks
                try:
                    m = decode_mask(r["segmentation"], h, w)
                except (ValueError, TypeError, KeyError) as e:
                    raise LabelwiseError(f"PRED: record of image_id {r.get('image_id')} "
                                         f"({r.get('file_name', 'no file_name')}) has an undecodable segmentation "
                                         f"({e}); re-export the results") from None
                if m.shape != (h, w):
                    ctx.stats["size_mismatch"] = ctx.stats.get("size_mismatch", 0) + 1
                full.append(m)
            areas = [int(m.sum()) for m in full]
            masks = resize_nearest(np.stack(full), disp.shape[:2])
            cols = distinct_colors(len(recs))
            drawn = draw_masks(disp, masks, cols, alpha=ctx.alpha)
            ctx.stats["masks_drawn"] += len(recs)
            cap = f"{lv}: top {len(recs)} of {n_all}" if n_all > len(recs) else f"{lv}: {len(recs)} masks"
            panels.append(Panel(lv, drawn, cap, _records_notes(recs, areas, cols)))
        return panels
    if ctx.kind == "labels":
        lab = _read_label_at(ctx.label_files[i], (h, w), ctx)
        names = gt.class_names if (gt is not None and ctx.background and gt.kind != "parts") else []
        if lab is not None:
            ctx.stats["masks_drawn"] += 1
        return [_label_panel("prediction", disp, lab, names, ctx.background, ctx.alpha, "no masks (no label PNG)")]
    parts = _read_label_at(ctx.part_files[i], (h, w), ctx)
    objects = _read_label_at(ctx.object_files[i], (h, w), ctx)
    ctx.stats["masks_drawn"] += int(parts is not None) + int(objects is not None)
    pn = gt.part_names if (gt is not None and gt.kind == "parts") else []
    on = gt.class_names if (gt is not None and gt.kind == "parts") else []
    return [_label_panel("parts", disp, parts, pn, ctx.background, ctx.alpha, "no masks (no parts PNG)"),
            _label_panel("objects", disp, objects, on, ctx.background, ctx.alpha, "no masks (no objects PNG)")]


def _gt_panels(name: str, disp: np.ndarray, ctx: _Ctx) -> list[Panel]:
    gt = ctx.gt
    titles = {"instances": ["GT instances"], "labels": ["GT"], "parts": ["GT parts", "GT objects"]}[gt.kind]
    idx = gt.find(name)
    if idx is None:
        ctx.stats["gt_missing"] += 1
        return [Panel(t, disp.copy(), f"no ground truth in {gt.spec} ({gt.split})") for t in titles]
    item = gt.load(idx)
    if "instances" in item:
        inst = item["instances"]
        full = np.stack([np.asarray(a["mask"], dtype=bool) for a in inst])
        masks = resize_nearest(full, disp.shape[:2])
        cols = distinct_colors(len(inst))
        rows = [(swatch(cols[k]) + str(k + 1), _name(gt.class_names, int(a.get("category", -1))),
                 int(full[k].sum()), "yes" if a.get("iscrowd") else "") for k, a in enumerate(inst)]
        return [Panel(titles[0], draw_masks(disp, masks, cols, alpha=ctx.alpha), f"{len(inst)} instances",
                      html_table(["#", "class", "area", "crowd"], rows, raw_first_column=True))]
    if gt.kind == "parts":
        return [_label_panel(titles[0], disp, item.get("parts"), gt.part_names, True, ctx.alpha),
                _label_panel(titles[1], disp, item.get("objects"), gt.class_names, True, ctx.alpha)]
    return [_label_panel(titles[0], disp, item.get("mask"), gt.class_names, True, ctx.alpha)]


def _out_key(name: str, used: set[str]) -> str:
    base = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    key = base
    if key.lower() == "index" or key in used:
        key = base + "_" + name.rsplit(".", 1)[-1]
    n = 2
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def show_predictions(pred: str | Path, images: str | Path, out: str | Path, *, gt: str | None = None,
                     split: str = "val", top: int = 10, max_images: int | None = None, max_side: int = 512,
                     alpha: float = 0.45, background: bool = True, progress: bool = True,
                     per_page: int = 25) -> dict[str, Any]:
    """Draw ``pred`` over the images of ``images`` (and the ground truth of ``gt`` split ``split``):
    ``out/<image stem>.png`` (the row of panels) for each image and ``out/index.html`` (one
    self-contained gallery; ``per_page`` images per HTML file, the next ones in
    ``out/page-2.html``, ... linked from each page). Returns the counts (``images``, ``images_total``,
    ``images_with_pred``, ``masks_drawn``, ``records``, ``unmatched``, ``unreadable``, ...).

    ``top``: masks per image and level (results json); ``max_images``: the first N images of the
    sorted listing; ``max_side``: display size (longer side, pixels); ``background=False``: label
    PNGs hold cluster ids (0 is a cluster, 255 = none).
    """
    from labelwise.utils import progress as progress_bar

    if top < 1:
        raise LabelwiseError(f"--top must be >= 1, got {top}")
    if max_images is not None and max_images < 1:
        raise LabelwiseError(f"--max-images must be >= 1, got {max_images}")
    if max_side < 16:
        raise LabelwiseError(f"--max-side must be >= 16 pixels, got {max_side}")
    if not 0.0 <= alpha <= 1.0:
        raise LabelwiseError(f"--alpha must be in [0, 1], got {alpha}")
    pred, images, out = Path(pred), Path(images), Path(out)
    if not images.is_dir():
        raise LabelwiseError(f"--images {images}: folder not found; pass the directory of the predicted images")
    kind = detect_pred_kind(pred)
    paths = list_images(images)
    if not paths:
        raise LabelwiseError(f"--images {images}: no images found (jpg/png/bmp/tif/webp, recursive)")
    try:
        out.resolve().relative_to(images.resolve())
        inside = True
    except ValueError:
        inside = False
    if inside:
        raise LabelwiseError(f"--out {out} lies inside --images {images}; its PNGs would be listed as images "
                             "next time; pick another folder")
    names = [p.relative_to(images).as_posix() for p in paths]
    ctx = _Ctx(kind=kind, top=int(top), alpha=float(alpha), background=bool(background))
    ctx.stats = {"masks_drawn": 0, "gt_missing": 0, "size_mismatch": 0}
    summary: dict[str, Any] = {"pred": str(pred), "kind": kind, "images_total": len(paths)}
    if kind == "results":
        records = load_results(pred)
        ctx.results, unmatched = match_results(records, names)
        ctx.levels = _ordered_levels({_level(r) for r in records}) or ["instance"]
        summary.update(records=len(records), unmatched=len(unmatched),
                       unmatched_what="records", levels=ctx.levels)
    elif kind == "labels":
        ctx.label_files, extra = match_label_files(pred, names)
        summary.update(records=len(_png_files(pred)), unmatched=len(extra), unmatched_what="label PNGs")
    else:
        ctx.part_files, extra_p = match_label_files(pred / "parts", names)
        ctx.object_files, extra_o = match_label_files(pred / "objects", names)
        summary.update(records=len(_png_files(pred / "parts")) + len(_png_files(pred / "objects")),
                       unmatched=len(extra_p) + len(extra_o), unmatched_what="label PNGs")
    if gt is not None:
        ctx.gt = _GroundTruth(gt, split)
    shown = list(range(len(paths) if max_images is None else min(max_images, len(paths))))
    out.mkdir(parents=True, exist_ok=True)

    rows_html: list[str] = []
    used: set[str] = set()
    n_panels = n_with_pred = n_unreadable = 0
    for i in (progress_bar(shown, desc="show", total=len(shown)) if progress else shown):
        name = names[i]
        try:
            image = read_image(paths[i])
        except LabelwiseError as e:
            n_unreadable += 1
            rows_html.append(f"<h3>{escape(name)}</h3><p class=\"meta\">unreadable image: {escape(str(e))}</p>")
            continue
        disp = resize_image(image, max_side)
        h, w = image.shape[:2]
        panels = [Panel("image", disp, f"{w}x{h}")]
        before = ctx.stats["masks_drawn"]
        panels += _prediction_panels(i, image, disp, ctx)
        has_pred = ctx.stats["masks_drawn"] > before
        n_with_pred += int(has_pred)
        if ctx.gt is not None:
            panels += _gt_panels(name, disp, ctx)
        key = _out_key(name, used)
        write_image(out / f"{key}.png", compose_row(panels))
        n_panels += len(panels)
        figs = "".join(img_html(p.image, f"{p.title}: {p.caption}" if p.caption else p.title, alt=p.title)
                       for p in panels)
        notes = "".join(f"<div><b>{escape(p.title)}</b>{p.notes_html}</div>" for p in panels if p.notes_html)
        tail = "" if has_pred else " &middot; no masks"
        rows_html.append(f"<h3>{escape(name)}<span class=\"meta\"> &middot; {escape(key)}.png{tail}</span></h3>"
                         f"<div class=\"row\">{figs}</div>" + (f"<div class=\"row\">{notes}</div>" if notes else ""))

    summary.update(images=len(shown), images_with_pred=n_with_pred, masks_drawn=ctx.stats["masks_drawn"],
                   unreadable=n_unreadable, panels=n_panels, size_mismatch=ctx.stats["size_mismatch"],
                   gt=gt, gt_missing=ctx.stats["gt_missing"] if gt is not None else 0,
                   out=str(out), html=str(out / "index.html"))
    summary["unmatched_line"] = (
        f"{summary['unmatched']} of {summary['records']} {summary['unmatched_what']} match no image under {images}"
        + (" (by file_name, else image_id 1..%d)" % len(paths) if kind == "results" else " (by <image stem>.png)")
        + "; they are not drawn") if summary["unmatched"] else ""

    what = {"results": "masks drawn (top %d per image and level)" % top, "labels": "label maps drawn",
            "parts": "part/object maps drawn"}[kind]
    facts = [("images shown", len(shown)), ("with predictions", n_with_pred), (what, ctx.stats["masks_drawn"]),
             (f"unmatched {summary['unmatched_what']}", summary["unmatched"])]
    lines = [f"PRED <code>{escape(str(pred))}</code> ({escape(kind)}), {summary['records']} "
             f"{escape(summary['unmatched_what'])}; images <code>{escape(str(images))}</code>: {len(shown)} of "
             f"{len(paths)} shown (sorted order)."]
    if gt is not None:
        lines.append(f"Ground truth <code>{escape(gt)}</code> split {escape(split)}"
                     + (f"; {ctx.stats['gt_missing']} shown images have none." if ctx.stats["gt_missing"] else "."))
    if summary["unmatched_line"]:
        lines.append(escape(summary["unmatched_line"]) + ".")
    if n_unreadable:
        lines.append(f"{n_unreadable} images could not be read.")
    if ctx.stats["size_mismatch"]:
        lines.append(f"{ctx.stats['size_mismatch']} masks/maps differ in size from their image (resized, nearest).")
    intro = headline(facts) + "".join(f"<p>{ln}</p>" for ln in lines)
    # pages of per_page images keep each self-contained HTML file small (images are inlined)
    pages = [rows_html[k:k + per_page] for k in range(0, len(rows_html), max(per_page, 1))] or [[]]
    names_html = ["index.html"] + [f"page-{n}.html" for n in range(2, len(pages) + 1)]
    for n, rows in enumerate(pages):
        nav = ""
        if len(pages) > 1:
            links = " ".join(f"<b>{k + 1}</b>" if k == n else f"<a href=\"{escape(names_html[k])}\">{k + 1}</a>"
                             for k in range(len(pages)))
            nav = f"<p class=\"meta\">page {n + 1} of {len(pages)} ({per_page} images each): {links}</p>"
        write_report(out / names_html[n], [Section("Summary", intro + nav, "summary"),
                                           Section("Images", "".join(rows) + nav, "images")],
                     title=f"labelwise show: {pred.name}" + (f" ({n + 1}/{len(pages)})" if len(pages) > 1 else ""),
                     subtitle=f"PRED {pred}")
    summary["pages"] = len(pages)
    return summary
