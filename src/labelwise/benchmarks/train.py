"""``labelwise bench train``: training throughput (images/s) and peak memory of the cam baseline.

Variants: ``cam_cpu`` (the demo config: cam ``cpu`` preset, EfficientNet-Lite0 at its crop
size) always; ``cam_vitb16_448`` (ViT-B/16, 448 px, batch 16, bf16 AMP) when CUDA is
available (``--paper`` forces it on CPU too). Synthetic in-memory batches isolate the model
step (forward, backward, optimiser) from data loading. Peak memory: CUDA
``max_memory_allocated``; CPU: the process's peak RSS (``resource.getrusage``) and the
tracemalloc peak of the Python heap.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from labelwise.benchmarks import peak_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size of every variant")
    parser.add_argument("--paper", action="store_true", help="also run the ViT-B/16 448 px variant without CUDA")
    parser.add_argument("--device", default="auto")


def _variants(args) -> list[tuple[str, list[str], str]]:
    import torch

    out = [("cam_cpu", [], "cpu")]
    if torch.cuda.is_available() or args.paper:
        out.append(("cam_vitb16_448", ["model.backbone=vit_base_patch16", "model.pretrained=false",
                                       "data.crop_size=448", "train.batch_size=16",
                                       "train.amp=" + ("bf16" if torch.cuda.is_available() else "none")], "cpu"))
    return out


def measure(overrides: list[str], steps: int, warmup: int, device: str = "auto", batch_size: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    from labelwise.data.base import DatasetInfo
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.optim import build_optimizer, build_param_groups
    from labelwise.methods import get_method
    from labelwise.utils import resolve_device

    method = get_method("cam")
    ov = list(overrides) + ([f"train.batch_size={batch_size}"] if batch_size else [])
    cfg = resolve_method_config(method, "cpu", overrides=ov)
    dev = resolve_device(device)
    info = DatasetInfo(["background"] + [f"c{i}" for i in range(20)])
    torch.manual_seed(0)
    model = method.build_model(cfg, info).to(dev).train()
    opt = build_optimizer(build_param_groups(method.param_groups(model, cfg), cfg.optim), cfg.optim)
    B, S = cfg.train.batch_size, cfg.data.crop_size
    x = torch.rand(B, 3, S, S, device=dev)
    tags = (torch.rand(B, info.num_foreground, device=dev) < 0.15).float()
    amp = cfg.train.amp
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16) if amp != "none" \
        else torch.autocast(dev.type, enabled=False)

    def step():
        with ctx:
            logits, _ = model(x)
        loss = F.multilabel_soft_margin_loss(logits.float(), tags)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mem = peak_memory(dev)
    return {"images_per_s": B * steps / dt, "ms_per_image": 1000 * dt / (B * steps), "ms_per_step": 1000 * dt / steps,
            "batch_size": B, "crop_size": S, "backbone": cfg.model.backbone, "amp": amp, "device": str(dev),
            "threads": torch.get_num_threads(), "peak_rss_mb": mem.pop("peak_rss_mb"),
            "python_heap_peak_mb": py_peak / 2 ** 20, **mem}


def run(args: argparse.Namespace) -> dict:
    results = {}
    for name, overrides, _ in _variants(args):
        results[name] = measure(overrides, args.steps, args.warmup, args.device, args.batch_size)
    return results


def main(argv=None) -> int:  # python -m labelwise.benchmarks.train
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    import json

    print(json.dumps(run(p.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
