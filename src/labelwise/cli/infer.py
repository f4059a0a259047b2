"""``labelwise infer RUN_DIR --data SPEC --split SPLIT --out PRED_DIR [--what OUT[,OUT...]]``.

Everything about the model comes from ``RUN_DIR`` (``config.yaml``, ``run.json``,
``info.json``, ``checkpoints/last.pt``); no pretrained-weights file is needed. Inference
settings (``infer.*``) can be changed for this call with ``--set infer.key=value``.
Several outputs are written in one pass (``--what seeds,masks`` computes the CAMs once);
images whose outputs already exist are skipped, so an interrupted call resumes. Under
``torchrun`` each rank predicts its shard.
"""

from __future__ import annotations

import argparse

from labelwise.cli.common import add_common, add_set

EPILOG = """outputs (what a method declares; see labelwise train METHOD --help for its list):
  seeds         PRED_DIR/<image_id>.npz  CAMs (float16 K x H x W) and their class indices
  masks         PRED_DIR/<image_id>.png  pseudo-masks (class indices, 255 = ignore)
  segmentation  PRED_DIR/<image_id>.png  semantic segmentation
  parts         PRED_DIR/parts/<image_id>.png and PRED_DIR/objects/<image_id>.png
  universal     PRED_DIR/universal.json  COCO results (instance + semantic level)

examples:
  labelwise infer runs/cam --data voc:data/cooc --split train --out pred/train --what seeds,masks
  labelwise infer runs/irn --data voc:data/cooc --split val --out pred/irn-val --seeds pred/val  # a seeds refiner"""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[1].replace("``", ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by 'labelwise train'")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset FORMAT:PATH")
    p.add_argument("--split", required=True, metavar="SPLIT", help="split to predict (e.g. train, val)")
    p.add_argument("--out", required=True, metavar="PRED_DIR", help="output folder")
    p.add_argument("--what", default=None, metavar="OUT[,OUT...]",
                   help="one or several outputs the method declares, comma-separated (default: its first)")
    add_set(p, help="override inference settings of the saved config (infer.* keys only), e.g. "
                    "--set infer.crf=true infer.batch_size=8")
    p.add_argument("--seeds", default=None, metavar="SEED_DIR",
                   help="CAM seeds of SPLIT for a method that refines seeds (irn): the --out of labelwise infer "
                        "RUN --what seeds (default: the run's own --seeds when SPLIT is its training split)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint to load (default: the run's last.pt)")
    p.add_argument("--skip-bad", action="store_true",
                   help="list unreadable images in PRED_DIR/skipped.txt instead of stopping")
    p.add_argument("--coco-dataset", action="store_true",
                   help="beside each COCO results json written (universal.json, pseudo.json, ...), also write "
                        "NAME_dataset.json: a COCO dataset with one class-agnostic category that detectors and "
                        "--data coco:FILE.json,IMAGE_DIR train on")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise import dist
    from labelwise.engine import api

    out = api.infer(args.run_dir, args.data, args.split, args.out, what=args.what, device=args.device,
                    overrides=args.overrides, checkpoint=args.checkpoint, skip_bad=args.skip_bad,
                    show_progress=not args.no_progress, seeds=args.seeds)
    if dist.is_main():
        if args.coco_dataset:
            from labelwise.masks import write_coco_dataset

            for f in sorted(out.glob("*.json")):
                if not (f.name.startswith(".") or f.stem.endswith("_dataset")):
                    write_coco_dataset(f, f.with_name(f"{f.stem}_dataset.json"))
        print(f"labelwise: predictions written to {out}")
    return 0
