"""``labelwise data``: synthetic testbeds (``synth``) and dataset checks (``check``)."""

from __future__ import annotations

import argparse
import sys

from labelwise.errors import LabelwiseError


def _synth_epilog() -> str:
    from labelwise.data import synth

    lines = ["testbeds:",
             "  cooc     VOC layout: 10 textured shape classes on 5 context backgrounds; each class on its",
             "           home context most of the time; 3 co-occurring class pairs (SeCo's problem)",
             "  parts    parts layout: 5 objects with 2-4 parts; some parts look alike across objects",
             "  objects  COCO layout (RLE): thing instances, some touching the same class, on stuff bands",
             "", "options (--opt KEY=VALUE):"]
    for kind in synth.KINDS:
        for key, (default, lo, hi, help_text) in synth.options(kind).items():
            lines.append(f"  {kind}.{key} = {default!r}  [{lo}, {hi}]  {help_text}")
    return "\n".join(lines)


def _parse_opts(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LabelwiseError(f"--opt {item!r}: expected KEY=VALUE, e.g. --opt context_rate=0.8")
        key = key.strip()
        if "." in key:  # allow "cooc.context_rate" as shown in --help
            key = key.split(".", 1)[1]
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def _run_synth(args: argparse.Namespace) -> int:
    from labelwise.data import synth

    opts = _parse_opts(args.opt)
    for key in ("context_rate", "pair_rate"):
        value = getattr(args, key)
        if value is not None:
            if args.kind != "cooc":
                raise LabelwiseError(f"--{key.replace('_', '-')}: only the cooc testbed has this option")
            opts[key] = value
    out = synth.generate(args.kind, args.out_dir, n_train=args.train, n_val=args.val, size=args.size,
                         seed=args.seed, overwrite=args.overwrite, **opts)
    meta = synth.load_meta(out)
    n = sum(meta["splits"].values())
    print(f"wrote {args.kind} testbed ({n} images, {args.size} px, seed {args.seed}) to {out}; "
          f"use --data {meta['format']}:{out}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    import labelwise.data as data

    build = getattr(data, "build_dataset", None)
    validate = getattr(data, "validate", None)
    if build is None or validate is None:
        raise LabelwiseError("data check: dataset loading is not available in this installation "
                             "(labelwise.data.build_dataset/validate missing); reinstall labelwise")
    dataset = build(args.spec, args.split)
    problems = list(validate(dataset, decode=not getattr(args, "headers_only", False)))
    n = len(dataset)
    names = getattr(dataset, "class_names", None)
    what = f"{n} images" + (f", {len(names)} classes" if names else "")
    if not problems:
        print(f"{args.spec} [{args.split}]: OK ({what})")
        return 0
    for file, reason in problems:
        print(f"{file}: {reason}")
    print(f"{args.spec} [{args.split}]: {len(problems)} problem(s) in {what}", file=sys.stderr)
    return 1


def register(subparsers, name: str = "data", help: str = "") -> argparse.ArgumentParser:
    from labelwise.cli.common import add_progress

    from labelwise.data.synth import DEFAULT_SEED, DEFAULT_SIZE, DEFAULT_TRAIN, DEFAULT_VAL, KINDS

    parser = subparsers.add_parser(name, help=help, description=help)
    sub = parser.add_subparsers(dest="data_command", metavar="{synth,check,convert}",
                                parser_class=type(parser))
    parser.set_defaults(func=lambda a: (parser.print_help(), 2)[1])

    s = sub.add_parser("synth", help="write a synthetic testbed (deterministic by seed)",
                       description="Write a synthetic testbed in a standard dataset format.",
                       epilog=_synth_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("kind", choices=KINDS, help="which testbed")
    s.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new, empty, or a testbed of the same kind)")
    s.add_argument("--train", type=int, default=DEFAULT_TRAIN, metavar="N",
                   help=f"training images (default {DEFAULT_TRAIN})")
    s.add_argument("--val", type=int, default=DEFAULT_VAL, metavar="N",
                   help=f"validation images (default {DEFAULT_VAL})")
    s.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="PX",
                   help=f"image side in pixels, >= 32 (default {DEFAULT_SIZE})")
    s.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                   help=f"random seed; same seed -> identical files (default {DEFAULT_SEED})")
    s.add_argument("--context-rate", type=float, default=None, metavar="P",
                   help="cooc: probability of the home context (default 0.8)")
    s.add_argument("--pair-rate", type=float, default=None, metavar="P",
                   help="cooc: P(partner | class) for co-occurring pairs (default 0.7)")
    s.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any testbed option (listed below); repeatable")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that is not a testbed of this kind")
    add_progress(s)
    s.set_defaults(func=_run_synth)

    c = sub.add_parser("check", help="validate a dataset (layout, readable files, label values)",
                       description="Validate a dataset: every listed file exists, decodes, and its "
                                   "labels are in range. Exits 1 and lists 'file: reason' on problems.")
    c.add_argument("spec", metavar="SPEC", help="FORMAT:PATH, e.g. voc:data/cooc")
    c.add_argument("--split", default="train", help="split to check (default train)")
    c.add_argument("--headers-only", action="store_true",
                   help="read image headers instead of decoding every image (faster; misses truncated files)")
    add_progress(c)
    c.set_defaults(func=_run_check)

    v = sub.add_parser("convert", help="turn an official download into the layout a loader reads",
                       description="Turn an official dataset download into the layout labelwise reads.\n"
                                   "  sbd: the SBD benchmark_RELEASE folder (MATLAB .mat labels) into a PASCAL VOC "
                                   "2012 folder: SegmentationClassAug/, the SBD images and "
                                   "ImageSets/Segmentation/train_aug.txt, for --data vocaug:OUT.\n"
                                   "  pascal-part: Pascal-Part's trainval/Annotations_Part/*.mat on the VOC 2010 "
                                   "images (--images) into a parts: dataset (images/, parts/, objects/, "
                                   "hierarchy.json), Pascal-Part-108's parts by default, for --data pascalpart:OUT.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                              "  labelwise data convert sbd benchmark_RELEASE VOCdevkit/VOC2012\n"
                              "  labelwise data convert pascal-part trainval data/pascal-part108 "
                              "--images VOCdevkit/VOC2010")
    v.add_argument("kind", choices=("sbd", "pascal-part"), help="which download")
    v.add_argument("src", metavar="SRC", help="the download (sbd: benchmark_RELEASE/; pascal-part: trainval/)")
    v.add_argument("out", metavar="OUT", help="where it goes (sbd: the VOC2012 folder of VOCtrainval_11-May-2012; "
                                              "pascal-part: a new folder)")
    v.add_argument("--images", default=None, metavar="VOC2010",
                   help="pascal-part: the VOC2010 folder (JPEGImages/, ImageSets/Main/{train,val}.txt)")
    v.add_argument("--parts", default="108", choices=("108", "fine"),
                   help="pascal-part: Pascal-Part-108's 107 parts (default) or every official part")
    add_progress(v)
    v.set_defaults(func=_run_convert)
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    from labelwise.data.convert import CONVERTERS
    from labelwise.utils import progress_enabled

    if args.kind == "sbd":
        if args.images is not None or args.parts != "108":
            raise LabelwiseError("--images and --parts are pascal-part options; sbd takes SRC and OUT only")
        res = CONVERTERS["sbd"](args.src, args.out, show_progress=progress_enabled())
        print(f"sbd: {res['labels_written']} labels written, {res['images_copied']} images copied, "
              f"{res['train_aug']} ids in train_aug.txt; use --data vocaug:{res['out']}")
        return 0
    res = CONVERTERS["pascal-part"](args.src, args.out, images=args.images, parts=args.parts,
                                    show_progress=progress_enabled())
    print(f"pascal-part: {res['train']} train / {res['val']} val images, {res['parts']} parts, "
          f"{res['labels_written']} label pairs written ({res['labels_kept']} kept); ignore (255) pixels: "
          f"{res['ignored_uncovered_px']} of objects no part covers, {res['ignored_unmapped_part_px']} of parts "
          f"Pascal-Part-108 does not keep; use --data pascalpart:{res['out']}")
    return 0
