"""``labelwise infer RUN_DIR --data SPEC --split SPLIT --out PRED_DIR [--what seeds|masks|segmentation|parts]``.

Everything about the model comes from ``RUN_DIR`` (``config.yaml``, ``run.json``,
``info.json``, ``checkpoints/last.pt``); inference settings of the config (``infer.*``)
can be changed for this call with ``--set infer.key=value``.
"""

from __future__ import annotations

import argparse

WHATS = ("seeds", "masks", "segmentation", "parts")


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=help + ".")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'labelwise train'")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset FORMAT:PATH")
    p.add_argument("--split", required=True, metavar="SPLIT", help="split to predict (e.g. train, val)")
    p.add_argument("--out", required=True, metavar="PRED_DIR", help="output folder")
    p.add_argument("--what", choices=WHATS, default=None,
                   help="seeds (CAM .npz), masks (pseudo-mask PNGs), segmentation, parts; default: the method's first")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override inference settings of the saved config (infer.* keys only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint to load (default: the run's last.pt)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise import dist
    from labelwise.engine import api

    dist.init_distributed()
    out = api.infer(args.run_dir, args.data, args.split, args.out, what=args.what, device=args.device,
                    overrides=args.overrides, checkpoint=args.checkpoint)
    if dist.is_main():
        print(f"labelwise: predictions written to {out}")
    return 0
