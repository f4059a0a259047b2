"""Shared pieces of the testbed generators: backgrounds, option checking, output folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from labelwise.data.synth import draw
from labelwise.errors import LabelwiseError

MIN_SIZE = 32
MAX_SIZE = 4096

# --------------------------------------------------------------------------- backgrounds
# Textured "stuff". Each one has its own colours *and* its own kind of texture (direction,
# frequency, structure), so a classifier can tell them apart from a patch.

BACKGROUNDS = ("water", "grass", "sand", "brick", "snow", "sky", "gravel")


def draw_background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``size x size x 3`` float32 canvas (0..255) filled with background ``name``."""
    xs, ys = draw.pixel_grid(size)
    x = xs / np.float32(size)
    y = ys / np.float32(size)
    ph = rng.uniform(0, 2 * np.pi)
    low = draw.smooth_noise(rng, size, 3)
    if name == "water":  # horizontal waves, blue
        wobble = 0.015 * np.sin(np.float32(2 * np.pi * rng.uniform(2, 4)) * x + ph)
        t = 0.65 * draw._wave(y + wobble, rng.uniform(10, 14), ph) + 0.35 * low
        return draw.colourise(t, draw.jitter_colour(rng, (25, 70, 150), 8), draw.jitter_colour(rng, (90, 150, 215), 8))
    if name == "grass":  # fine near-vertical blades, green
        ang = rng.uniform(-0.25, 0.25)
        blades = draw.texture("stripes", x, y, rng.uniform(26, 34), angle=ang, phase=ph)
        t = 0.6 * blades * draw.smooth_noise(rng, size, 12) + 0.4 * low
        return draw.colourise(t, draw.jitter_colour(rng, (30, 95, 30), 8), draw.jitter_colour(rng, (120, 185, 60), 8))
    if name == "sand":  # soft diagonal dunes + grain, beige
        dunes = draw.texture("stripes", x, y, rng.uniform(3, 5), angle=rng.uniform(0.5, 1.0), phase=ph)
        grain = rng.random((size, size), dtype=np.float32)
        t = 0.5 * dunes + 0.25 * low + 0.25 * grain
        return draw.colourise(t, draw.jitter_colour(rng, (180, 150, 100), 8), draw.jitter_colour(rng, (240, 215, 160), 8))
    if name == "brick":  # staggered bricks with light mortar, red-brown
        rows = rng.uniform(7, 9)
        r = y * np.float32(rows)
        row_idx = np.floor(r)
        cx = x * np.float32(rows / 2) + 0.5 * (row_idx % 2)
        mortar = (np.abs(r - np.round(r)) < 0.09) | (np.abs(cx - np.round(cx)) < 0.05)
        base = draw.colourise(0.6 * low + 0.4 * draw.smooth_noise(rng, size, 16),
                              draw.jitter_colour(rng, (120, 40, 30), 8), draw.jitter_colour(rng, (175, 75, 50), 8))
        base[mortar] = draw.jitter_colour(rng, (200, 195, 185), 6)
        return base
    if name == "snow":  # bright, smooth, sparse grey specks
        specks = draw.texture("dots", x, y, rng.uniform(18, 24), angle=rng.uniform(0, np.pi), phase=ph)
        t = 0.25 * low + 0.75 * (1 - 0.5 * specks * (draw.smooth_noise(rng, size, 8) > 0.6))
        return draw.colourise(t, draw.jitter_colour(rng, (170, 175, 190), 6), draw.jitter_colour(rng, (248, 248, 252), 4))
    if name == "sky":  # vertical gradient, light blue, faint clouds
        t = np.clip(0.7 * y + 0.3 * draw.smooth_noise(rng, size, 4), 0, 1)
        return draw.colourise(t, draw.jitter_colour(rng, (110, 160, 230), 8), draw.jitter_colour(rng, (200, 225, 250), 8))
    if name == "gravel":  # blotchy grey cells
        t = 0.5 * draw.smooth_noise(rng, size, max(4, size // 8)) + 0.3 * draw.smooth_noise(rng, size, max(4, size // 4)) \
            + 0.2 * low
        return draw.colourise(t, draw.jitter_colour(rng, (70, 70, 75), 6), draw.jitter_colour(rng, (160, 160, 150), 6))
    raise ValueError(f"unknown background {name!r}")


# --------------------------------------------------------------------------- checking input


def check_counts(n_train: int, n_val: int, size: int, seed: int) -> None:
    for flag, n in (("--train", n_train), ("--val", n_val)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise LabelwiseError(f"{flag} {n!r}: the number of images must be a non-negative integer")
    if n_train + n_val == 0:
        raise LabelwiseError("--train 0 --val 0: nothing to generate; ask for at least one image")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise LabelwiseError(f"--size {size!r}: image size must be an integer in {MIN_SIZE}..{MAX_SIZE} pixels")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise LabelwiseError(f"--seed {seed!r}: the seed must be a non-negative integer")


def resolve_options(kind: str, spec: dict[str, tuple[Any, float | None, float | None, str]],
                    given: dict[str, Any]) -> dict[str, Any]:
    """Check ``given`` against ``spec`` (name -> (default, lo, hi, help)) and fill defaults."""
    import difflib

    out = {k: v[0] for k, v in spec.items()}
    for key, value in given.items():
        if value is None:
            continue
        if key not in spec:
            close = difflib.get_close_matches(key, list(spec), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LabelwiseError(f"synth {kind}: unknown option {key!r}; {hint}valid options: {', '.join(spec)}")
        default, lo, hi, _ = spec[key]
        try:
            value = type(default)(value)
        except (TypeError, ValueError):
            raise LabelwiseError(f"synth {kind}: option {key}={value!r} must be a {type(default).__name__}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise LabelwiseError(f"synth {kind}: option {key}={value!r} is out of range [{lo}, {hi}]")
        out[key] = value
    return out


# --------------------------------------------------------------------------- output folder

# What each generator writes (removed before regenerating so no stale files remain).
LAYOUT_PATHS = {
    "cooc": ["JPEGImages", "SegmentationClass", "ImageSets", "class_names.txt", "contexts.txt"],
    "parts": ["images", "parts", "objects", "hierarchy.json"],
    "objects": ["images", "annotations"],
}
META = "meta.json"


def read_meta(out_dir: Path) -> dict | None:
    try:
        meta = json.loads((out_dir / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def prepare_out_dir(out_dir: str | Path, kind: str, overwrite: bool) -> Path:
    """Make ``out_dir`` ready: create it, or clear a previous testbed of the same kind.

    A non-empty folder that is not a testbed of this kind is refused unless ``overwrite``;
    even then only the paths a testbed writes are removed, never other files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LabelwiseError(f"{out_dir}: exists and is not a directory; pass a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        meta = read_meta(out_dir)
        prev = meta.get("kind") if meta and str(meta.get("generator", "")).startswith("labelwise.data.synth") else None
        if prev != kind and not overwrite:
            what = f"a '{prev}' testbed" if prev else "not a synthetic testbed"
            raise LabelwiseError(f"{out_dir}: folder is not empty ({what}); pass an empty folder or --overwrite")
        for p in sorted(set(LAYOUT_PATHS[kind]) | set(LAYOUT_PATHS.get(prev, [])) | {META}):
            target = out_dir / p
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def place_ok(inst_map: np.ndarray, full_areas: list[int], mask: np.ndarray, keep: float) -> bool:
    """Whether painting ``mask`` on top keeps >= ``keep`` of every earlier instance visible."""
    if not full_areas:
        return True
    covered = np.bincount(inst_map[mask].ravel(), minlength=len(full_areas) + 1)[1:]
    visible = np.bincount(inst_map.ravel(), minlength=len(full_areas) + 1)[1:]
    return bool(np.all(visible - covered >= keep * np.asarray(full_areas)))
