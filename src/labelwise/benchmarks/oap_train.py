"""``labelwise bench oap-train``: OAP's online training step -- time, peak memory and the share of
the step spent making the teacher's pseudo-masks -- against the cam baseline, in one run on the
same generated ``objects`` testbed.

Variants (each in its own process, so peak memory is its own; threads pinned for torch and BLAS):

* ``oap``: the ``--preset`` (default ``cpu``) through the real trainer (data loading in the main
  process, EMA teacher update and hooks included);
* ``cam``: the cam baseline's ``cpu`` preset at the same batch size (the reference step);
* ``oap_coco_amp``: the ``coco`` preset (ViT-B/8 + ViT-Adapter, 448 px, 50 + 150 queries, K 512,
  9 decoder layers) with bf16 autocast and random weights, at ``--coco-batch`` images per step;
  only when CUDA is available (``--paper`` forces it on CPU too, slowly).

Per variant: ``--warmup`` untimed steps, then ``--steps`` timed ones; per-step wall times give the
median and min..max. Inside each OAP step the bench times (CUDA-synchronised) the whole teacher
side (``teacher_targets``: teacher encoder + pixel decoder, OAP on its keys, Eq. 6 votes, teacher
head) and OAP alone (``OnlineAgglomerativePooling.prepare`` + ``pool_prepared``), and reports
both as shares of the median step (``teacher_share``, ``oap_share``). Peak memory: the process's resident set size
(CPU) or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from labelwise.benchmarks import StepClock, peak_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="oap preset of the 'oap' variant (default cpu)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--images", type=int, default=32, help="testbed training images (default 32)")
    parser.add_argument("--size", type=int, default=160, help="testbed image side in px (default 160)")
    parser.add_argument("--coco-batch", type=int, default=16, help="images per step of oap_coco_amp (paper: 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (pinned)")
    parser.add_argument("--paper", action="store_true", help="also run oap_coco_amp without CUDA")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)


class _Timer:
    """Wraps a callable; adds its (CUDA-synchronised) wall time to ``total`` once ``active``."""

    def __init__(self, fn, device):
        self.fn, self.device, self.total, self.active = fn, device, 0.0, False

    def __call__(self, *a, **kw):
        import time

        import torch

        if not self.active:
            return self.fn(*a, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.fn(*a, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.total += time.perf_counter() - t0
        return out


def _measure(args) -> dict:
    import torch

    from labelwise.engine import api
    from labelwise.utils import resolve_device

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    clock = StepClock(dev, args.warmup)
    common = ["train.eval_at_end=false", f"train.device={dev}", "train.ckpt_every=100000", "train.num_workers=0",
              "train.log_every=100000"]
    timers = []
    if args.variant == "cam":
        from labelwise.engine.registry import get_method

        batch = get_method("oap").load_preset(args.preset)["train"]["batch_size"]
        method, preset, sets, spec = "cam", "cpu", [f"train.batch_size={batch}"], f"coco:{args.root}"
    else:
        import labelwise.methods.oap.method as oap_method
        from labelwise.pseudo.oap.pooling import OnlineAgglomerativePooling

        teacher = _Timer(oap_method.teacher_targets, dev)
        oap_method.teacher_targets = teacher
        # OAP = its two steps: prepare (normalised keys, affinity A) and the pooling itself
        prep = _Timer(OnlineAgglomerativePooling.prepare, dev)
        pool = _Timer(OnlineAgglomerativePooling.pool_prepared, dev)
        OnlineAgglomerativePooling.prepare = lambda self, *a, **kw: prep(self, *a, **kw)
        OnlineAgglomerativePooling.pool_prepared = lambda self, *a, **kw: pool(self, *a, **kw)
        timers = [teacher, prep, pool]
        for t in timers:
            t.active = args.warmup == 0  # the hook switches them on after the last warm-up step
        method, spec = "oap", f"coco:{args.root}"
        if args.variant == "oap_coco_amp":
            batch = args.coco_batch
            preset = "coco"
            sets = ["model.pretrained=false", f"train.batch_size={batch}",
                    "train.amp=" + ("bf16" if dev.type == "cuda" else "none")]
        else:
            from labelwise.engine.registry import get_method

            batch = get_method("oap").load_preset(args.preset)["train"]["batch_size"]
            preset, sets = args.preset, []

    def start_timers(trainer, step):
        clock(trainer, step)
        for t in timers:
            t.active = step >= args.warmup  # the steps after `warmup` are the timed ones

    with tempfile.TemporaryDirectory() as tmp:
        api.train(method, spec, Path(tmp) / "run", preset=preset, steps=args.warmup + args.steps,
                  overrides=sets + common, hooks=[start_timers], show_progress=False)
    out = {**clock.summary(batch), "device": str(dev), "threads": args.threads, **peak_memory(dev)}
    if timers:
        teacher, prep, pool = timers
        step_total = sum(clock.times)
        oap = prep.total + pool.total
        out.update(teacher_ms_per_step=1000 * teacher.total / len(clock.times),
                   oap_ms_per_step=1000 * oap / len(clock.times),
                   teacher_share=teacher.total / step_total, oap_share=oap / step_total)
    return out


def run(args: argparse.Namespace) -> dict:
    if args.variant is not None:  # child: one variant, JSON on stdout
        print(json.dumps(_measure(args)))
        sys.exit(0)
    import torch

    from labelwise.benchmarks import check_least, run_variant_processes
    from labelwise.data.synth import generate

    check_least("oap-train", (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--images", args.images, 4),
                              ("--size", args.size, 64), ("--threads", args.threads, 1),
                              ("--coco-batch", args.coco_batch, 1)))
    variants = ["oap", "cam"]
    if torch.cuda.is_available() and args.device in ("auto", "cuda") or args.paper:
        variants.append("oap_coco_amp")
    with tempfile.TemporaryDirectory() as tmp:
        size = max(args.size, 448) if "oap_coco_amp" in variants else args.size
        roots = {"small": generate("objects", Path(tmp) / "objects", n_train=args.images, n_val=0, size=args.size,
                                   seed=0)}
        if size != args.size:  # the coco preset crops 448 px views: a testbed of that size
            roots["large"] = generate("objects", Path(tmp) / "objects448", n_train=max(args.images, args.coco_batch),
                                      n_val=0, size=size, seed=0)
        common = ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--threads", str(args.threads), "--device", args.device, "--coco-batch", str(args.coco_batch)]
        results = run_variant_processes("oap-train", [
            (name, ["--root", str(roots["large" if name == "oap_coco_amp" else "small"]), *common])
            for name in variants], args.threads)
    results["oap"]["ratio_vs_cam"] = results["oap"]["ms_per_step"] / results["cam"]["ms_per_step"]
    return results
