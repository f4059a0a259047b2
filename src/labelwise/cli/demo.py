"""``labelwise demo``: the main job end to end on CPU in a few minutes, with an HTML report.

The demo is the shipped ``demo`` recipe (``labelwise/recipes/demo.yaml``; ``labelwise run demo
--out DIR`` runs the same stages) plus the report:

1. the recipe, run resumably into ``--out`` (each stage in ``OUT/<stage>/``, completed stages
   are skipped on a re-run): the ``cooc`` co-occurrence testbed (``OUT/testbed``), the plain
   ``cam`` baseline with the ``cpu`` preset (``OUT/cam``), CAM seeds (``<id>.npz``) and
   pseudo-masks (``<id>.png``) of the train split -- standard WSSS: pseudo-masks of the
   training images -- and of the val split, in one pass per split (``OUT/pred_SPLIT``), and
   their evaluation (mIoU, confusion ratio FP/TP, per class; ``OUT/<seeds|masks>_SPLIT``,
   comparison table ``OUT/table.md``); seeds are scored as masks at the run's background
   threshold ``infer.bg_threshold``;
2. CAMs of an ImageNet EfficientNet-Lite0 on real photos from ``skimage.data`` (optional: a
   failure there is reported, not fatal);
3. ``OUT/metrics.json`` (summary) and ``OUT/report.html`` (self-contained: images inline as
   base64 PNG, inline SVG).

``--with-cocal`` adds CoCal object parsing on its own small ``parts`` testbed: two more stages
run resumably into ``--out`` (``OUT/cocal_testbed``, ``OUT/cocal``: the cocal cpu preset for
``--cocal-steps``), then one val image is parsed and explained (``OUT/cocal_explain``, the
``labelwise explain`` page) and the report gets a section with its part map, object map and
``part -> object`` paths.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from labelwise.cli.common import add_common
from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json

RECIPE = "demo"
DEFAULTS = {"out": "labelwise-demo", "train": 200, "val": 60, "size": 128, "seed": 0, "examples": 6}
# --with-cocal: a small parts testbed (160 px: the cocal cpu preset's crop) and a short run
COCAL = {"train": 48, "val": 4, "size": 160, "steps": 150}
SPLITS = ("train", "val")


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=(
        "Run the shipped 'demo' recipe (labelwise run demo): generate the cooc testbed, train the cam baseline "
        "(cpu preset), write CAM seeds and pseudo-masks, evaluate them (mIoU, confusion ratio); then write a "
        "self-contained OUT/report.html. Re-running with the same --out skips the stages that are done."))
    p.add_argument("--out", default=DEFAULTS["out"], metavar="DIR",
                   help=f"output folder (default ./{DEFAULTS['out']}); re-running with it resumes")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimisation steps (default: the cam cpu preset's)")
    p.add_argument("--train", type=int, default=DEFAULTS["train"], metavar="N",
                   help=f"training images in the testbed (default {DEFAULTS['train']})")
    p.add_argument("--val", type=int, default=DEFAULTS["val"], metavar="N",
                   help=f"validation images (default {DEFAULTS['val']})")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], metavar="PX",
                   help=f"testbed image size in pixels (default {DEFAULTS['size']})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="testbed seed (default 0)")
    p.add_argument("--examples", type=int, default=DEFAULTS["examples"], metavar="K",
                   help=f"example images shown in the report (default {DEFAULTS['examples']})")
    p.add_argument("--splits", default="train,val", metavar="LIST",
                   help="splits to write seeds/pseudo-masks for and evaluate (default train,val)")
    p.add_argument("--with-seco", action="store_true",
                   help="also train SeCo (its cpu preset) on the testbed and show it beside the CAM baseline in the "
                        "comparison table (about 7 more minutes on a 2-core CPU; needs the val split)")
    p.add_argument("--seco-steps", type=int, default=None, metavar="N",
                   help="with --with-seco: SeCo's optimisation steps (default: its cpu preset's)")
    p.add_argument("--with-cobra", action="store_true",
                   help="also run the CoBra pipeline (cobra -> M_fuse seeds -> IRN masks -> DeepLabV3+ segmenter, "
                        "cpu presets) and show it beside the CAM baseline (needs the train and val splits)")
    p.add_argument("--cobra-steps", type=int, default=None, metavar="N",
                   help="with --with-cobra: CoBra's optimisation steps (default: its cpu preset's)")
    p.add_argument("--with-cocal", action="store_true",
                   help=f"also train CoCal (its cpu preset) on a small parts testbed ({COCAL['train']} train / "
                        f"{COCAL['val']} val images, {COCAL['size']} px) and show one parsed val image (part map, "
                        "object map, part -> object paths) in the report (about 3 more minutes on a 2-core CPU)")
    p.add_argument("--cocal-steps", type=int, default=None, metavar="N",
                   help=f"with --with-cocal: CoCal's optimisation steps (default {COCAL['steps']}; its cpu preset "
                        "trains 600)")
    p.add_argument("--no-real-photos", action="store_true",
                   help="skip the EfficientNet-Lite0 CAMs of skimage.data photos")
    add_common(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- helpers


def _splits(args) -> list[str]:
    """The splits to predict and evaluate, after the flag checks (one-line errors)."""
    if args.train < 1:
        raise LabelwiseError(f"--train {args.train}: the cam baseline needs at least 1 training image")
    if args.val < 0 or args.examples < 0:
        raise LabelwiseError("--val and --examples must be >= 0")
    if args.size < 32:
        raise LabelwiseError(f"--size {args.size}: use at least 32 pixels")
    if args.steps is not None and args.steps < 1:
        raise LabelwiseError(f"--steps {args.steps}: must be a positive number of steps")
    cocal_steps = getattr(args, "cocal_steps", None)
    if cocal_steps is not None:
        if not getattr(args, "with_cocal", False):
            raise LabelwiseError("--cocal-steps goes with --with-cocal (add --with-cocal or drop --cocal-steps)")
        if cocal_steps < 1:
            raise LabelwiseError(f"--cocal-steps {cocal_steps}: must be a positive number of steps")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise LabelwiseError(f"--splits {args.splits!r}: use train, val or train,val")
    if args.val < 1 and "val" in splits:
        splits.remove("val")
        if not splits:
            raise LabelwiseError("--splits val needs --val >= 1")
    return [s for s in SPLITS if s in splits]


def split_stages(split: str) -> tuple[str, str, str]:
    """The demo recipe's stages of one split: predictions, seeds evaluation, pseudo-mask evaluation."""
    return f"pred_{split}", f"seeds_{split}", f"masks_{split}"


def demo_recipe(args, splits: list[str], crf: bool):
    """The shipped ``demo`` recipe with the flags as variables and only the stages of ``splits``."""
    from labelwise.stages import load_recipe

    recipe = load_recipe(RECIPE)
    sets = [f"train={args.train}", f"val={args.val}", f"size={args.size}", f"seed={args.seed}",
            # tiny testbeds: a batch cannot be larger than the training split
            f"batch_size={min(int(recipe.vars['batch_size']), args.train)}",
            f"crf={'true' if crf else 'false'}"]
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    if getattr(args, "seco_steps", None) is not None:
        if args.seco_steps < 1:
            raise LabelwiseError(f"--seco-steps {args.seco_steps}: must be a positive number of steps")
        sets.append(f"seco_steps={args.seco_steps}")
    if getattr(args, "cobra_steps", None) is not None:
        if args.cobra_steps < 1:
            raise LabelwiseError(f"--cobra-steps {args.cobra_steps}: must be a positive number of steps")
        sets.append(f"cobra_steps={args.cobra_steps}")
    recipe = recipe.apply(sets)
    names = {s.name for s in recipe.stages}
    for split in SPLITS:
        missing = [n for n in split_stages(split) if n not in names]
        if missing:  # the recipe and this command disagree: a packaging bug, not a user error
            raise RuntimeError(f"recipe {recipe.path}: has no stage {missing[0]!r} that labelwise demo reads")
    drop = {n for split in SPLITS if split not in splits for n in split_stages(split)}
    seco = [s.name for s in recipe.stages if s.name.startswith("seco")]
    if not getattr(args, "with_seco", False) or "val" not in splits:
        drop |= set(seco)  # SeCo beside the baseline only on request (it trains ~7 more minutes on a CPU)
    cobra = [s.name for s in recipe.stages if s.name.startswith("cobra")]
    if getattr(args, "with_cobra", False) and splits != list(SPLITS):
        raise LabelwiseError("--with-cobra needs both splits (CoBra's IRN masks come from train, its segmentation "
                             "is scored on val): drop --splits or pass --splits train,val with --val >= 1")
    if not getattr(args, "with_cobra", False):
        drop |= set(cobra)
    recipe.stages = [s for s in recipe.stages if s.name not in drop]
    return recipe


def run_bg_threshold(run_dir: Path) -> tuple[float, Any]:
    """``(infer.bg_threshold, config)`` of the cam run in ``run_dir`` (its config.yaml, strictly loaded)."""
    from labelwise.config import load_config
    from labelwise.engine.registry import get_method

    cfg = load_config(get_method("cam").config_cls, run_dir / "config.yaml")
    return float(cfg.infer.bg_threshold), cfg


def read_log(path: Path) -> list[dict]:
    """Records of a ``log.jsonl`` (bad lines skipped)."""
    out = []
    if not path.is_file():
        return out
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "inf" if math.isinf(f) else ("-" if math.isnan(f) else f"{f:.{digits}f}")


def cocal_recipe(args):
    """``--with-cocal``: the stages ``cocal_testbed`` (a small parts testbed) and ``cocal`` (the cocal
    cpu preset on it), run into the demo's folder like the recipe's own stages (resumable)."""
    from labelwise.stages.recipe import Recipe, Stage

    steps = args.cocal_steps if args.cocal_steps is not None else COCAL["steps"]
    synth = {"testbed": "parts", "train": COCAL["train"], "val": COCAL["val"], "size": COCAL["size"],
             "seed": args.seed}
    train = {"method": "cocal", "preset": "cpu", "steps": int(steps), "data": "${cocal_testbed.spec}"}
    return Recipe(path=None, description="labelwise demo --with-cocal: CoCal on a small parts testbed",
                  stages=[Stage("cocal_testbed", "synth", synth), Stage("cocal", "train", train)])


def cocal_demo(out: Path, args) -> tuple[Any, dict]:
    """Run the ``--with-cocal`` stages, explain the first val image (``OUT/cocal_explain``) and return
    ``(report section, summary)``."""
    from labelwise.data.synth import load_meta
    from labelwise.engine.api import load_run
    from labelwise.io import list_images, read_image
    from labelwise.report.demo import cocal_section
    from labelwise.report.explain import compute_explanation, write_explanation
    from labelwise.stages import run_recipe

    print("CoCal (--with-cocal): object parsing on a small parts testbed", flush=True)
    res = run_recipe(cocal_recipe(args), out, device=args.device, show_progress=not args.no_progress)
    root, run_dir = Path(res["stages"]["cocal_testbed"]["root"]), Path(res["stages"]["cocal"]["run"])
    val = list_images(root / "images" / "val")
    if not val:
        raise LabelwiseError(f"{root}: the parts testbed has no val images; delete OUT/cocal_testbed and re-run")
    image_path = val[0]
    loaded = load_run(run_dir, args.device)
    ex = compute_explanation(loaded, read_image(image_path), max_side=256, image_name=image_path.name)
    explained = write_explanation(ex, out / "cocal_explain", progress=False)
    log = read_log(run_dir / "log.jsonl")
    steps = max((int(r["step"]) for r in log if "step" in r and "loss" in r), default=None)
    meta = load_meta(root)
    summary = {"run_dir": str(run_dir), "data": res["stages"]["cocal_testbed"]["spec"], "steps": steps,
               "testbed": {k: meta.get(k) for k in ("size", "splits", "seed")}, "image": str(image_path),
               "explain": str(out / "cocal_explain" / "index.html"), "paths": explained["paths"],
               "changed_by_path": explained["changed_by_path"],
               "parts_nearest_parent": sum(explained["parent_is_nearest"])}
    gt_dir = {lv: root / lv / "val" for lv in ("parts", "objects")}
    section = cocal_section(ex, summary, gt={lv: d / f"{image_path.stem}.png" for lv, d in gt_dir.items()},
                            explain_link="cocal_explain/index.html")
    top = ", ".join(f"{r['part_name']} -> {r['object_name']} {100 * r['share']:.0f}%" for r in ex.paths()[:3])
    print(f"      parsed {image_path.name}: {len(summary['paths'])} paths ({top}); explained in "
          f"{summary['explain']}", flush=True)
    return section, summary


# --------------------------------------------------------------------------- the job


def run(args) -> int:
    splits = _splits(args)
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LabelwiseError(f"--out {out}: exists and is not a folder; pass a folder path")
    t0 = time.perf_counter()

    from labelwise.blocks.crf import crf_available
    from labelwise.stages import run_recipe

    # Pseudo-masks are the seeds' label map refined by a dense CRF (label unary with
    # infer.crf_gt_prob, the IRN/CoBra practice) when pydensecrf2 is installed; without it
    # they are the thresholded seeds themselves and the output and report say so.
    use_crf = crf_available()
    recipe = demo_recipe(args, splits, use_crf)
    print(f"labelwise demo -> {out} (recipe '{RECIPE}': labelwise run {RECIPE} --out {out} runs the same stages)",
          flush=True)
    if not use_crf:
        print("      pydensecrf2 is not installed: pseudo-masks = thresholded seeds "
              "(pip install 'labelwise[crf]' to refine them)", flush=True)
    try:
        res = run_recipe(recipe, out, device=args.device, show_progress=not args.no_progress)
    except LabelwiseError as e:
        if "stage 'testbed' changed" not in str(e):
            raise
        raise LabelwiseError(f"--out {out}: holds a demo trained on another testbed ({str(e).split(' since ')[0]}); "
                             "pass the same --train/--val/--size/--seed or a new --out folder") from None
    skipped = [r["name"] for r in res["results"] if r["status"] == "skipped"]
    if skipped:
        print(f"reused {len(skipped)} of {len(res['results'])} stages already done in {out} "
              "(delete OUT/<stage> to redo one)", flush=True)

    stages = res["stages"]
    data_root, run_dir = Path(stages["testbed"]["root"]), Path(stages["cam"]["run"])
    spec = stages["testbed"]["spec"]
    bg, cfg = run_bg_threshold(run_dir)
    if use_crf:
        mask_source = (f"CAM seeds thresholded at {bg:g}, refined by a dense CRF "
                       f"(label unary, gt_prob {cfg.infer.crf_gt_prob:g})")
    else:
        mask_source = f"CAM seeds thresholded at {bg:g} (no CRF: pip install 'labelwise[crf]' for CRF-refined masks)"
    metrics: dict[str, dict[str, dict]] = {}
    for split in splits:
        _, seeds_stage, masks_stage = split_stages(split)
        metrics[split] = {kind: json.loads(Path(stages[name]["metrics"]).read_text())
                          for kind, name in (("seeds", seeds_stage), ("masks", masks_stage))}
    pred_dirs = {split: Path(stages[split_stages(split)[0]]["out"]) for split in splits}
    log = read_log(run_dir / "log.jsonl")
    last_step = max((int(r["step"]) for r in log if "step" in r and "loss" in r), default=None)

    cocal_sections, cocal_summary = [], None
    if args.with_cocal:
        section, cocal_summary = cocal_demo(out, args)
        cocal_sections.append(section)

    # real photos ------------------------------------------------------------------------
    photos: list[tuple[str, np.ndarray, list]] = []
    photo_note = ""
    if args.no_real_photos:
        print("real photos: skipped (--no-real-photos)", flush=True)
    else:
        print("real photos: EfficientNet-Lite0 CAMs on skimage.data photos ...", flush=True)
        t = time.perf_counter()
        try:
            photos = real_photo_cams()
            print("      " + ", ".join(f"{n}: {c[0].name} {c[0].prob:.2f}" for n, _, c in photos)
                  + f" ({time.perf_counter() - t:.1f}s)", flush=True)
        except Exception as e:  # the demo's main job must not fail on the optional section
            photo_note = f"Real-photo section skipped: {type(e).__name__}: {e}"
            print(f"      {photo_note}", flush=True)

    # summary + report -------------------------------------------------------------------
    from labelwise.evaluation.base import jsonable
    from labelwise.report.demo import build_demo_report, class_names_of, threshold_sweep

    headline_split = "train" if "train" in splits else splits[0]
    hm = metrics[headline_split]
    summary = {
        "out": str(out), "report": str(out / "report.html"), "recipe": RECIPE, "vars": recipe.vars,
        "data": spec, "run_dir": str(run_dir), "preset": recipe.vars.get("preset"),
        "steps": last_step, "seed_bg_threshold": bg, "crf": use_crf, "pseudo_masks": mask_source,
        "headline_split": headline_split,
        "seeds_miou": hm["seeds"]["miou"], "masks_miou": hm["masks"]["miou"],
        "seeds_confusion_ratio": hm["seeds"]["confusion_ratio"],
        "masks_confusion_ratio": hm["masks"]["confusion_ratio"],
        "elapsed_s": round(time.perf_counter() - t0, 1), "metrics": metrics, "table": res["table"],
        "stages": {r["name"]: {"status": r["status"], "seconds": round(float(r["seconds"]), 1)}
                   for r in res["results"]},
        "real_photos": [{"photo": n, "top": [{"class": c.name, "index": c.index, "prob": c.prob} for c in cs]}
                        for n, _, cs in photos],
    }
    if cocal_summary is not None:
        summary["cocal"] = cocal_summary
    names = class_names_of(data_root)
    if names:
        summary["threshold_sweep"] = {headline_split: threshold_sweep(
            pred_dirs[headline_split], data_root / "SegmentationClass", len(names))}
    atomic_write_json(out / "metrics.json", jsonable(summary))

    compare = []
    if "seco_pred_val" in stages:  # --with-seco: SeCo's val outputs beside the CAM baseline's
        seco_out = stages["seco_pred_val"]
        compare = [("CAM: seeds as mask", pred_dirs["val"], "seeds"), ("CAM: pseudo-mask", pred_dirs["val"], "label"),
                   ("SeCo: seeds as mask", Path(seco_out["seeds"]), "seeds"),
                   ("SeCo: segmentation", Path(seco_out["segmentation"]), "label")]
    if "cobra_seg_val" in stages:  # --with-cobra: CoBra's seeds and its segmenter beside the CAM baseline
        if not compare:
            compare = [("CAM: seeds as mask", pred_dirs["val"], "seeds"),
                       ("CAM: pseudo-mask", pred_dirs["val"], "label")]
        compare += [("CoBra: M_fuse seeds", Path(stages["cobra_pred_val"]["masks"]), "label"),
                    ("CoBra: segmenter", Path(stages["cobra_seg_val"]["segmentation"]), "label")]
    report = build_demo_report(out / "report.html", summary=summary, data_root=data_root, pred_dirs=pred_dirs,
                               bg_threshold=bg, log=log, table=res["table"], photos=photos,
                               photo_note=photo_note, n_examples=args.examples, compare=compare,
                               compare_split="val", extra_sections=cocal_sections)

    print("", flush=True)
    print(f"Report: {report}", flush=True)
    for split in splits:
        m = metrics[split]
        print(f"  {split:5s}  seeds mIoU {_fmt(m['seeds']['miou'])}  pseudo-masks mIoU {_fmt(m['masks']['miou'])}  "
              f"confusion ratio (FP/TP) seeds {_fmt(m['seeds']['confusion_ratio'])} / "
              f"pseudo-masks {_fmt(m['masks']['confusion_ratio'])}", flush=True)
    print(f"  seeds scored at background threshold {bg:g}; pseudo-masks: {mask_source}", flush=True)
    print(f"  elapsed {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


def real_photo_cams(names=None, topk: int = 3):
    """``[(name, photo, [ClassCAM x topk]), ...]`` for skimage.data photos with EfficientNet-Lite0."""
    from labelwise.report.photos import DEFAULT_PHOTOS, classifier_cams, load_skimage_photos

    model = load_imagenet_classifier()
    out = []
    for name, img in load_skimage_photos(names or DEFAULT_PHOTOS).items():
        out.append((name, img, classifier_cams(model, img, topk=topk)))
    return out


def load_imagenet_classifier():
    """EfficientNet-Lite0 with its shipped ImageNet head (from labelwise.modeling.backbones)."""
    from labelwise.modeling import backbones

    fn = getattr(backbones, "create_classifier", None)
    if fn is None:
        raise RuntimeError("labelwise.modeling.backbones.create_classifier is not available")
    model = fn("efficientnet_lite0")
    model.eval()
    return model
