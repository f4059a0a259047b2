"""``labelwise pseudo-masks {oap,maskcut,tokencut} --images DIR --out FILE.json``.

Unsupervised pseudo-masks for any folder of images, as a COCO results json (RLE masks
with ``file_name`` relative to ``--images``, ``image_id``, ``score`` and ``level``).
Runs under ``torchrun`` (each rank takes ``images[rank::world]``); interrupted runs
resume from ``FILE.json.parts/`` (see :mod:`labelwise.pseudo.runner`).
"""

from __future__ import annotations

import argparse

from labelwise.errors import LabelwiseError

EPILOG = """examples:
  labelwise pseudo-masks oap --images imgs/ --out oap.json --backbone efficientnet_lite0
  labelwise pseudo-masks maskcut --images imgs/ --out mc.json --weights dino_vitbase8_pretrain.pth
  labelwise pseudo-masks oap --images imgs/ --out oap.json --backbone efficientnet_lite0 \\
      --set thresholds=[0.9,0.8,0.7] vote=mean --clusters 27 --cluster-maps maps/
  torchrun --nproc_per_node=4 -m labelwise pseudo-masks oap --images imgs/ --out oap.json --weights W.pth

--set keys: oap: thresholds sigma w_f w_s min_area vote edge_update semantic_pooling
  center_features dedup dedup_iou score cc_backend; maskcut: tau eps rounds solver center crf
  fill_holes crf_iou max_iou min_area_frac; tokencut: tau eps solver center.
unreadable images are listed in FILE.skipped.txt (not fatal)."""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("method", choices=["oap", "maskcut", "tokencut"], help="pseudo-mask generator")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="COCO results json to write")
    p.add_argument("--backbone", default="dino_vitb8",
                   help="feature backbone (default dino_vitb8, needs --weights; efficientnet_lite0 has shipped "
                        "ImageNet weights)")
    p.add_argument("--weights", default=None, metavar="PATH", help="backbone checkpoint file")
    p.add_argument("--resolution", type=int, default=448, metavar="PX", help="square input size (default 448)")
    p.add_argument("--grid", type=int, default=None, metavar="N",
                   help="resample the feature map to N x N tokens (e.g. CNN features; default: as extracted)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="method parameters (see below)")
    p.add_argument("--level", choices=["both", "instance", "semantic"], default="both",
                   help="OAP: which mask levels to write (default both)")
    p.add_argument("--clusters", "--cluster", type=int, default=None, metavar="K", dest="clusters",
                   help="k-means the mask embeddings into K pseudo classes (category_id = cluster + 1)")
    p.add_argument("--cluster-maps", default=None, metavar="DIR",
                   help="with --clusters: also write DIR/<image>.png cluster-id maps of the semantic-level masks "
                        "(255 = none) for `labelwise evaluate unsupervised`")
    p.add_argument("--keep-parts", action="store_true", help="keep FILE.json.parts/ after merging")
    p.add_argument("--random-init", action="store_true", help="random backbone weights (smoke tests only)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labelwise import dist
    from labelwise.pseudo.runner import generate
    from labelwise.utils import resolve_device

    if not Path(args.images).is_dir():
        raise LabelwiseError(f"--images {args.images}: folder not found; pass an existing directory of images")
    if args.clusters is not None and args.clusters < 1:
        raise LabelwiseError(f"--clusters must be >= 1, got {args.clusters}")
    if args.cluster_maps and not args.clusters:
        raise LabelwiseError("--cluster-maps needs --clusters K")
    if args.resolution < 16:
        raise LabelwiseError(f"--resolution must be >= 16, got {args.resolution}")
    dist.init_distributed()
    device = resolve_device(args.device)
    if dist.is_dist() and device.type == "cuda":
        import os

        device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    levels = ("instance", "semantic") if args.level == "both" else (args.level,)
    summary = generate(args.method, args.images, args.out, backbone=args.backbone, weights=args.weights,
                       resolution=args.resolution, batch_size=args.batch_size, device=device,
                       overrides=args.overrides, grid=args.grid, clusters=args.clusters, levels=levels,
                       keep_parts=args.keep_parts, random_init=args.random_init, seed=args.seed)
    if dist.is_main():
        if args.cluster_maps:
            from labelwise.pseudo.runner import write_cluster_maps

            write_cluster_maps(args.out, args.images, args.cluster_maps)
        msg = f"wrote {summary['masks']} masks for {summary['images']} images to {summary['out']}"
        if summary["skipped"]:
            msg += f"; {summary['skipped']} unreadable images listed in {summary['skipped_report']}"
        print(msg)
    return 0
