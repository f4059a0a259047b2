"""``labelwise bench cobra``: step time and peak memory of every stage of the CoBra pipeline, with
the cam baseline measured in the same run on the same generated ``cooc`` testbed.

Training variants (each in its own process, so peak memory is its own; threads pinned for torch
and BLAS; ``--warmup`` untimed steps, then ``--steps`` timed ones through the real trainer, data
loading included in the main process):

* ``cobra``: the preset with L_cam, L_cap and L_sap on from the first step (the steady-state step);
* ``cobra_cnn_only`` / ``cobra_vit_only``: the single-branch rows of Table 3;
* ``irn``: IRN's preset on stand-in seeds (``labelwise.data.synth.mask_seeds``: timing only);
* ``segmenter``: the DeepLabV3+ preset on the testbed's masks;
* ``cam``: the cam baseline's cpu preset.

Inference variants (same process layout; ``infer_*``): ``--infer-images`` training images through
``labelwise infer`` once untimed (warm-up), then ``--repeats`` timed passes into fresh folders:
``infer_cobra`` (``--what seeds,masks`` at the preset's scales, CRF as configured), ``infer_irn``
(``masks``), ``infer_segmenter`` (``segmentation``), ``infer_cam`` (``seeds,masks``).

Every variant reports the median and min..max; ``ratio_vs_cam`` is the median ratio against the
cam variant of the same kind. Peak memory: the process's resident set size (CPU) or
``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labelwise.benchmarks import StepClock, peak_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="preset of cobra, irn and segmenter (default cpu)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per variant (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (default 2)")
    parser.add_argument("--images", type=int, default=32, help="testbed training images (default 32)")
    parser.add_argument("--infer-images", type=int, default=8, help="images per timed inference pass (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference passes (default 3)")
    parser.add_argument("--size", type=int, default=160, help="testbed image side in px (default 160)")
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (pinned)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default=None, metavar="A,B", help="run only these variants")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--infer-root", default=None, help=argparse.SUPPRESS)


BATCH = 8  # images per training step of every variant
ALWAYS_ON = ["loss.cam_start_epoch=0", "loss.contrast_start_epoch=0"]
SINGLE = ["cobra.l_cam=false", "cobra.l_cap=false", "cobra.l_sap=false"]

TRAIN = {
    "cobra": ("cobra", ALWAYS_ON),
    "cobra_cnn_only": ("cobra", ["cobra.vit=false"] + SINGLE),
    "cobra_vit_only": ("cobra", ["cobra.cnn=false"] + SINGLE),
    "irn": ("irn", []),
    "segmenter": ("segmenter", []),
    "cam": ("cam", []),
}
INFER = {
    "infer_cobra": ("cobra", "seeds,masks"),
    "infer_irn": ("irn", "masks"),
    "infer_segmenter": ("segmenter", "segmentation"),
    "infer_cam": ("cam", "seeds,masks"),
}


def _train_kwargs(method: str, root: Path, preset: str) -> dict:
    kw: dict = {"preset": preset if method != "cam" else "cpu"}
    if method == "irn":
        kw["seeds"] = str(root.parent / "seeds-train")
    return kw


def _no_crf_sets(method: str) -> list[str]:
    """IRN's IR labels need pydensecrf2; without it (e.g. Python 3.13) the timing runs without the
    label CRF, and the result says so (``ir_crf``: false)."""
    from labelwise.blocks.crf import crf_available

    return ["irn.ir_crf=false"] if method == "irn" and not crf_available() else []


def _measure_train(args, dev) -> dict:

    from labelwise.engine import api

    method, sets = TRAIN[args.variant]
    clock = StepClock(dev, args.warmup)

    root = Path(args.root)
    no_crf = _no_crf_sets(method)
    with tempfile.TemporaryDirectory() as tmp:
        api.train(method, f"voc:{root}", Path(tmp) / "run", steps=args.warmup + args.steps,
                  overrides=sets + no_crf + [f"train.batch_size={BATCH}", "train.eval_at_end=false",
                                             f"train.device={dev}", "train.ckpt_every=100000", "train.num_workers=0"],
                  hooks=[clock], show_progress=False, **_train_kwargs(method, root, args.preset))
    return {"kind": "train", **clock.summary(BATCH), **({"ir_crf": False} if no_crf else {})}


def _measure_infer(args, dev) -> dict:
    import torch

    from labelwise.engine import api

    method, what = INFER[args.variant]
    root, infer_root = Path(args.root), Path(args.infer_root)
    spec = f"voc:{infer_root}"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"  # a short training run gives the weights; only inference is timed
        no_crf = _no_crf_sets(method)
        train_sets = no_crf + [f"train.batch_size={BATCH}", "train.eval_at_end=false",
                                             f"train.device={dev}", "train.num_workers=0"]
        api.train(method, f"voc:{root}", run, steps=2, overrides=train_sets,
                  show_progress=False, **_train_kwargs(method, root, args.preset))
        sets = ["infer.num_workers=0"]
        seeds = str(infer_root.parent / "seeds-train") if method == "irn" else None
        times = []
        for r in range(args.repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                if r == 1:
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            api.infer(run, spec, "train", Path(tmp) / f"pred{r}", what=what, device=str(dev), overrides=sets,
                      show_progress=False, **({"seeds": seeds} if seeds else {}))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:  # pass 0 warms up
                times.append((time.perf_counter() - t0) / args.infer_images)
    return {"kind": "infer", "what": what, "ms_per_image": 1000 * statistics.median(times),
            "ms_per_image_min": 1000 * min(times), "ms_per_image_max": 1000 * max(times),
            "images": args.infer_images, "repeats": len(times), **({"ir_crf": False} if no_crf else {})}


def _measure(args) -> dict:
    import torch

    from labelwise.utils import resolve_device

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    res = _measure_train(args, dev) if args.variant in TRAIN else _measure_infer(args, dev)
    return {**res, "device": str(dev), "threads": args.threads, **peak_memory(dev)}


def run(args: argparse.Namespace) -> dict:
    if args.variant is not None:  # child: one variant, JSON on stdout
        print(json.dumps(_measure(args)))
        sys.exit(0)
    from labelwise.data.synth import generate, mask_seeds, testbed_spec
    from labelwise.errors import LabelwiseError

    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--images", args.images, BATCH), ("--size", args.size, 32),
                               ("--threads", args.threads, 1), ("--infer-images", args.infer_images, 1),
                               ("--repeats", args.repeats, 1)):
        if value < least:
            raise LabelwiseError(f"bench cobra {flag} {value}: needs at least {least}"
                                 + (f" (one batch of {BATCH} images)" if flag == "--images" else ""))
    if args.infer_images > args.images:
        raise LabelwiseError(f"bench cobra --infer-images {args.infer_images}: at most --images ({args.images})")
    variants = list(TRAIN) + list(INFER)
    if args.only:
        chosen = [v.strip() for v in args.only.split(",") if v.strip()]
        bad = [v for v in chosen if v not in variants]
        if bad or not chosen:
            raise LabelwiseError(f"bench cobra --only {args.only!r}: choose from {', '.join(variants)}")
        variants = chosen

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "LABELWISE_NO_PROGRESS": "1"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the inference passes read the first --infer-images training images: the split holds exactly those
        root = generate("cooc", Path(tmp) / "cooc", n_train=args.images, n_val=0, size=args.size, seed=0)
        mask_seeds(testbed_spec("cooc", root), "train", Path(tmp) / "seeds-train")
        infer_root = generate("cooc", Path(tmp) / "infer" / "cooc", n_train=args.infer_images, n_val=0,
                              size=args.size, seed=0)
        mask_seeds(testbed_spec("cooc", infer_root), "train", Path(tmp) / "infer" / "seeds-train")
        for name in variants:
            cmd = [sys.executable, "-m", "labelwise", "bench", "cobra", "--variant", name, "--root", str(root),
                   "--infer-root", str(infer_root),
                   "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--infer-images", str(args.infer_images), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--device", args.device]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise LabelwiseError(f"bench cobra variant {name} failed: {last}")
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    for name, res in results.items():
        base = "cam" if res["kind"] == "train" else "infer_cam"
        key = "ms_per_step" if res["kind"] == "train" else "ms_per_image"
        if base in results and name != base:
            res["ratio_vs_cam"] = res[key] / results[base][key]
    return results
