"""``labelwise bench infer``: CAM inference speed of the cam baseline (ms per image).

Variants: ``cam_single`` (one scale, no flip) and ``cam_multiscale`` (the preset's scales +
flip), on random images of ``--size`` px with every class present (worst case).
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=8, help="timed images per variant")
    parser.add_argument("--size", type=int, default=128, help="image side (px)")
    parser.add_argument("--preset", default="cpu", help="cam preset whose model/infer settings are used")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from labelwise.data.base import DatasetInfo
    from labelwise.engine.api import resolve_method_config
    from labelwise.methods import get_method
    from labelwise.methods.cam.method import image_cams
    from labelwise.utils import resolve_device

    method = get_method("cam")
    cfg = resolve_method_config(method, args.preset, overrides=["model.pretrained=false"])
    dev = resolve_device(args.device)
    info = DatasetInfo(["background"] + [f"c{i}" for i in range(10)])
    torch.manual_seed(0)
    model = method.build_model(cfg, info).to(dev).eval()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    tags = np.ones(info.num_foreground, np.float32)
    out = {}
    for name, kw in (("cam_single", {"scales": [1.0], "flip": False}), ("cam_multiscale", {})):
        image_cams(model, imgs[0], tags, cfg, **kw)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for im in imgs:
            image_cams(model, im, tags, cfg, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[name] = {"ms_per_image": 1000 * dt / len(imgs), "size": args.size, "device": str(dev),
                     "scales": kw.get("scales", list(cfg.infer.scales)), "flip": kw.get("flip", cfg.infer.flip)}
    return out
