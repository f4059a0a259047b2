"""``labelwise show PRED --images DIR --out DIR [--gt SPEC] [--split SPLIT]``: overlays + HTML gallery.

Draw the masks you made over their images -- a COCO RLE results json, a folder of label PNGs
or a parts prediction folder, detected automatically -- with the ground truth beside them if
asked, as OUT/<image stem>.png rows and one self-contained OUT/index.html gallery.

The work is done by :func:`labelwise.report.show.show_predictions` (usable from Python).
"""

from __future__ import annotations

import argparse
import sys

from labelwise.cli.common import add_progress
from labelwise.errors import LabelwiseError

EPILOG = """PRED kinds (detected automatically):
  results json  COCO RLE results (labelwise pseudo-masks, OAP universal.json); a record goes to the
                image whose path relative to --images is its file_name, or else (no file_name) by
                image_id = 1-based position in the sorted listing of --images; per image and level
                (instance / semantic; none = instance) the --top best scores are drawn, one overlay
                per level, each mask in its own colour with its rank number
  label PNGs    a folder of <image stem>.png class or cluster ids (255 = ignore), VOC palette;
                --no-background when 0 is a cluster (cluster-id maps)
  parts folder  PRED/parts/ and PRED/objects/ label PNGs (labelwise infer --what parts): two overlays
--gt SPEC puts the ground truth beside the prediction: instance masks (coco:), label maps (voc:),
parts + objects (parts:), matched to the images by file name or stem.
Records or PNGs that match no image are counted and reported, never dropped silently.

examples:
  labelwise pseudo-masks oap --images imgs/ --out oap.json --backbone efficientnet_lite0
  labelwise show oap.json --images imgs/ --out show/ --top 5
  labelwise show oap.json --images data/objects/images/val --out show/ --gt coco:data/objects
  labelwise show pred/val --images /tmp/cooc/JPEGImages --out show/ --gt voc:/tmp/cooc --max-images 20"""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("pred", metavar="PRED", help="COCO results json, label-PNG folder or parts folder (parts/, objects/)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of the predicted images (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: <image stem>.png rows and index.html")
    p.add_argument("--gt", default=None, metavar="SPEC", help="ground truth to show beside it, FORMAT:PATH "
                                                              "(coco:, voc:, parts:)")
    p.add_argument("--split", default=None, help="with --gt: the ground-truth split (default val)")
    p.add_argument("--top", type=int, default=10, metavar="K",
                   help="results json: masks drawn per image and level, best scores first (default %(default)s)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="show only the first N images of the sorted listing (default all)")
    p.add_argument("--max-side", type=int, default=512, metavar="PX",
                   help="display size: longer side of each panel in pixels (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.45, help="fill opacity of the masks, 0..1 (default %(default)s)")
    p.add_argument("--per-page", type=int, default=25, metavar="N",
                   help="images per HTML page; index.html links page-2.html, ... (default %(default)s): each page is "
                        "self-contained and stays a few tens of MB at most")
    p.add_argument("--no-background", action="store_true",
                   help="label PNGs hold cluster ids: 0 is a cluster, not background (255 = none)")
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise.report.show import show_predictions

    if args.split is not None and args.gt is None:
        raise LabelwiseError("--split goes with --gt SPEC (the ground-truth split)")
    summary = show_predictions(args.pred, args.images, args.out, gt=args.gt, split=args.split or "val",
                               top=args.top, max_images=args.max_images, max_side=args.max_side, alpha=args.alpha,
                               background=not args.no_background, progress=not args.no_progress,
                               per_page=args.per_page)
    msg = (f"wrote {summary['images']} overlays of {summary['images_total']} images and {summary['html']} "
           f"({summary['images_with_pred']} with predictions, {summary['masks_drawn']} "
           f"{'masks' if summary['kind'] == 'results' else 'maps'} drawn")
    if summary.get("gt_missing"):
        msg += f"; {summary['gt_missing']} without ground truth"
    if summary.get("unreadable"):
        msg += f"; {summary['unreadable']} unreadable"
    print(msg + ")")
    if summary["unmatched_line"]:
        print(f"labelwise: warning: {summary['unmatched_line']}", file=sys.stderr)
    return 0
