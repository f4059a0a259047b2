"""``labelwise bench infer``: CAM inference speed of the cam baseline (ms per image).

Two parts, measured in one run with the same images, threads pinned (torch and BLAS), one
warm-up pass and ``--repeats`` timed passes per variant (median and min..max reported):

* the model alone, on random images of ``--size`` px with every class present (worst
  case): ``cam_single`` (one scale, no flip, one image per forward), ``cam_multiscale``
  (the preset's scales + flip, one image per forward) and ``cam_multiscale_batched`` (the
  same on batches of ``--batch-size``, as ``labelwise infer`` does for images of one size);
* the inference engine end to end (``labelwise infer`` on a generated ``cooc`` split of
  ``--images`` images: decoding, CAMs, thresholding, writing): ``infer_two_passes`` writes
  seeds and masks with two calls (what the demo did before: the CAMs are computed twice)
  and ``infer_one_pass`` with ``--what seeds,masks`` (once). ``speedup`` = two / one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=16, help="images per timed pass (default 16)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--preset", default="cpu", help="cam preset whose model/infer settings are used")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward of the batched variants")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (pinned)")
    parser.add_argument("--device", default="auto")


def _timed(fn, repeats: int, sync) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from labelwise.data.base import DatasetInfo
    from labelwise.engine import api
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.registry import get_method
    from labelwise.methods.cam.method import batch_cams
    from labelwise.utils import resolve_device

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    method = get_method("cam")
    cfg = resolve_method_config(method, args.preset)
    info = DatasetInfo(["background"] + [f"c{i}" for i in range(10)])
    torch.manual_seed(0)
    model = method.build_model(cfg, info, pretrained=False).to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(args.images, 3, args.size, args.size, generator=gen).to(dev)
    tags = np.ones(info.num_foreground, np.float32)
    out: dict[str, dict] = {}
    common = {"size": args.size, "device": str(dev), "threads": args.threads, "images": args.images,
              "repeats": args.repeats}
    for name, kw, bs in (("cam_single", {"scales": [1.0], "flip": False}, 1), ("cam_multiscale", {}, 1),
                         ("cam_multiscale_batched", {}, max(1, args.batch_size))):
        def once(kw=kw, bs=bs):
            for s in range(0, len(imgs), bs):
                batch_cams(model, imgs[s:s + bs], [tags] * len(imgs[s:s + bs]), cfg, **kw)

        t = _timed(once, args.repeats, sync)
        out[name] = {"ms_per_image": 1000 * t["median_s"] / args.images,
                     "ms_per_image_min": 1000 * t["min_s"] / args.images,
                     "ms_per_image_max": 1000 * t["max_s"] / args.images, "batch_size": bs,
                     "scales": kw.get("scales", list(cfg.infer.scales)), "flip": kw.get("flip", cfg.infer.flip),
                     **common}

    # the engine end to end: two passes (seeds, then masks) vs one (seeds,masks)
    from labelwise.data.synth import generate

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        root = generate("cooc", tmp / "data", n_train=max(args.batch_size, 2), n_val=args.images, size=args.size,
                        seed=0)
        run_dir = api.train("cam", f"voc:{root}", tmp / "run", preset=args.preset, steps=1, show_progress=False,
                            overrides=[f"train.batch_size={max(args.batch_size, 2)}", "train.eval_at_end=false",
                                       f"train.device={dev}"])
        sets = [f"infer.batch_size={args.batch_size}", "infer.num_workers=0"]

        def infer(whats: list[str]):
            def go():
                shutil.rmtree(tmp / "pred", ignore_errors=True)
                for w in whats:
                    api.infer(run_dir, f"voc:{root}", "val", tmp / "pred", what=w, device=str(dev), overrides=sets,
                              show_progress=False)
            return go

        for name, whats in (("infer_two_passes", ["seeds", "masks"]), ("infer_one_pass", ["seeds,masks"])):
            t = _timed(infer(whats), args.repeats, sync)
            out[name] = {"ms_per_image": 1000 * t["median_s"] / args.images,
                         "ms_per_image_min": 1000 * t["min_s"] / args.images,
                         "ms_per_image_max": 1000 * t["max_s"] / args.images, "batch_size": args.batch_size,
                         "what": whats, **common}
    out["infer_one_pass"]["speedup_vs_two_passes"] = (out["infer_two_passes"]["ms_per_image"]
                                                      / out["infer_one_pass"]["ms_per_image"])
    out["cam_multiscale_batched"]["speedup_vs_unbatched"] = (out["cam_multiscale"]["ms_per_image"]
                                                             / out["cam_multiscale_batched"]["ms_per_image"])
    return out
