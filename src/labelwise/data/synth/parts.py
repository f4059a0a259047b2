"""``parts``: a part-parsing testbed (parts layout, like PartImageNet).

Five object classes made of 2-4 parts each are drawn (1-3 objects per image, small
rotations, mirrored at random) on textured backgrounds:

==========  ===================================
object      parts (painting order)
==========  ===================================
quadruped   leg, torso, head
biped       leg, arm, torso, head
car         wheel, body, window
bicycle     wheel, frame
fish        tail, fin, body
==========  ===================================

Some parts *look alike* across objects -- same shape, size (relative to the object),
texture and colours: ``quadruped_head``/``biped_head``, ``quadruped_leg``/``biped_leg``
and ``car_wheel``/``bicycle_wheel``. Their part label cannot be read off their own
pixels; it needs the object around them (the torso, body or frame, which differ).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelwise.data.synth import common, draw
from labelwise.io import atomic_write_json, write_image, write_label
from labelwise.utils import progress

KIND = "parts"

# Appearances: (texture, frequency in cycles per object radius, colour 0, colour 1, texture angle)
LOOKS = {
    "head": ("dots", 4.0, (235, 195, 150), (130, 75, 40), 0.4),
    "leg": ("stripes", 6.0, (95, 60, 40), (35, 20, 10), np.pi / 2),
    "wheel": ("radial", 6.0, (25, 25, 25), (160, 160, 165), 0.0),
    "quadruped_torso": ("checker", 4.0, (210, 160, 60), (130, 80, 25), 0.0),
    "biped_torso": ("stripes", 4.0, (40, 90, 200), (200, 210, 245), 0.0),
    "biped_arm": ("grid", 5.0, (60, 170, 80), (20, 60, 30), 0.0),
    "car_body": ("plain", 1.0, (205, 30, 30), (250, 90, 70), 0.0),
    "car_window": ("stripes", 5.0, (150, 200, 235), (225, 240, 252), 0.8),
    "bicycle_frame": ("plain", 1.0, (20, 165, 165), (90, 230, 225), 0.0),
    "fish_body": ("zigzag", 4.0, (245, 140, 30), (250, 225, 120), np.pi / 2),
    "fish_tail": ("stripes", 5.0, (200, 55, 20), (250, 150, 80), 0.0),
    "fish_fin": ("radial", 5.0, (120, 40, 150), (230, 170, 240), 0.0),
}


def _disc(cx, cy, r):
    return lambda u, v: (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _rect(cx, cy, hx, hy):
    return lambda u, v: (np.abs(u - cx) <= hx) & (np.abs(v - cy) <= hy)


def _poly(*pts):
    """Convex polygon (vertices in clockwise or counter-clockwise order)."""
    pts = np.asarray(pts, dtype=np.float32)

    def f(u, v):
        inside_ccw = np.ones(u.shape, dtype=bool)
        inside_cw = np.ones(u.shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
            cross = (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)
            inside_ccw &= cross >= 0
            inside_cw &= cross <= 0
        return inside_ccw | inside_cw
    return f


def _segments(segs, width):
    """Union of thick line segments ``((x0, y0), (x1, y1))``."""
    def f(u, v):
        m = np.zeros(u.shape, dtype=bool)
        for (x0, y0), (x1, y1) in segs:
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
            m |= (u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2 <= width * width
        return m
    return f


def _union(*fs):
    def f(u, v):
        m = fs[0](u, v)
        for g in fs[1:]:
            m = m | g(u, v)
        return m
    return f


# object -> list of (part name, look, shape function, texture centre) in painting order
OBJECTS = {
    "quadruped": [
        ("leg", "leg", _union(*(_rect(x, 0.62, 0.09, 0.38) for x in (-0.65, -0.38, 0.38, 0.65))), (0.0, 0.62)),
        ("torso", "quadruped_torso", lambda u, v: (u / 0.9) ** 2 + (v / 0.45) ** 2 <= 1, (0.0, 0.0)),
        ("head", "head", _disc(0.95, -0.45, 0.32), (0.95, -0.45)),
    ],
    "biped": [
        ("leg", "leg", _union(_rect(-0.15, 0.75, 0.09, 0.38), _rect(0.15, 0.75, 0.09, 0.38)), (0.0, 0.75)),
        ("arm", "biped_arm", _union(_rect(-0.4, -0.05, 0.08, 0.4), _rect(0.4, -0.05, 0.08, 0.4)), (0.0, -0.05)),
        ("torso", "biped_torso", _rect(0.0, -0.05, 0.3, 0.45), (0.0, -0.05)),
        ("head", "head", _disc(0.0, -0.8, 0.32), (0.0, -0.8)),
    ],
    "car": [
        ("wheel", "wheel", _union(_disc(-0.6, 0.35, 0.28), _disc(0.6, 0.35, 0.28)), None),
        ("body", "car_body", _union(_rect(0.0, 0.05, 1.0, 0.3), _poly((-0.55, -0.25), (0.55, -0.25),
                                                                       (0.35, -0.65), (-0.35, -0.65))), (0.0, 0.0)),
        ("window", "car_window", _union(_rect(-0.2, -0.43, 0.14, 0.14), _rect(0.2, -0.43, 0.14, 0.14)), (0.0, -0.43)),
    ],
    "bicycle": [
        ("wheel", "wheel", _union(_disc(-0.6, 0.35, 0.28), _disc(0.6, 0.35, 0.28)), None),
        ("frame", "bicycle_frame", _segments([((-0.6, 0.35), (-0.1, -0.25)), ((-0.1, -0.25), (0.45, -0.25)),
                                              ((0.45, -0.25), (0.6, 0.35)), ((-0.1, -0.25), (0.05, 0.35)),
                                              ((0.05, 0.35), (-0.6, 0.35)), ((0.05, 0.35), (0.45, -0.25)),
                                              ((0.45, -0.25), (0.38, -0.55)), ((0.25, -0.55), (0.5, -0.55)),
                                              ((-0.25, -0.38), (0.0, -0.38))], 0.07), (0.0, 0.0)),
    ],
    "fish": [
        ("tail", "fish_tail", _poly((-0.6, 0.0), (-1.2, -0.45), (-1.2, 0.45)), (-0.9, 0.0)),
        ("fin", "fish_fin", _poly((-0.3, -0.25), (0.35, -0.25), (-0.15, -0.75)), (0.0, -0.3)),
        ("body", "fish_body", lambda u, v: (u / 0.85) ** 2 + (v / 0.42) ** 2 <= 1, (0.0, 0.0)),
    ],
}
WHEEL_CENTRES = ((-0.6, 0.35), (0.6, 0.35))

OBJECT_NAMES = ["background", *OBJECTS]
PART_NAMES = ["background"] + [f"{obj}_{part}" for obj, parts in OBJECTS.items() for part, *_ in parts]
PART_TO_OBJECT = [0] + [OBJECT_NAMES.index(obj) for obj, parts in OBJECTS.items() for _ in parts]
# Parts that share their appearance (shape, size, texture, colours) across objects.
LOOKALIKES = [["quadruped_head", "biped_head"], ["quadruped_leg", "biped_leg"], ["car_wheel", "bicycle_wheel"]]
BACKGROUND_CHOICES = ("grass", "sand", "snow", "sky", "gravel")

OPTIONS = {
    "min_objects": (1, 1, 6, "fewest objects per image"),
    "max_objects": (3, 1, 6, "most objects per image"),
    "min_visible": (0.85, 0.0, 1.0, "fraction of each object left visible by later objects"),
}


def _texture_for(look: str, u, v, centre, rng):
    tex, freq, c0, c1, angle = LOOKS[look]
    if centre is None:  # wheels: radial spokes around each wheel's own centre
        d = [(u - x) ** 2 + (v - y) ** 2 for x, y in WHEEL_CENTRES]
        near = d[0] <= d[1]
        uu = np.where(near, u - WHEEL_CENTRES[0][0], u - WHEEL_CENTRES[1][0])
        vv = v - WHEEL_CENTRES[0][1]
    else:
        uu, vv = u - centre[0], v - centre[1]
    pattern = draw.texture(tex, uu, vv, freq, angle=angle, phase=rng.uniform(0, 2 * np.pi))
    return draw.colourise(pattern, draw.jitter_colour(rng, c0, 8), draw.jitter_colour(rng, c1, 8))


def draw_image(rng: np.random.Generator, size: int, opts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image with its part and object labels."""
    bg = BACKGROUND_CHOICES[int(rng.integers(len(BACKGROUND_CHOICES)))]
    canvas = common.draw_background(bg, rng, size)
    parts = np.zeros((size, size), np.uint8)
    objects = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int32)
    areas: list[int] = []
    lo, hi = opts["min_objects"], max(opts["min_objects"], opts["max_objects"])
    n_obj = int(rng.integers(lo, hi + 1))
    obj_names = list(OBJECTS)
    for k in range(n_obj):
        name = obj_names[int(rng.integers(len(obj_names)))]
        for attempt in range(20):
            radius = size * rng.uniform(0.18, 0.28)
            cx, cy = rng.uniform(radius * 1.1, size - radius * 1.1, 2)
            u, v = draw.local_coords(size, cx, cy, radius, rng.uniform(-0.2, 0.2), flip=bool(rng.random() < 0.5))
            masks = [fn(u, v) for _, _, fn, _ in OBJECTS[name]]
            full = np.logical_or.reduce(masks)
            if common.place_ok(inst, areas, full, opts["min_visible"]):
                break
        else:
            if k > 0:
                continue
        obj_idx = OBJECT_NAMES.index(name)
        for (part, look, _, centre), m in zip(OBJECTS[name], masks):
            draw.paint(canvas, m, _texture_for(look, u, v, centre, rng))
            parts[m] = PART_NAMES.index(f"{name}_{part}")
        objects[full] = obj_idx
        areas.append(int(full.sum()))
        inst[full] = len(areas)
    return draw.finish(canvas, rng), parts, objects


def generate(out_dir: Path, splits: dict[str, int], size: int, seed: int, opts: dict) -> dict:
    hierarchy = {"objects": OBJECT_NAMES,
                 "parts": [{"name": p, "object": OBJECT_NAMES[o]} for p, o in zip(PART_NAMES, PART_TO_OBJECT)]}
    atomic_write_json(out_dir / "hierarchy.json", hierarchy)
    stats = {}
    for split, n in splits.items():
        for sub in ("images", "parts", "objects"):
            (out_dir / sub / split).mkdir(parents=True, exist_ok=True)
        part_px = np.zeros(len(PART_NAMES), np.int64)
        part_imgs = np.zeros(len(PART_NAMES), np.int64)
        obj_imgs = np.zeros(len(OBJECT_NAMES), np.int64)
        for i in progress(range(n), desc=f"synth parts {split}", total=n):
            rng = draw.image_rng(seed, KIND, split, i)
            image, part_label, obj_label = draw_image(rng, size, opts)
            stem = f"{split}_{i:06d}"
            write_image(out_dir / "images" / split / f"{stem}.jpg", image, quality=95)
            write_label(out_dir / "parts" / split / f"{stem}.png", part_label)
            write_label(out_dir / "objects" / split / f"{stem}.png", obj_label)
            counts = np.bincount(part_label.ravel(), minlength=len(PART_NAMES))
            part_px += counts
            part_imgs += counts > 0
            obj_imgs += np.bincount(obj_label.ravel(), minlength=len(OBJECT_NAMES)) > 0
        stats[split] = {
            "images": n,
            "part_images": {p: int(c) for p, c in zip(PART_NAMES, part_imgs)},
            "part_pixel_fraction": {p: float(c / max(1, n * size * size)) for p, c in zip(PART_NAMES, part_px)},
            "object_images": {o: int(c) for o, c in zip(OBJECT_NAMES, obj_imgs)},
        }
    return {
        "format": "parts",
        "objects": OBJECT_NAMES,
        "parts": PART_NAMES,
        "part_to_object": PART_TO_OBJECT,
        "lookalikes": LOOKALIKES,
        "statistics": stats,
    }
