"""``labelwise bench seco``: SeCo's training step time and peak memory against its baseline row and
the cam baseline, measured in one run on the same generated ``cooc`` testbed.

Variants (each in its own process, so peak memory is its own; threads pinned for torch and BLAS):

* ``seco``: the preset with every loss on from the first step (decomposition, both teachers,
  LiG, LiL, rectification, PTC, segmentation + energy): the steady-state step;
* ``seco_baseline``: the same with ``seco.lig/lil/rectify`` off (the Table 2 baseline row);
* ``cam``: the cam baseline's cpu preset (EfficientNet-Lite0) at the same batch size.

Per variant: ``--warmup`` untimed steps, then ``--steps`` timed ones through the real trainer
(data loading included, the DataLoader in the main process); per-step wall times give the
median and min..max. Peak memory: resident set size of the process (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). ``ratio_vs_*`` are the median step-time ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from labelwise.benchmarks import StepClock, peak_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="seco preset (default cpu)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--images", type=int, default=64, help="testbed training images (default 64)")
    parser.add_argument("--size", type=int, default=160, help="testbed image side in px (default 160)")
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (pinned)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)


BATCH = 8  # images per step of every variant

VARIANTS = {
    "seco": ("seco", ["loss.stage_contrast=0", "loss.stage_seg=0", "seco.proto_start=0"]),
    "seco_baseline": ("seco", ["loss.stage_contrast=0", "loss.stage_seg=0", "seco.lig=false", "seco.lil=false",
                               "seco.rectify=false"]),
    "cam": ("cam", []),
}


def _measure(args) -> dict:
    import torch

    from labelwise.engine import api
    from labelwise.utils import resolve_device

    torch.set_num_threads(args.threads)
    method, sets = VARIANTS[args.variant]
    dev = resolve_device(args.device)
    clock = StepClock(dev, args.warmup)

    batch = BATCH
    with tempfile.TemporaryDirectory() as tmp:
        preset = args.preset if method == "seco" else "cpu"
        api.train(method, f"voc:{args.root}", Path(tmp) / "run", preset=preset, steps=args.warmup + args.steps,
                  overrides=sets + [f"train.batch_size={batch}", "train.eval_at_end=false", f"train.device={dev}",
                                    "train.ckpt_every=100000", "train.num_workers=0"],
                  hooks=[clock], show_progress=False)
    return {**clock.summary(batch), "device": str(dev), "threads": args.threads,
            **peak_memory(dev)}


def run(args: argparse.Namespace) -> dict:
    if args.variant is not None:  # child: one variant, JSON on stdout
        print(json.dumps(_measure(args)))
        sys.exit(0)
    from labelwise.data.synth import generate
    from labelwise.errors import LabelwiseError

    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--images", args.images, BATCH), ("--size", args.size, 32),
                               ("--threads", args.threads, 1)):
        if value < least:
            raise LabelwiseError(f"bench seco {flag} {value}: needs at least {least}"
                                 + (f" (one batch of {BATCH} images)" if flag == "--images" else ""))

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "LABELWISE_NO_PROGRESS": "1"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate("cooc", Path(tmp) / "cooc", n_train=args.images, n_val=0, size=args.size, seed=0)
        for name in VARIANTS:
            cmd = [sys.executable, "-m", "labelwise", "bench", "seco", "--variant", name, "--root", str(root),
                   "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--device", args.device]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise LabelwiseError(f"bench seco variant {name} failed: {last}")
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    for other in ("seco_baseline", "cam"):
        results["seco"][f"ratio_vs_{other}"] = results["seco"]["ms_per_step"] / results[other]["ms_per_step"]
    return results
