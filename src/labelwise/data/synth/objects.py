"""``objects``: an instance / semantic / panoptic testbed (COCO layout, RLE masks).

Each image is split into 2-3 bands of textured *stuff* (``sky``, ``grass``, ``water``,
``sand``; wavy boundaries) and holds several *thing* instances (``disc``, ``square``,
``triangle``, ``hexagon``; each class with its own texture and colours). With
probability ``touch_rate`` an instance gets a touching neighbour of the same class
(partly in front of it), the hard case for class-agnostic instance masks: the two
regions meet along a shared boundary and look alike.

``annotations/instances_SPLIT.json`` holds one annotation per visible thing instance
(``isthing: 1`` categories) and one per stuff class present in the image (``isthing: 0``,
the band minus the things in front of it), so the annotations tile every image exactly
once -- usable for instance (things only), semantic and panoptic evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from labelwise.data.synth import common, draw
from labelwise.io import atomic_write_json, write_image
from labelwise.utils import progress

KIND = "objects"

# thing name: (shape, texture, frequency, colour 0, colour 1)
THINGS = {
    "disc": ("disc", "rings", 2.5, (235, 120, 25), (250, 205, 70)),
    "square": ("square", "checker", 2.5, (235, 225, 60), (70, 45, 130)),
    "triangle": ("triangle", "stripes", 3.0, (185, 60, 205), (250, 175, 240)),
    "hexagon": ("hexagon", "dots", 3.0, (200, 35, 45), (250, 235, 225)),
}
STUFF = ("sky", "grass", "water", "sand")
CATEGORIES = ([{"id": i + 1, "name": n, "supercategory": "thing", "isthing": 1} for i, n in enumerate(THINGS)]
              + [{"id": len(THINGS) + i + 1, "name": n, "supercategory": "stuff", "isthing": 0}
                 for i, n in enumerate(STUFF)])
CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}

OPTIONS = {
    "min_instances": (3, 1, 20, "fewest thing instances per image (before touching neighbours)"),
    "max_instances": (6, 1, 20, "most thing instances per image (before touching neighbours)"),
    "touch_rate": (0.5, 0.0, 1.0, "probability that an instance gets a touching same-class neighbour"),
    "min_visible": (0.6, 0.0, 1.0, "fraction of each instance left visible by later instances"),
}


def _stuff_layout(rng: np.random.Generator, size: int) -> tuple[list[str], np.ndarray]:
    """2-3 stuff classes as bands with wavy boundaries -> (names, region index map)."""
    k = int(rng.integers(2, 4))
    names = [STUFF[j] for j in rng.permutation(len(STUFF))[:k]]
    xs, ys = draw.pixel_grid(size)
    cuts = np.sort(rng.uniform(0.25, 0.75, k - 1)) if k == 2 else np.array([rng.uniform(0.2, 0.4),
                                                                             rng.uniform(0.6, 0.8)])
    region = np.zeros((size, size), np.int64)
    for c in cuts:
        amp = rng.uniform(0.02, 0.06) * size
        boundary = c * size + amp * np.sin(2 * np.pi * rng.uniform(1, 3) * xs / size + rng.uniform(0, 2 * np.pi))
        region += ys > boundary
    return names, region


def _place(rng, size, inst, areas, opts, shape, near=None):
    """Sample a pose for an instance (optionally overlapping ``near``=(cx, cy, r)) -> mask, u, v or None."""
    for _ in range(25):
        if near is None:
            radius = size * rng.uniform(0.08, 0.15)
            cx, cy = rng.uniform(radius, size - radius, 2)
        else:
            ncx, ncy, nr = near
            radius = nr * rng.uniform(0.8, 1.15)
            ang = rng.uniform(0, 2 * np.pi)
            dist = (nr + radius) * rng.uniform(0.55, 0.75)
            cx, cy = ncx + dist * np.cos(ang), ncy + dist * np.sin(ang)
            if not (0 <= cx < size and 0 <= cy < size):
                continue
        u, v = draw.local_coords(size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        mask = draw.SHAPES[shape](u, v)
        if mask.sum() >= 16 and common.place_ok(inst, areas, mask, opts["min_visible"]):
            return mask, u, v, (cx, cy, radius)
    return None


def draw_image(rng: np.random.Generator, size: int, opts: dict):
    """One image -> (image, stuff names, stuff region map, instance map, class of each instance)."""
    names, region = _stuff_layout(rng, size)
    canvas = np.empty((size, size, 3), np.float32)
    for j, n in enumerate(names):
        m = region == j
        canvas[m] = common.draw_background(n, rng, size)[m]
    inst = np.zeros((size, size), np.int32)
    areas: list[int] = []
    classes: list[str] = []
    lo, hi = opts["min_instances"], max(opts["min_instances"], opts["max_instances"])
    n = int(rng.integers(lo, hi + 1))
    thing_names = list(THINGS)

    def put(name, placed):
        mask, u, v, _ = placed
        shape, tex, freq, c0, c1 = THINGS[name]
        pattern = draw.texture(tex, u, v, freq, angle=rng.uniform(-0.3, 0.3), phase=rng.uniform(0, 2 * np.pi))
        shade = 0.85 + 0.15 * np.clip(1.0 - 0.5 * (u + v), 0, 2)[..., None]
        draw.paint(canvas, mask, draw.colourise(pattern, draw.jitter_colour(rng, c0), draw.jitter_colour(rng, c1))
                   * shade)
        areas.append(int(mask.sum()))
        classes.append(name)
        inst[mask] = len(areas)

    for _ in range(n):
        name = thing_names[int(rng.integers(len(thing_names)))]
        placed = _place(rng, size, inst, areas, opts, THINGS[name][0])
        if placed is None:
            continue
        put(name, placed)
        if rng.random() < opts["touch_rate"]:
            buddy = _place(rng, size, inst, areas, opts, THINGS[name][0], near=placed[3])
            if buddy is not None:
                put(name, buddy)
    return draw.finish(canvas, rng), names, region, inst, classes


def touching_pairs(inst: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (a < b) of instance ids (> 0) that are 4-neighbours somewhere."""
    pairs = set()
    for a, b in ((inst[1:], inst[:-1]), (inst[:, 1:], inst[:, :-1])):
        sel = (a != b) & (a > 0) & (b > 0)
        if sel.any():
            lo = np.minimum(a[sel], b[sel])
            hi = np.maximum(a[sel], b[sel])
            pairs.update(map(tuple, np.unique(np.stack([lo, hi], 1), axis=0).tolist()))
    return pairs


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def generate(out_dir: Path, splits: dict[str, int], size: int, seed: int, opts: dict) -> dict:
    stats = {}
    for split, n in splits.items():
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        n_inst = n_touch_pairs = n_touch_imgs = 0
        for i in progress(range(n), desc=f"synth objects {split}", total=n):
            rng = draw.image_rng(seed, KIND, split, i)
            image, names, region, inst, classes = draw_image(rng, size, opts)
            file_name = f"{split}_{i:06d}.jpg"
            write_image(out_dir / "images" / split / file_name, image, quality=95)
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for k, name in enumerate(classes, start=1):
                m = inst == k
                rle = _rle(m)
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CAT_ID[name],
                             "segmentation": rle, "area": float(m.sum()),
                             "bbox": [float(x) for x in mask_utils.toBbox(rle)], "iscrowd": 0})
            for j, name in enumerate(names):
                m = (region == j) & (inst == 0)
                if not m.any():
                    continue
                rle = _rle(m)
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CAT_ID[name],
                             "segmentation": rle, "area": float(m.sum()),
                             "bbox": [float(x) for x in mask_utils.toBbox(rle)], "iscrowd": 0})
            same = [p for p in touching_pairs(inst) if classes[p[0] - 1] == classes[p[1] - 1]]
            n_inst += len(classes)
            n_touch_pairs += len(same)
            n_touch_imgs += bool(same)
        atomic_write_json(out_dir / "annotations" / f"instances_{split}.json",
                          {"info": {"description": f"labelwise synthetic testbed 'objects' ({split})"},
                           "images": images, "annotations": anns, "categories": CATEGORIES}, indent=None)
        stats[split] = {
            "images": n,
            "instances": n_inst,
            "mean_instances_per_image": n_inst / n if n else 0.0,
            "touching_same_class_pairs": n_touch_pairs,
            "images_with_touching_same_class": n_touch_imgs,
        }
    return {
        "format": "coco",
        "things": list(THINGS),
        "stuff": list(STUFF),
        "categories": CATEGORIES,
        "statistics": stats,
    }
