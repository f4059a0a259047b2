"""``cooc``: a co-occurrence testbed for weakly supervised semantic segmentation (VOC layout).

Ten foreground classes, each a distinctive shape with its own texture and colours, are
drawn (several instances, overlapping and occluding one another) on one of five textured
background *contexts*. The classes come in five context groups of two:

* every class has a *home* context; an image of a group is drawn on that group's home
  context with probability ``context_rate`` (default 0.8), else on a random other
  context (like boats on water, trains on railroads);
* in three groups the two classes are a *co-occurring pair* (like horse/person,
  chair/table): given that one is present, the other is present with probability
  ``pair_rate`` (default 0.7) -- frequent, not always;
* in the other two groups the classes only meet rarely (``mate_rate``, default 0.1),
  a control for the pairs.

Backgrounds are always label 0. A CAM trained from the image-level tags therefore has
every reason to fire on the home context and on the partner, which shows up as false
positives and is measured by the confusion ratio (FP/TP).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelwise.data.synth import common, draw
from labelwise.io import atomic_write_text, write_image, write_label
from labelwise.utils import progress

KIND = "cooc"

CONTEXTS = ("water", "grass", "sand", "brick", "snow")

# name: (shape, texture, frequency, colour 0, colour 1, home context)
CLASSES = {
    "disc": ("disc", "rings", 2.5, (230, 120, 20), (250, 200, 60), "water"),
    "ring": ("ring", "radial", 6.0, (200, 30, 40), (250, 240, 230), "water"),
    "square": ("square", "checker", 2.5, (240, 230, 60), (60, 40, 120), "grass"),
    "triangle": ("triangle", "stripes", 3.0, (180, 60, 200), (250, 170, 240), "grass"),
    "star": ("star", "dots", 3.0, (40, 40, 160), (230, 230, 250), "sand"),
    "cross": ("cross", "zigzag", 2.5, (30, 150, 140), (10, 60, 50), "sand"),
    "diamond": ("diamond", "grid", 3.0, (20, 140, 220), (240, 250, 255), "brick"),
    "hexagon": ("hexagon", "stripes", 2.0, (100, 200, 70), (20, 80, 20), "brick"),
    "crescent": ("crescent", "checker", 3.0, (240, 80, 150), (60, 20, 40), "snow"),
    "arrow": ("arrow", "zigzag", 3.0, (200, 90, 30), (60, 40, 20), "snow"),
}
CLASS_NAMES = ["background", *CLASSES]
# Context groups, in CONTEXTS order; the first three are co-occurring pairs.
GROUPS = (("disc", "ring"), ("square", "triangle"), ("star", "cross"), ("diamond", "hexagon"),
          ("crescent", "arrow"))
PAIRS = GROUPS[:3]

OPTIONS = {
    "context_rate": (0.8, 0.0, 1.0, "probability that an image shows its classes' home context"),
    "pair_rate": (0.7, 0.0, 1.0, "P(partner present | class present) for the co-occurring pairs"),
    "mate_rate": (0.1, 0.0, 1.0, "the same for the two non-pair context groups (control)"),
    "max_instances": (3, 1, 8, "most instances of one class in an image"),
    "min_visible": (0.4, 0.0, 1.0, "fraction of each instance left visible by occluders"),
}


def _both_prob(rate: float) -> float:
    """P(both) per group image so that P(partner | class) = rate (one-alone cases split evenly)."""
    return rate / (2.0 - rate)


def draw_image(rng: np.random.Generator, size: int, opts: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """One image, its label and its background context."""
    g = int(rng.integers(len(GROUPS)))
    rate = opts["pair_rate"] if g < len(PAIRS) else opts["mate_rate"]
    if rng.random() < _both_prob(rate):
        present = list(GROUPS[g])
    else:
        present = [GROUPS[g][int(rng.integers(2))]]
    home = CONTEXTS[g]
    if rng.random() < opts["context_rate"]:
        ctx = home
    else:
        others = [c for c in CONTEXTS if c != home]
        ctx = others[int(rng.integers(len(others)))]
    canvas = common.draw_background(ctx, rng, size)
    label = np.zeros((size, size), np.uint8)
    inst = np.zeros((size, size), np.int32)
    areas: list[int] = []
    # instances, in random painting order (later ones occlude earlier ones)
    todo = [c for c in present for _ in range(int(rng.integers(1, opts["max_instances"] + 1)))]
    rng.shuffle(todo)
    for name in todo:
        shape, tex, freq, c0, c1, _ = CLASSES[name]
        for attempt in range(20):
            radius = size * rng.uniform(0.11, 0.2)
            cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
            u, v = draw.local_coords(size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
            mask = draw.SHAPES[shape](u, v)
            if mask.sum() >= 12 and common.place_ok(inst, areas, mask, opts["min_visible"]):
                break
        else:
            if (label == CLASS_NAMES.index(name)).any():  # another instance of the class is already visible: skip this one
                continue
        pattern = draw.texture(tex, u, v, freq, angle=rng.uniform(-0.3, 0.3), phase=rng.uniform(0, 2 * np.pi))
        shade = 0.85 + 0.15 * np.clip(1.0 - 0.5 * (u + v), 0, 2)[..., None]  # soft light from top-left
        rgb = draw.colourise(pattern, draw.jitter_colour(rng, c0), draw.jitter_colour(rng, c1)) * shade
        draw.paint(canvas, mask, rgb)
        label[mask] = CLASS_NAMES.index(name)
        areas.append(int(mask.sum()))
        inst[mask] = len(areas)
    return draw.finish(canvas, rng), label, ctx


def statistics(records: list[tuple[set[int], str]]) -> dict:
    """Measured context rate per class and co-occurrence per pair/group from (classes, context)."""
    n = len(records)
    per_class = {}
    for c, name in enumerate(CLASS_NAMES[1:], start=1):
        imgs = [ctx for cls, ctx in records if c in cls]
        home = CLASSES[name][5]
        per_class[name] = {
            "images": len(imgs),
            "home_context": home,
            "context_rate": (sum(ctx == home for ctx in imgs) / len(imgs)) if imgs else None,
        }
    groups = {}
    for a, b in GROUPS:
        ia, ib = CLASS_NAMES.index(a), CLASS_NAMES.index(b)
        na = sum(ia in cls for cls, _ in records)
        nb = sum(ib in cls for cls, _ in records)
        nab = sum(ia in cls and ib in cls for cls, _ in records)
        groups[f"{a}+{b}"] = {
            "pair": (a, b) in PAIRS,
            "both": nab,
            f"p_{b}_given_{a}": nab / na if na else None,
            f"p_{a}_given_{b}": nab / nb if nb else None,
        }
    occ = [(ctx == CLASSES[CLASS_NAMES[c]][5]) for cls, ctx in records for c in cls]
    return {
        "images": n,
        "mean_classes_per_image": (sum(len(cls) for cls, _ in records) / n) if n else 0.0,
        "context_rate_overall": (sum(occ) / len(occ)) if occ else None,
        "classes": per_class,
        "cooccurrence": groups,
        "contexts": {c: sum(ctx == c for _, ctx in records) for c in CONTEXTS},
    }


def generate(out_dir: Path, splits: dict[str, int], size: int, seed: int, opts: dict) -> dict:
    (out_dir / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out_dir / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (out_dir / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "class_names.txt", "\n".join(CLASS_NAMES) + "\n")
    stats, context_lines = {}, []
    for split, n in splits.items():
        ids, records = [], []
        for i in progress(range(n), desc=f"synth cooc {split}", total=n):
            rng = draw.image_rng(seed, KIND, split, i)
            image, label, ctx = draw_image(rng, size, opts)
            image_id = f"{split}_{i:06d}"
            write_image(out_dir / "JPEGImages" / f"{image_id}.jpg", image, quality=95)
            write_label(out_dir / "SegmentationClass" / f"{image_id}.png", label)
            ids.append(image_id)
            records.append((set(int(c) for c in np.unique(label)) - {0}, ctx))
            context_lines.append(f"{image_id} {ctx}")
        atomic_write_text(out_dir / "ImageSets" / "Segmentation" / f"{split}.txt",
                          "".join(f"{x}\n" for x in ids))
        stats[split] = statistics(records)
    atomic_write_text(out_dir / "contexts.txt", "".join(f"{x}\n" for x in context_lines))
    return {
        "format": "voc",
        "classes": CLASS_NAMES,
        "contexts": list(CONTEXTS),
        "home_context": {name: spec[5] for name, spec in CLASSES.items()},
        "pairs": [list(p) for p in PAIRS],
        "groups": [list(g) for g in GROUPS],
        "appearance": {name: {"shape": s[0], "texture": s[1]} for name, s in CLASSES.items()},
        "statistics": stats,
    }
