"""``labelwise bench crf``: dense CRF speed (ms per image) at a few image sizes.

Times :func:`labelwise.blocks.crf.dense_crf` (probability unary, SeCo's evaluation
setting) and :func:`labelwise.blocks.crf.crf_refine_label` (label unary, CoBra/IRN) on
synthetic images (blurred class maps over a piecewise-constant image; seeded). Returns
``{"<variant>": {"ms_per_image": float, ...}}`` with variants ``dense_crf@<H>x<W>`` and
``label_crf@<H>x<W>``, each with the pixel accuracy of the synthetic truth before and after
the CRF (``pixel_acc_before`` / ``pixel_acc_after``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

DEFAULT_SIZES = "128,256,512"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated square image sizes in pixels (default {DEFAULT_SIZES})")
    parser.add_argument("--classes", type=int, default=21, help="number of classes incl. background (default 21)")
    parser.add_argument("--iters", type=int, default=10, help="mean-field iterations (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")


def _parse_sizes(text) -> list[int]:
    from labelwise.errors import LabelwiseError

    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise LabelwiseError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 8:
        raise LabelwiseError(f"--sizes needs sizes >= 8 pixels, got {text!r}")
    return sizes


def _synthetic(size: int, num_classes: int, rng: np.random.Generator):
    """A blocky image with one class per block, and blurry noisy probabilities for it."""
    from scipy.ndimage import gaussian_filter

    grid = 4
    block_cls = rng.integers(0, num_classes, size=(grid, grid))
    block_rgb = rng.integers(0, 256, size=(grid, grid, 3))
    yy = np.minimum(np.arange(size) * grid // size, grid - 1)
    label = block_cls[yy[:, None], yy[None, :]]
    image = block_rgb[yy[:, None], yy[None, :]].astype(np.uint8)
    onehot = (np.arange(num_classes)[:, None, None] == label[None]).astype(np.float32)
    logits = gaussian_filter(onehot * 4.0, sigma=(0, size / 32, size / 32)) + rng.normal(0, 0.5, onehot.shape)
    probs = np.exp(logits - logits.max(0, keepdims=True))
    probs /= probs.sum(0, keepdims=True)
    return image, probs.astype(np.float32), label.astype(np.uint8)


def run(args) -> dict:
    from labelwise.blocks.crf import crf_refine_label, dense_crf

    sizes = _parse_sizes(getattr(args, "sizes", DEFAULT_SIZES))
    num_classes = int(getattr(args, "classes", 21))
    iters = int(getattr(args, "iters", 10))
    repeats = max(1, int(getattr(args, "repeats", 3)))
    rng = np.random.default_rng(int(getattr(args, "seed", 0)))
    results: dict[str, dict] = {}
    for size in sizes:
        image, probs, truth = _synthetic(size, num_classes, rng)
        noisy = probs.argmax(0).astype(np.uint8)
        variants = {
            "dense_crf": lambda: dense_crf(image, probs, iters=iters).argmax(0),
            "label_crf": lambda: crf_refine_label(image, noisy, num_classes, iters=iters),
        }
        for name, fn in variants.items():
            refined = fn()  # warm-up, and the quality figure
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            results[f"{name}@{size}x{size}"] = {
                "ms_per_image": float(np.median(times) * 1000.0),
                "height": size, "width": size, "classes": num_classes, "iters": iters, "repeats": repeats,
                "pixel_acc_before": float((noisy == truth).mean()),
                "pixel_acc_after": float((refined == truth).mean()),
            }
    return results
