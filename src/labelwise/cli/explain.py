"""``labelwise explain RUN_DIR --image IMG --out DIR``: what a CoCal parse of one image is made of.

For a cocal run (dictionary mode) and one image, draw each dictionary component's similarity
map (cosine of every pixel embedding with the component), the chosen part -> object path of
every pixel (part map, object map, legend of the paths present, path probability) and the
part <-> object component similarity matrix, as PNGs, OUT/explain.json and one self-contained
OUT/index.html.

The work is done by :func:`labelwise.report.explain.explain_image` (usable from Python).
"""

from __future__ import annotations

import argparse

from labelwise.cli.common import add_common

EPILOG = """outputs (under --out):
  index.html                  self-contained page: summary, chosen paths, components, matrix
  explain.json                class names, part_to_object, the part x object cosine matrix, the
                              paths present with pixel counts, per-component similarity stats
  paths.png                   image | part map | object map | path probability | pixels the path
                              changed (part argmax != path part), with the path legend below
  path_probability.png        the best path's probability as a heat map
  parts_components.png        one similarity heat map per part component (grid)
  objects_components.png      one per object component (grid)
  components/*.png            each component on its own
  similarity_matrix.png       cosine between part (rows) and object (columns) components; each
                              part's true parent (the dataset hierarchy) boxed
  labels/parts.png, labels/objects.png   the label maps (class ids, VOC palette)

Only cocal runs trained with cocal.dictionary=true (the default) have class components;
kmax runs and cocal.dictionary=false runs are refused.

examples:
  labelwise train cocal --data parts:/data/parts --out runs/cocal --preset cpu
  labelwise explain runs/cocal --image /data/parts/images/val/val_000000.jpg --out explain/"""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a cocal run folder (the --out of 'labelwise train cocal')")
    p.add_argument("--image", required=True, metavar="IMG", help="the image to explain")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: PNGs, explain.json and index.html")
    p.add_argument("--max-side", type=int, default=384, metavar="PX",
                   help="display size: longer side of each drawn panel in pixels (default %(default)s; "
                        "small images are enlarged to 192)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise.report.explain import explain_image

    s = explain_image(args.run_dir, args.image, args.out, device=args.device, max_side=args.max_side,
                      progress=not args.no_progress, log=lambda m: print(m, flush=True))
    paths = s["paths"]
    top = ", ".join(f"{r['part_name']} -> {r['object_name']} {100.0 * r['share']:.0f}%" for r in paths[:3])
    print(f"wrote {s['html']} ({len(s['part_names'])} part and {len(s['object_names'])} object components, "
          f"{len(paths)} paths present: {top}{' ...' if len(paths) > 3 else ''}; {s['changed_by_path']} pixels "
          f"changed by the path; {sum(s['parent_is_nearest'])}/{len(s['part_names'])} parts nearest their parent)")
    return 0
