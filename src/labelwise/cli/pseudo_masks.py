"""``labelwise pseudo-masks {oap,maskcut,tokencut} (--images DIR | --data SPEC [--split S]) --out FILE.json``.

Unsupervised pseudo-masks for any folder of images or dataset split, as a COCO results json
(RLE masks with ``file_name`` relative to the image root, ``image_id``, ``score`` and
``level``). Runs under ``torchrun`` (each rank takes its share of the images); interrupted
runs resume from ``FILE.json.parts/`` (see :mod:`labelwise.pseudo.runner`).
"""

from __future__ import annotations

import argparse

from labelwise.cli.common import add_common, add_set
from labelwise.errors import LabelwiseError

EPILOG = """examples:
  labelwise pseudo-masks oap --images imgs/ --out oap.json --backbone efficientnet_lite0
  labelwise pseudo-masks oap --data coco:data/objects --split val --out oap.json --backbone efficientnet_lite0
  labelwise pseudo-masks maskcut --images imgs/ --out mc.json --weights dino_vitbase8_pretrain.pth
  labelwise pseudo-masks oap --images imgs/ --out oap.json --backbone efficientnet_lite0 \\
      --set oap.thresholds=[0.9,0.8,0.7] oap.vote=mean --clusters 27 --cluster-maps maps/
  torchrun --nproc_per_node=4 -m labelwise pseudo-masks oap --images imgs/ --out oap.json --weights W.pth

--set keys (dotted): oap.{thresholds,sigma,w_f,w_s,min_area,min_area_frac,vote,edge_update,
  semantic_pooling,center_features,dedup,nms_iou,score,border,impl,affinity,profiles,...}; maskcut.{tau,eps,
  rounds,solver,center,crf,fill_holes,crf_iou,max_iou,min_area_frac}; tokencut.{tau,eps,solver,center};
  features.{backbone,weights,resolution,grid,batch_size,num_workers}; levels; cluster.{k,seed}.
maskcut: the dense CRF post-processing is on when pydensecrf2 is installed, as released
  (--set maskcut.crf=false for the raw cut). unreadable images are listed in FILE.skipped.txt.
see the masks: labelwise show FILE.json --images DIR --out DIR"""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("method", choices=["oap", "maskcut", "tokencut"], help="pseudo-mask generator")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (searched recursively)")
    src.add_argument("--data", metavar="SPEC", help="a dataset FORMAT:PATH instead of a folder (with --split)")
    p.add_argument("--split", default=None, help="with --data: the split (default: the format's default)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="COCO results json to write")
    p.add_argument("--backbone", default=None,
                   help="feature backbone (default dino_vitb8, needs --weights; efficientnet_lite0 has shipped "
                        "ImageNet weights) = features.backbone")
    p.add_argument("--weights", default=None, metavar="PATH", help="backbone checkpoint file = features.weights")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="square input size (default 448; raised to N x stride by --grid N) = features.resolution")
    p.add_argument("--grid", type=int, default=None, metavar="N",
                   help="N x N tokens for the method: a finer key map is area-averaged down to N x N; a coarser "
                        "one is never upsampled (interpolated neighbours look alike and OAP merges everything), "
                        "the image goes in at N x stride px instead (e.g. --grid 28 with efficientnet_lite0, "
                        "stride 32: 896 px) = features.grid")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per forward (default 4) = features.batch_size")
    add_set(p, help="dotted settings (see below), e.g. --set oap.vote=mean maskcut.rounds=5")
    p.add_argument("--level", choices=["both", "instance", "semantic"], default=None,
                   help="OAP: which mask levels to write (default both) = levels")
    p.add_argument("--clusters", "--cluster", type=int, default=None, metavar="K", dest="clusters",
                   help="k-means the mask embeddings into K pseudo classes (category_id = cluster + 1) = cluster.k")
    p.add_argument("--cluster-maps", default=None, metavar="DIR",
                   help="with --clusters and --images: also write DIR/<image>.png cluster-id maps of the "
                        "semantic-level masks (255 = none) for `labelwise evaluate unsupervised`")
    p.add_argument("--format", choices=("results", "coco-dataset"), default="results",
                   help="results: a COCO results list (scores, for evaluate / show); coco-dataset: a COCO dataset "
                        "(images with sizes, annotations, one class-agnostic category) that detectors and "
                        "--data coco:FILE.json,IMAGE_DIR train on, as CutLER writes it")
    p.add_argument("--keep-parts", action="store_true", help="keep FILE.json.parts/ after merging")
    p.add_argument("--random-init", action="store_true", help="random backbone weights (smoke tests only)")
    p.add_argument("--seed", type=int, default=None, help="k-means seed = cluster.seed")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labelwise import dist
    from labelwise.pseudo.runner import generate_from_spec, write_cluster_maps
    from labelwise.utils import resolve_device

    if args.images is not None and not Path(args.images).is_dir():
        raise LabelwiseError(f"--images {args.images}: folder not found; pass an existing directory of images")
    if args.split is not None and args.data is None:
        raise LabelwiseError("--split goes with --data SPEC (a folder given with --images has no splits)")
    if args.cluster_maps and not args.clusters:
        raise LabelwiseError("--cluster-maps needs --clusters K")
    if args.cluster_maps and args.images is None:
        raise LabelwiseError("--cluster-maps needs --images DIR (maps are named after the image files)")
    dist.init_distributed()
    device = resolve_device(args.device)
    levels = None if args.level is None else (("instance", "semantic") if args.level == "both" else (args.level,))
    spec = f"folder:{args.images}" if args.images is not None else args.data
    summary = generate_from_spec(args.method, spec, args.split, args.out, overrides=args.overrides, device=device,
                                 keep_parts=args.keep_parts, show_progress=not args.no_progress,
                                 backbone=args.backbone, weights=args.weights, resolution=args.resolution,
                                 grid=args.grid, batch_size=args.batch_size, clusters=args.clusters, levels=levels,
                                 random_init=args.random_init or None, seed=args.seed)
    if dist.is_main():
        if args.cluster_maps:
            write_cluster_maps(args.out, args.images, args.cluster_maps)
        if args.format == "coco-dataset":
            from labelwise.masks import write_coco_dataset

            write_coco_dataset(args.out)
        msg = f"wrote {summary['masks']} masks for {summary['images']} images to {summary['out']}"
        if args.format == "coco-dataset":
            root = args.images if args.images is not None else "IMAGE_DIR"
            msg += f" (a COCO dataset: --data coco:{summary['out']},{root})"
        if summary["skipped"]:
            msg += f"; {summary['skipped']} unreadable images listed in {summary['skipped_report']}"
        print(msg)
    return 0
