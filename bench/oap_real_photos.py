"""OAP, MaskCut and TokenCut on real photographs: a gallery and the quokka IoU.

Photos: imgaug's ``quokka.jpg`` with its polygon (``quokka_annotations.json``) and a few
``skimage.data`` photos. Every generator runs through the project's own API
(:func:`labelwise.pseudo.runner.generate`, the engine of ``labelwise pseudo-masks``) with
EfficientNet-Lite0 features (the shipped weights; ``--backbone efficientnet_lite0``). Written to
``--out-dir``:

* ``oap_real_photos.png`` -- one row per photo: the photo, then each generator's top-k
  instance masks drawn with :func:`labelwise.report.show.draw_masks` (tag = ``rank:score``);
* ``oap_real_photos.json`` / ``.md`` -- per generator, for the quokka: the IoU with the polygon of
  the top-1 mask and of the best mask, and the best mask's rank among the generator's masks.

The polygon is only for reporting: nothing here is chosen by it. Variants of one generator are
written ``NAME=METHOD:KEY=VALUE,...`` (e.g. ``oap-border-none=oap:oap.border=none``, the scores from before the border prior).

    python bench/oap_real_photos.py --out-dir bench
    python bench/oap_real_photos.py --quokka-image quokka.jpg --quokka-polygon quokka_annotations.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from labelwise.errors import LabelwiseError
from labelwise.io import read_image
from labelwise.masks import decode_masks
from labelwise.report.show import compose_row, draw_masks, load_results, Panel, resize_image, resize_nearest

GET_QUOKKA = ("pip download imgaug==0.4.0 --no-deps -d /tmp/imgaug && unzip -o /tmp/imgaug/imgaug-*.whl "
              "'imgaug/quokka*' -d /tmp/imgaug, then pass --quokka-image /tmp/imgaug/imgaug/quokka.jpg "
              "--quokka-polygon /tmp/imgaug/imgaug/quokka_annotations.json")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
DEFAULT_GENERATORS = ("oap=oap", "oap-border-none=oap:oap.border=none", "oap-score-contrast=oap:oap.score=contrast",
                      "maskcut=maskcut", "tokencut=tokencut")


# --------------------------------------------------------------------------- inputs
def find_quokka(image: str | None, polygon: str | None) -> tuple[Path, Path]:
    """The quokka photo and polygon: the given paths, else the data folder of an installed imgaug
    (located without importing it: imgaug 0.4 does not import with numpy 2)."""
    if image is None or polygon is None:
        spec = importlib.util.find_spec("imgaug")
        if spec is None or spec.origin is None:
            raise LabelwiseError(f"quokka: imgaug is not installed and --quokka-image/--quokka-polygon are not "
                                 f"given; get them with: {GET_QUOKKA}")
        root = Path(spec.origin).parent
        image = image or str(root / "quokka.jpg")
        polygon = polygon or str(root / "quokka_annotations.json")
    img, poly = Path(image), Path(polygon)
    for p, flag in ((img, "--quokka-image"), (poly, "--quokka-polygon")):
        if not p.is_file():
            raise LabelwiseError(f"{flag} {p}: file not found; get it with: {GET_QUOKKA}")
    return img, poly


def polygon_mask(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    """The first polygon of an imgaug annotation file (``{"polygons": [{"keypoints": [{x, y}, ...]}]}``)
    rasterised to an ``H x W`` bool mask."""
    try:
        pts = json.loads(Path(path).read_text())["polygons"][0]["keypoints"]
        xy = [(float(p["x"]), float(p["y"])) for p in pts]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LabelwiseError(f"--quokka-polygon {path}: no polygons[0].keypoints with x/y ({type(e).__name__}); "
                             "pass imgaug's quokka_annotations.json") from None
    if len(xy) < 3:
        raise LabelwiseError(f"--quokka-polygon {path}: polygon has {len(xy)} points, needs >= 3")
    canvas = Image.new("1", (size_hw[1], size_hw[0]), 0)
    ImageDraw.Draw(canvas).polygon(xy, fill=1)
    return np.asarray(canvas, dtype=bool)


def skimage_photo(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise LabelwiseError("--skimage: scikit-image is not installed; pip install scikit-image, or pass "
                             "--skimage ''") from None
    fn = getattr(data, name, None)
    if fn is None:
        raise LabelwiseError(f"--skimage: skimage.data has no photo '{name}'; try one of {', '.join(SKIMAGE_PHOTOS)}")
    img = np.asarray(fn())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.uint8)


def parse_generator(spec: str) -> tuple[str, str, list[str]]:
    """``NAME=METHOD[:KEY=VALUE,...]`` -> ``(name, method, overrides)``."""
    name, sep, rest = spec.partition("=")
    method, _, sets = rest.partition(":")
    if not sep or method not in ("oap", "maskcut", "tokencut"):
        raise LabelwiseError(f"--generator {spec!r}: write NAME=METHOD[:KEY=VALUE,...] with METHOD one of "
                             "oap, maskcut, tokencut")
    return name, method, [s for s in sets.split(",") if s]


# --------------------------------------------------------------------------- scoring
def rank_records(records: Sequence[dict]) -> list[dict]:
    """Instance-level records (OAP's semantic level is left out, as ``evaluate instance`` does), best first."""
    inst = [r for r in records if r.get("level", "instance") == "instance"]
    return sorted(inst, key=lambda r: float(r.get("score", 0.0)), reverse=True)


def iou_with(masks: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each of ``masks (K, H, W)`` with one ``gt (H, W)`` mask."""
    m = masks.reshape(len(masks), -1)
    g = gt.reshape(-1)
    inter = (m & g).sum(1)
    union = (m | g).sum(1)
    return inter / np.maximum(union, 1)


def quokka_row(ranked: Sequence[dict], gt: np.ndarray) -> dict:
    """Top-1 IoU, best IoU and the best mask's 1-based rank among ``ranked`` masks."""
    if not ranked:
        return {"masks": 0, "top1_iou": 0.0, "best_iou": 0.0, "best_rank": None}
    iou = iou_with(decode_masks([r["segmentation"] for r in ranked]), gt)
    best = int(np.argmax(iou))                      # first = best-ranked among equal IoUs
    return {"masks": len(ranked), "top1_iou": round(float(iou[0]), 4), "best_iou": round(float(iou[best]), 4),
            "best_rank": best + 1, "top1_score": float(ranked[0].get("score", 0.0))}


# --------------------------------------------------------------------------- gallery
def gallery_row(title: str, image: np.ndarray, per_generator: dict[str, list[dict]], top: int,
                max_side: int) -> np.ndarray:
    disp = resize_image(image, max_side)
    panels = [Panel(title, disp)]
    for name, ranked in per_generator.items():
        recs = ranked[:top]
        masks = (resize_nearest(decode_masks([r["segmentation"] for r in recs]), disp.shape[:2]) if recs
                 else np.zeros((0,) + disp.shape[:2], bool))
        tags = [f"{k + 1}:{float(r.get('score', 0.0)):.2f}" for k, r in enumerate(recs)]
        panels.append(Panel(f"{name} top-{top}", draw_masks(disp, masks, numbers=tags)))
    return compose_row(panels)


def stack_rows(rows: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    W = max(r.shape[1] for r in rows)
    H = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    out = np.full((H, W, 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y:y + r.shape[0], :r.shape[1]] = r
        y += r.shape[0] + gap
    return out


# --------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"Quokka ({report['quokka_image']}, polygon area {report['polygon_area_frac']:.1%} of the image), "
             f"{report['backbone']} at {report['resolution']} px; instance-level masks ranked by score.", "",
             "| generator | settings | masks | top-1 IoU | best IoU | best rank |", "|---|---|---:|---:|---:|---:|"]
    for name, row in report["quokka"].items():
        sets = " ".join(report["generators"][name]["overrides"]) or "defaults"
        rank = f"{row['best_rank']} of {row['masks']}" if row["best_rank"] else "-"
        lines.append(f"| {name} | `{sets}` | {row['masks']} | {row['top1_iou']:.3f} | {row['best_iou']:.3f} | {rank} |")
    lines += ["", f"Photos: {', '.join(report['photos'])}. Gallery: `{report['gallery']}` (top-{report['top']} "
              "instance masks per generator; tag = rank:score)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"without imgaug installed, get the quokka with: {GET_QUOKKA}")
    ap.add_argument("--quokka-image", help="quokka.jpg (default: from an installed imgaug)")
    ap.add_argument("--quokka-polygon", help="quokka_annotations.json (default: from an installed imgaug)")
    ap.add_argument("--skimage", default=",".join(SKIMAGE_PHOTOS),
                    help="comma-separated skimage.data photos ('' for none)")
    ap.add_argument("--generator", action="append", default=None,
                    help=f"NAME=METHOD[:KEY=VALUE,...], repeatable (default: {' '.join(DEFAULT_GENERATORS)})")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--random-init", action="store_true", help="random backbone weights (tests only)")
    ap.add_argument("--top", type=int, default=5, help="masks drawn per generator")
    ap.add_argument("--max-side", type=int, default=200, help="gallery panel size (longer side, px)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--name", default="oap_real_photos", help="stem of the PNG / JSON / MD files")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except LabelwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from labelwise.pseudo.runner import generate

    if args.top < 1:
        raise LabelwiseError(f"--top must be >= 1, got {args.top}")
    q_img, q_poly = find_quokka(args.quokka_image, args.quokka_polygon)
    quokka = read_image(q_img)
    gt = polygon_mask(q_poly, quokka.shape[:2])
    generators = [parse_generator(s) for s in (args.generator or DEFAULT_GENERATORS)]
    names = [g[0] for g in generators]
    if len(set(names)) != len(names):
        raise LabelwiseError(f"--generator: names must be distinct, got {names}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        photos = {"quokka": quokka} | {n: skimage_photo(n) for n in args.skimage.split(",") if n}
        files = {}
        for k, (n, img) in enumerate(photos.items()):      # numbered: the listing order is the row order
            files[n] = f"{k:02d}_{n}.png"
            Image.fromarray(img).save(folder / files[n])
        ranked: dict[str, dict[str, list[dict]]] = {n: {} for n in photos}
        for name, method, overrides in generators:
            out = Path(tmp) / f"{name}.json"
            generate(method, folder, out, overrides=overrides, backbone=args.backbone, resolution=args.resolution,
                     random_init=args.random_init or None, show_progress=False)
            by_file: dict[str, list[dict]] = {}
            for r in load_results(out):
                by_file.setdefault(r["file_name"], []).append(r)
            for n in photos:
                ranked[n][name] = rank_records(by_file.get(files[n], []))
    gallery = args.out_dir / f"{args.name}.png"
    rows = [gallery_row(n, img, ranked[n], args.top, args.max_side) for n, img in photos.items()]
    # a 128-colour palette keeps the committed gallery near 150 KB (full colour: about 600 KB)
    Image.fromarray(stack_rows(rows)).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(gallery, optimize=True)
    report = {"quokka_image": q_img.name, "polygon_area_frac": round(float(gt.mean()), 4),
              "backbone": args.backbone, "resolution": args.resolution, "random_init": bool(args.random_init),
              "photos": list(photos), "top": args.top, "gallery": gallery.name,
              "generators": {n: {"method": m, "overrides": o} for n, m, o in generators},
              "quokka": {n: quokka_row(ranked["quokka"][n], gt) for n in names},
              "top1_area_frac": {p: {n: (round(float(r[0]["area"]) / (img.shape[0] * img.shape[1]), 4)
                                         if r else None) for n, r in ranked[p].items()}
                                 for p, img in photos.items()}}
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
