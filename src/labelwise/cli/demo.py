"""``labelwise demo``: the main job end to end on CPU in a few minutes, with an HTML report.

Stages (each prints a progress line; re-running with the same ``--out`` reuses what is done):

1. generate the ``cooc`` co-occurrence testbed (VOC layout) in ``OUT/data``;
2. train the plain ``cam`` baseline with the ``cpu`` preset in ``OUT/run`` (resumes from
   its last checkpoint);
3. write CAM seeds (``.npz``) and pseudo-masks (``.png``) for the train split -- standard
   WSSS: pseudo-masks of the training images -- and the val split, in ``OUT/pred/SPLIT/``;
4. evaluate seeds-as-masks (CAM argmax with the background threshold) and pseudo-masks
   (mIoU, confusion ratio FP/TP, per class), saved to ``OUT/metrics.json``;
5. CAMs of an ImageNet EfficientNet-Lite0 on real photos from ``skimage.data``;
6. write ``OUT/report.html`` (self-contained: images inline as base64 PNG, inline SVG).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from labelwise.errors import LabelwiseError
from labelwise.io import atomic_write_json

DEFAULTS = {"out": "labelwise-demo", "train": 200, "val": 60, "size": 128, "seed": 0, "examples": 6}
SEED_BG_THRESHOLD = 0.5  # background threshold for seeds-as-masks when the run config names none
STATE_FILE = "demo.json"


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=(
        "Generate the cooc testbed, train the cam baseline (cpu preset), write CAM seeds and pseudo-masks, "
        "evaluate them (mIoU, confusion ratio) and write a self-contained OUT/report.html. Re-running with "
        "the same --out reuses the testbed and resumes training."))
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
    p.add_argument("--no-real-photos", action="store_true",
                   help="skip the EfficientNet-Lite0 CAMs of skimage.data photos")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- helpers


class _Stages:
    """Numbered progress lines ``[i/n] ...`` with the time each stage took."""

    def __init__(self, total: int):
        self.total, self.i, self.t0, self.t_stage = total, 0, time.perf_counter(), None

    def start(self, text: str) -> None:
        self.i += 1
        self.t_stage = time.perf_counter()
        print(f"[{self.i}/{self.total}] {text} ...", flush=True)

    def done(self, text: str = "") -> None:
        dt = time.perf_counter() - (self.t_stage or self.t0)
        print(f"      {text + ' ' if text else ''}({dt:.1f}s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _load_state(out: Path) -> dict:
    p = out / STATE_FILE
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def _checkpoint_key(run_dir: Path) -> str | None:
    """Identity of the run's latest checkpoint (path, size, mtime) -- invalidates predictions."""
    try:
        from labelwise.engine.checkpoint import latest_checkpoint

        ck = latest_checkpoint(run_dir)
    except Exception:
        ck = None
    if ck is None:
        cands = sorted(run_dir.rglob("*.pt"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
        ck = cands[-1] if cands else None
    if ck is None:
        return None
    st = Path(ck).stat()
    return f"{Path(ck).name}:{st.st_size}:{st.st_mtime_ns}"


def _split_ids(data_root: Path, split: str) -> list[str]:
    p = data_root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not p.is_file():
        return []
    return [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()]


def _complete(pred_dir: Path, ids: list[str], suffix: str) -> bool:
    return pred_dir.is_dir() and bool(ids) and all((pred_dir / f"{i}{suffix}").is_file() for i in ids)


def _find_key(cfg: Any, names: tuple[str, ...]) -> Any:
    """First value of a key named one of ``names`` anywhere in a nested dict."""
    if isinstance(cfg, dict):
        for n in names:
            if n in cfg and not isinstance(cfg[n], dict):
                return cfg[n]
        for v in cfg.values():
            r = _find_key(v, names)
            if r is not None:
                return r
    return None


def _run_config(run_dir: Path) -> dict:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return {}
    try:
        import yaml

        return yaml.safe_load(p.read_text()) or {}
    except Exception:
        return {}


def _run_method(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("method")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


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


def seeds_to_masks(seed_dir: Path, out_dir: Path, bg_threshold: float) -> int:
    """Seeds ``.npz`` -> label PNGs: argmax over present classes, background where ``<= bg_threshold``."""
    import torch

    from labelwise.blocks.cam import cam_to_label
    from labelwise.io import write_label

    n = 0
    for f in sorted(seed_dir.glob("*.npz")):
        with np.load(f) as z:
            cams = torch.from_numpy(z["cams"].astype(np.float32))
            keys = torch.from_numpy(np.asarray(z["keys"]).astype(np.int64))
        label = cam_to_label(cams, keys=keys, bg_threshold=bg_threshold)
        write_label(out_dir / f"{f.stem}.png", label.numpy())
        n += 1
    return n


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "inf" if math.isinf(f) else ("-" if math.isnan(f) else f"{f:.{digits}f}")


# --------------------------------------------------------------------------- the job


def run(args) -> int:
    if args.train < 1:
        raise LabelwiseError(f"--train {args.train}: the cam baseline needs at least 1 training image")
    if args.val < 0 or args.examples < 0:
        raise LabelwiseError("--val and --examples must be >= 0")
    if args.size < 32:
        raise LabelwiseError(f"--size {args.size}: use at least 32 pixels")
    if args.steps is not None and args.steps < 1:
        raise LabelwiseError(f"--steps {args.steps}: must be a positive number of steps")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "val")]
    if bad or not splits:
        raise LabelwiseError(f"--splits {args.splits!r}: use train, val or train,val")
    if args.val < 1 and "val" in splits:
        splits.remove("val")
        if not splits:
            raise LabelwiseError("--splits val needs --val >= 1")

    out = Path(args.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LabelwiseError(f"--out {out}: exists and is not a folder; pass a folder path")
    out.mkdir(parents=True, exist_ok=True)
    data_root, run_dir, pred_root = out / "data", out / "run", out / "pred"
    spec = f"voc:{data_root}"
    state = _load_state(out)
    stages = _Stages(6)
    print(f"labelwise demo -> {out}", flush=True)

    # 1. testbed -------------------------------------------------------------------------
    stages.start("generating the cooc testbed")
    data_params = {"kind": "cooc", "n_train": args.train, "n_val": args.val, "size": args.size, "seed": args.seed}
    have = bool(_split_ids(data_root, "train"))
    if have and state.get("data") not in (None, data_params):
        old = state.get("data")
        raise LabelwiseError(f"--out {out}: holds a testbed made with {old}; pass the same --train/--val/"
                             "--size/--seed or a new --out folder")
    if have and state.get("data") == data_params:
        stages.done(f"reused {data_root}")
    else:
        from labelwise.data.synth import generate

        generate("cooc", data_root, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed)
        state = {"data": data_params}
        atomic_write_json(out / STATE_FILE, state)
        stages.done(f"{args.train} train + {args.val} val images of {args.size}px in {data_root}")

    # 2. training ------------------------------------------------------------------------
    from labelwise.engine import api

    stages.start("training the cam baseline (cpu preset" + (f", {args.steps} steps)" if args.steps else ")"))
    api.train("cam", spec, run_dir, preset="cpu", steps=args.steps, overrides=_train_overrides(args.train))
    log = read_log(run_dir / "log.jsonl")
    last_step = max((int(r["step"]) for r in log if "step" in r and "loss" in r), default=None)
    stages.done(f"run in {run_dir}" + (f", last logged step {last_step}" if last_step is not None else ""))
    ckey = _checkpoint_key(run_dir)

    # 3. seeds + pseudo-masks ------------------------------------------------------------
    stages.start(f"writing CAM seeds and pseudo-masks ({', '.join(splits)})")
    cfg = _run_config(run_dir)
    bg = _find_key(cfg, ("bg_threshold", "background_threshold", "bg_thresh"))
    bg = float(bg) if isinstance(bg, (int, float)) else SEED_BG_THRESHOLD
    # Pseudo-masks are the seeds' label map refined by a dense CRF (label unary with
    # infer.crf_gt_prob, the IRN/CoBra practice) when pydensecrf2 is installed; without it
    # they are the thresholded seeds themselves and the report says so.
    from labelwise.blocks.crf import crf_available

    use_crf = crf_available()
    derive = _run_method(run_dir) == "cam" and not use_crf
    mask_source = ("CAM seeds thresholded at {bg}, refined by a dense CRF".format(bg=bg) if use_crf else
                   f"CAM seeds thresholded at {bg} (no CRF: pip install 'labelwise[crf]' for CRF-refined masks)")
    if not use_crf:
        print("      pydensecrf2 is not installed: pseudo-masks = thresholded seeds "
              "(pip install 'labelwise[crf]' to refine them)", flush=True)
    fresh = state.get("checkpoint") == ckey and state.get("mask_source") == mask_source
    preds = state.get("preds", {}) if fresh else {}
    for split in splits:
        ids = _split_ids(data_root, split)
        d = pred_root / split
        if (preds.get(split) and ckey is not None and _complete(d / "seeds", ids, ".npz")
                and _complete(d / "masks", ids, ".png") and _complete(d / "seed_masks", ids, ".png")):
            print(f"      {split}: reused {len(ids)} seeds and pseudo-masks", flush=True)
            continue
        api.infer(run_dir, spec, split, d / "seeds", what="seeds")
        n = seeds_to_masks(d / "seeds", d / "seed_masks", bg)
        if derive:  # same rule as infer --what masks: skip a second CAM pass over the split
            seeds_to_masks(d / "seeds", d / "masks", bg)
        else:
            api.infer(run_dir, spec, split, d / "masks", what="masks",
                      overrides=[f"infer.crf={'true' if use_crf else 'false'}"])
        preds[split] = True
        print(f"      {split}: {n} images", flush=True)
    state.update(checkpoint=ckey, preds=preds, mask_source=mask_source)
    atomic_write_json(out / STATE_FILE, state)
    stages.done()

    # 4. evaluation ----------------------------------------------------------------------
    stages.start("evaluating seeds-as-masks and pseudo-masks")
    from labelwise.evaluation import evaluate
    from labelwise.evaluation.base import jsonable

    metrics: dict[str, dict[str, dict]] = {}
    for split in splits:
        metrics[split] = {}
        for kind, sub in (("seeds", "seed_masks"), ("masks", "masks")):
            metrics[split][kind] = evaluate("semantic", pred_root / split / sub, spec, split)
        m = metrics[split]
        print(f"      {split}: seeds mIoU {_fmt(m['seeds']['miou'])}, pseudo-masks mIoU {_fmt(m['masks']['miou'])}, "
              f"confusion ratio {_fmt(m['masks']['confusion_ratio'])}", flush=True)
    stages.done()

    # 5. real photos ---------------------------------------------------------------------
    photos: list[tuple[str, np.ndarray, list]] = []
    photo_note = ""
    if args.no_real_photos:
        stages.start("real photos: skipped (--no-real-photos)")
        stages.done()
    else:
        stages.start("EfficientNet-Lite0 CAMs on skimage.data photos")
        try:
            photos = real_photo_cams()
            stages.done(", ".join(f"{n}: {c[0].name} {c[0].prob:.2f}" for n, _, c in photos))
        except Exception as e:  # the demo's main job must not fail on the optional section
            photo_note = f"Real-photo section skipped: {type(e).__name__}: {e}"
            stages.done(photo_note)

    # 6. report --------------------------------------------------------------------------
    stages.start("writing the HTML report")
    headline_split = "train" if "train" in splits else splits[0]
    hm = metrics[headline_split]
    elapsed = stages.elapsed()
    summary = {
        "out": str(out), "report": str(out / "report.html"), "data": spec, "run_dir": str(run_dir),
        "steps": last_step, "seed_bg_threshold": bg, "pseudo_masks": mask_source, "headline_split": headline_split,
        "seeds_miou": hm["seeds"]["miou"], "masks_miou": hm["masks"]["miou"],
        "seeds_confusion_ratio": hm["seeds"]["confusion_ratio"],
        "masks_confusion_ratio": hm["masks"]["confusion_ratio"],
        "elapsed_s": round(elapsed, 1), "metrics": metrics,
        "real_photos": [{"photo": n, "top": [{"class": c.name, "index": c.index, "prob": c.prob} for c in cs]}
                        for n, _, cs in photos],
    }
    from labelwise.report.demo import build_demo_report, class_names_of, threshold_sweep

    names = class_names_of(data_root)
    if names:
        summary["threshold_sweep"] = {headline_split: threshold_sweep(
            pred_root / headline_split / "seeds", data_root / "SegmentationClass", len(names))}
    atomic_write_json(out / "metrics.json", jsonable(summary))

    report = build_demo_report(out / "report.html", summary=summary, data_root=data_root, pred_root=pred_root,
                               splits=splits, log=log, photos=photos, photo_note=photo_note,
                               n_examples=args.examples)
    stages.done(str(report))

    elapsed = stages.elapsed()
    print("", flush=True)
    print(f"Report: {report}", flush=True)
    for split in splits:
        m = metrics[split]
        print(f"  {split:5s}  seeds mIoU {_fmt(m['seeds']['miou'])}  pseudo-masks mIoU {_fmt(m['masks']['miou'])}  "
              f"confusion ratio (FP/TP) seeds {_fmt(m['seeds']['confusion_ratio'])} / "
              f"pseudo-masks {_fmt(m['masks']['confusion_ratio'])}", flush=True)
    print(f"  elapsed {elapsed:.1f}s", flush=True)
    return 0


def _train_overrides(n_train: int) -> list[str]:
    """Lower the preset's batch size when the testbed has fewer training images than one batch."""
    try:
        from labelwise.methods import get_method

        bs = int(get_method("cam").load_preset("cpu").get("train", {}).get("batch_size", 0))
    except Exception:
        return []
    return [f"train.batch_size={n_train}"] if 0 < n_train < bs else []


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
