"""``labelwise bench cocal``: the training step of CoCal and of its baseline kMaX-DeepLab -- time and peak
memory -- against the cam baseline, in one run on the same generated ``parts`` testbed.

Variants (each in its own process, so peak memory is its own; threads pinned for torch and BLAS):

* ``cocal``: the ``--preset`` (default ``cpu``) with every switch on (dictionary, L_p_con, L_o_con,
  L_logic) and the memory banks;
* ``kmax``: kMaX-DeepLab's ``--preset`` (free queries, Hungarian matching, class head);
* ``cam``: the cam baseline's ``cpu`` preset at the same batch size (a reference step);
* with ``--mask2former`` (CoCal Table 5): ``cocal_mask2former`` and ``mask2former``, the same two on
  Mask2Former's decoders and losses (``model.decoder=mask2former``);
* ``cocal_partimagenet``: the ``partimagenet`` preset (ResNet-50, 512 px crops, batch ``--paper-batch``,
  bf16, random weights) -- only when CUDA is available (``--paper`` forces it on CPU too, slowly).

Per variant: ``--warmup`` untimed steps, then ``--steps`` timed ones through the real trainer; per-step
wall times give the median and min..max. Peak memory: the process's resident set size (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). ``ratio_vs_*`` are median step-time ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from labelwise.benchmarks import StepClock, peak_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="preset of the cocal and kmax variants (default cpu)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--images", type=int, default=32, help="testbed training images (default 32)")
    parser.add_argument("--size", type=int, default=160, help="testbed image side in px (default 160)")
    parser.add_argument("--paper-batch", type=int, default=16, help="images per step of cocal_partimagenet")
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (pinned)")
    parser.add_argument("--paper", action="store_true", help="also run cocal_partimagenet without CUDA")
    parser.add_argument("--mask2former", action="store_true",
                        help="also time cocal and kmax on the Mask2Former decoder (cocal_mask2former, mask2former)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)


def _measure(args) -> dict:
    import torch

    from labelwise.engine import api
    from labelwise.engine.registry import get_method
    from labelwise.utils import resolve_device

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    clock = StepClock(dev, args.warmup)
    batch = get_method("cocal").load_preset(args.preset)["train"]["batch_size"]
    sets = [f"train.batch_size={batch}"]
    method, preset = {"cocal": ("cocal", args.preset), "kmax": ("kmax", args.preset), "cam": ("cam", "cpu"),
                      "cocal_mask2former": ("cocal", args.preset), "mask2former": ("kmax", args.preset),
                      "cocal_partimagenet": ("cocal", "partimagenet")}[args.variant]
    if args.variant in ("cocal_mask2former", "mask2former"):
        sets.append("model.decoder=mask2former")
    if args.variant == "cocal_partimagenet":
        batch = args.paper_batch
        sets = ["model.pretrained=false", f"train.batch_size={batch}",
                "train.amp=" + ("bf16" if dev.type == "cuda" else "none")]
    with tempfile.TemporaryDirectory() as tmp:
        api.train(method, f"parts:{args.root}", Path(tmp) / "run", preset=preset, steps=args.warmup + args.steps,
                  overrides=sets + ["train.eval_at_end=false", f"train.device={dev}", "train.ckpt_every=100000",
                                    "train.num_workers=0", "train.log_every=100000"],
                  hooks=[clock], show_progress=False)
    return {**clock.summary(batch), "device": str(dev), "threads": args.threads, **peak_memory(dev)}


def run(args: argparse.Namespace) -> dict:
    if args.variant is not None:  # child: one variant, JSON on stdout
        print(json.dumps(_measure(args)))
        sys.exit(0)
    import torch

    from labelwise.benchmarks import check_least, run_variant_processes
    from labelwise.data.synth import generate
    from labelwise.engine.registry import get_method
    from labelwise.errors import LabelwiseError

    check_least("cocal", (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--images", args.images, 4),
                          ("--size", args.size, 64), ("--threads", args.threads, 1),
                          ("--paper-batch", args.paper_batch, 1)))
    batch = get_method("cocal").load_preset(args.preset)["train"]["batch_size"]
    if args.images < batch:
        raise LabelwiseError(f"bench cocal --images {args.images}: needs at least one batch of the '{args.preset}' "
                             f"preset ({batch} images)")
    variants = ["cocal", "kmax", "cam"] + (["cocal_mask2former", "mask2former"] if args.mask2former else [])
    if torch.cuda.is_available() and args.device in ("auto", "cuda") or args.paper:
        variants.append("cocal_partimagenet")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"small": generate("parts", Path(tmp) / "parts", n_train=args.images, n_val=0, size=args.size, seed=0)}
        if "cocal_partimagenet" in variants:  # 512 px crops: a testbed of that size
            roots["large"] = generate("parts", Path(tmp) / "parts512", n_train=max(args.images, args.paper_batch),
                                      n_val=0, size=512, seed=0)
        common = ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--threads", str(args.threads), "--device", args.device, "--paper-batch", str(args.paper_batch)]
        results = run_variant_processes("cocal", [
            (name, ["--root", str(roots["large" if name == "cocal_partimagenet" else "small"]), *common])
            for name in variants], args.threads)
    for other in ("kmax", "cam"):
        results["cocal"][f"ratio_vs_{other}"] = results["cocal"]["ms_per_step"] / results[other]["ms_per_step"]
    if args.mask2former:
        for name, other in (("cocal_mask2former", "mask2former"), ("cocal_mask2former", "cocal"), ("mask2former", "kmax")):
            results[name][f"ratio_vs_{other}"] = results[name]["ms_per_step"] / results[other]["ms_per_step"]
    return results
