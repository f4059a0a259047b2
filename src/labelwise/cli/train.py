"""``labelwise train METHOD --data SPEC --out RUN_DIR [--config F.yaml] [--set k=v ...] [--preset P] [--steps N]``.

Works under ``torchrun --nproc_per_node=N -m labelwise train ...`` (gloo on CPU, nccl on GPU).
An existing RUN_DIR is resumed from ``checkpoints/last.pt``.
"""

from __future__ import annotations

import argparse


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=help + ". An existing --out folder is resumed.")
    p.add_argument("method", metavar="METHOD", help="cam, seco, cobra, oap, kmax, cocal")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset FORMAT:PATH (voc:, coco:, parts:, folder:)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (config, checkpoints, logs, metrics)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="config preset (every method has 'cpu'; default: cpu for a new run, the run's own on resume)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="YAML config file(s) layered over the preset (repeatable)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. --set optim.lr=1e-4 train.batch_size=4")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="number of optimisation steps (train.max_steps)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad training items (corrupt image, bad label) with a counted warning and a list "
                        "in RUN_DIR/skipped.txt, instead of stopping (same as --set data.skip_bad=true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise.engine import api

    overrides = list(args.overrides) + (["data.skip_bad=true"] if args.skip_bad else [])
    out = api.train(args.method, args.data, args.out, preset=args.preset, config_files=args.config,
                    overrides=overrides, steps=args.steps, show_progress=not args.no_progress)
    from labelwise import dist

    if dist.is_main():
        print(f"labelwise: run written to {out}")
    if dist.is_dist():
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return 0
