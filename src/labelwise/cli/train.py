"""``labelwise train METHOD --data SPEC --out RUN_DIR [--preset P] [--config F.yaml] [--set k=v ...]
[--steps N | --epochs N] [--labels PRED_DIR] [--seeds SEED_DIR]``.

Works under ``torchrun --nproc_per_node=N -m labelwise train ...`` (gloo on CPU, nccl on GPU).
An existing RUN_DIR is resumed from ``checkpoints/last.pt``.
"""

from __future__ import annotations

import argparse

from labelwise.cli.common import add_common, add_set

EPILOG = """examples:
  labelwise train cam --data voc:data/cooc --out runs/cam                  # cpu preset
  labelwise train cam --data vocaug:/data/VOC2012 --out runs/cam --preset voc --set train.amp=bf16
  labelwise train segmenter --data vocaug:/data/VOC2012 --out runs/seg --labels pred/masks
  torchrun --nproc_per_node=4 -m labelwise train cam --data vocaug:/data/VOC2012 --out runs/cam --preset voc

Running the same command on an existing --out resumes it; --steps/--epochs may extend it."""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=help + ". An existing --out folder is resumed.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("method", metavar="METHOD", help="cam, seco, cobra, irn, segmenter, oap, kmax, cocal "
                                                    "(those shipped in this version)")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset FORMAT:PATH (voc:, coco:, parts:, folder:, "
                                                                 "vocaug:, coco-wsss:, partimagenet:, pascalpart:)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (config, checkpoints, logs, metrics)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="config preset (every method has 'cpu'; default: cpu for a new run, the run's own on resume)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="YAML config file(s) layered over the preset (repeatable)")
    add_set(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, metavar="N",
                        help="number of optimisation steps (train.max_steps; switches train.epochs off)")
    length.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="number of passes over the training split (train.epochs)")
    p.add_argument("--labels", default=None, metavar="PRED_DIR",
                   help="per-image label PNGs (e.g. pseudo-masks of labelwise infer) that replace the dataset's "
                        "masks; tags still come from the dataset. Recorded in RUN_DIR/run.json")
    p.add_argument("--seeds", default=None, metavar="SEED_DIR",
                   help="CAM seeds (.npz of labelwise infer --what seeds, any method) given to the method; "
                        "recorded in RUN_DIR/run.json")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad training items (corrupt image, bad label) with a counted warning and a list "
                        "in RUN_DIR/skipped.txt, instead of stopping (same as --set data.skip_bad=true)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise import dist
    from labelwise.engine import api

    overrides = list(args.overrides) + (["data.skip_bad=true"] if args.skip_bad else [])
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    out = api.train(args.method, args.data, args.out, preset=args.preset, config_files=args.config,
                    overrides=overrides, steps=args.steps, epochs=args.epochs, labels=args.labels,
                    seeds=args.seeds, show_progress=not args.no_progress)
    if dist.is_main():
        print(f"labelwise: run written to {out}")
    return 0
