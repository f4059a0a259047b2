"""``labelwise evaluate {semantic,parts,instance,panoptic,unsupervised} --pred PRED --gt SPEC
[--split SPLIT] [--json OUT.json]``: score predictions, print a table, optionally write JSON.

The work is done by :func:`labelwise.evaluation.evaluate`; see its module for the
prediction layouts of each kind.
"""

from __future__ import annotations

import argparse

from labelwise.cli.common import add_common
from labelwise.errors import LabelwiseError


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(
        name, help=help, description="Score predictions against a ground-truth dataset and print a table.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="prediction layouts:\n"
               "  semantic      PRED/<image_id>.png class indices (255 = unknown), or CAM seeds\n"
               "                PRED/<image_id>.npz with --bg-threshold T\n"
               "  parts         PRED/parts/<image_id>.png and PRED/objects/<image_id>.png\n"
               "  instance      PRED = COCO results json; --gt coco:ROOT\n"
               "  panoptic      PRED = COCO-panoptic folder (panoptic.json + PNGs, id = R+256G+256^2B)\n"
               "                or an instance results json (painted by ascending score); --gt coco:ROOT\n"
               "  unsupervised  PRED/<image_id>.png cluster ids 0..K-1 (255 = none), Hungarian-matched")
    p.add_argument("kind", choices=["semantic", "parts", "instance", "panoptic", "unsupervised"],
                   help="what is evaluated")
    p.add_argument("--pred", required=True, metavar="PRED", help="prediction folder or results json")
    p.add_argument("--gt", required=True, metavar="SPEC", help="ground-truth dataset FORMAT:PATH (e.g. voc:/data/VOC)")
    p.add_argument("--split", default=None, help="ground-truth split (default: the format's default; use val)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the flat result object here")
    p.add_argument("--ignore-index", type=int, default=255, help="ignore label value (default 255)")
    p.add_argument("--class-aware", action="store_true", help="instance: compare categories (default: agnostic)")
    p.add_argument("--hungarian", action="store_true",
                   help="instance: category_id holds cluster ids (unsupervised); map clusters one-to-one to the "
                        "ground-truth thing categories (Hungarian on IoU>=0.5 votes) and score class-aware")
    p.add_argument("--max-dets", type=int, default=100, help="instance: detections per image (default 100)")
    p.add_argument("--level", choices=["instance", "semantic", "all"], default=None,
                   help="results that carry a 'level' (universal masks, OAP pseudo-masks): which to score "
                        "(default: instance for 'instance', all for 'panoptic'); results without one always count")
    p.add_argument("--num-clusters", type=int, default=None,
                   help="unsupervised: number of clusters K (default: largest id + 1)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="panoptic from instance results: drop masks scoring below this")
    p.add_argument("--class-agnostic", action="store_true",
                   help="panoptic: collapse all categories into one 'object' category")
    p.add_argument("--bg-threshold", type=float, default=None, metavar="T",
                   help="semantic: score CAM seeds (.npz) as masks: argmax of the present classes, background "
                        "where the best CAM <= T (a fixed, published threshold -- never tune it on this split)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise.dist import init_distributed, is_main
    from labelwise.evaluation import jsonable, run_evaluation
    from labelwise.io import atomic_write_json

    if args.num_clusters is not None and args.num_clusters < 1:
        raise LabelwiseError(f"--num-clusters must be >= 1, got {args.num_clusters}")
    init_distributed()
    options = {"progress": not args.no_progress}
    if args.bg_threshold is not None and args.kind != "semantic":
        raise LabelwiseError("--bg-threshold applies to 'evaluate semantic' (CAM seeds) only")
    if args.kind in ("semantic", "parts", "unsupervised"):
        from labelwise.utils import resolve_device

        options["ignore_index"] = args.ignore_index
        options["device"] = resolve_device(args.device)
    if args.kind == "semantic":
        options["bg_threshold"] = args.bg_threshold
    if args.kind == "instance":
        options.update(class_aware=args.class_aware, max_dets=args.max_dets, level=args.level or "instance",
                       hungarian=args.hungarian)
    if args.kind == "panoptic":
        options.update(score_thresh=args.score_thresh, class_agnostic=args.class_agnostic, level=args.level or "all")
    if args.hungarian and args.kind != "instance":
        raise LabelwiseError("--hungarian applies to 'evaluate instance' only")
    if args.level is not None and args.kind not in ("instance", "panoptic"):
        raise LabelwiseError("--level applies to 'evaluate instance' and 'evaluate panoptic' only")
    if args.kind == "unsupervised":
        options["num_clusters"] = args.num_clusters
    result, metric = run_evaluation(args.kind, args.pred, args.gt, args.split, **options)
    if is_main():
        print(metric.table(result))
        if args.json:
            atomic_write_json(args.json, jsonable(result))
    return 0
