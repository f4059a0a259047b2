"""``labelwise export RUN --format {safetensors,onnx,torchscript} --out FILE``."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  labelwise export runs/seco --format safetensors --out seco.safetensors   # weights + config (no pickle)
  labelwise export runs/cam --format onnx --out cam.onnx --size 320 320     # checked with onnxruntime
  labelwise export runs/seg --format torchscript --out seg.pt

onnx / torchscript carry images B x 3 x H x W in [0, 1] -> the network's raw maps at the input size
(cam: CAMs; seco, segmenter: segmentation logits); thresholds, CRF and multi-scale stay in Python."""


def register(subparsers, name: str = "export", help: str = "") -> argparse.ArgumentParser:
    from labelwise.cli.common import add_progress
    from labelwise.engine.export import FORMATS

    p = subparsers.add_parser(name, help=help, description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'labelwise train'")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="example input size for tracing and the check (default 224 224; onnx keeps H, W dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default %(default)s)")
    add_progress(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from labelwise.engine.export import export_run

    res = export_run(args.run_dir, args.format, args.out, size=tuple(args.size), opset=args.opset)
    extra = f"; matches PyTorch within {res['max_abs_diff']:.1e}" if "max_abs_diff" in res else \
        f" ({res['tensors']} tensors)"
    if res.get("fixed_size"):
        extra += f"; fixed input size {args.size[0]}x{args.size[1]} (dynamic batch)"
    print(f"labelwise: wrote {res['out']}{extra}")
    return 0
