"""``labelwise run RECIPE.yaml --out DIR [--data SPEC] [--set key=value ...]``.

Runs a recipe's stages in order (``synth``, ``train``, ``infer``, ``evaluate``,
``pseudo-masks``), each in ``DIR/<stage>/``. Stages whose outputs are complete are
skipped, a killed run continues where it stopped, and the ``evaluate`` stages end up in one
comparison table (stdout, ``DIR/table.md``, ``DIR/table.json``). See
:mod:`labelwise.stages.recipe` for the format.
"""

from __future__ import annotations

import argparse

from labelwise.cli.common import add_common, add_set

EPILOG = """recipe format (YAML):
  vars: {steps: null}                        # --set steps=50 changes a variable
  data: ${testbed.spec}                      # default dataset; --data SPEC replaces it
  stages:
    - name: testbed
      synth: {testbed: cooc, train: 200, val: 60}
    - name: cam
      train: {method: cam, preset: cpu, steps: ${vars.steps}}
    - name: pred
      infer: {run: ${cam.run}, split: train, what: [seeds, masks]}
    - name: seeds
      evaluate: {task: semantic, pred: ${pred.seeds}, split: train, bg_threshold: 0.5}
  table: {classes: [disc, ring], groups: {pair: [disc, ring]}}   # optional per-class / group columns

  outputs: synth root, spec | train run | infer out + one per what | evaluate metrics | pseudo-masks json
  --set NAME=VALUE sets a variable; --set STAGE.FIELD=VALUE a stage field (e.g. cam.preset=voc).

examples:
  labelwise run demo --out runs/demo                       # a recipe shipped with labelwise
  labelwise run recipes/demo.yaml --out runs/demo --set steps=50
  labelwise run recipes/demo.yaml --out runs/voc --data vocaug:/data/VOC2012 --set cam.preset=voc"""


def register(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[1].replace("``", ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("recipe", metavar="RECIPE", nargs="?",
                   help="recipe YAML file, or the name of a shipped recipe (--list)")
    p.add_argument("--out", metavar="DIR", help="output folder (re-running with it resumes)")
    p.add_argument("--data", default=None, metavar="SPEC", help="dataset FORMAT:PATH replacing the recipe's 'data'")
    add_set(p, help="recipe variables NAME=VALUE or stage fields STAGE.FIELD=VALUE (YAML values)")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labelwise.errors import LabelwiseError
    from labelwise.stages import load_recipe, run_recipe, shipped_recipes

    if args.list:
        for name in shipped_recipes():
            print(f"{name:24s} {load_recipe(name).description}")
        return 0
    if not args.recipe or not args.out:
        raise LabelwiseError("labelwise run needs a RECIPE and --out DIR (see --help; --list shows shipped recipes)")
    run_recipe(args.recipe, args.out, overrides=args.overrides, data=args.data, device=args.device,
               show_progress=not args.no_progress)
    return 0
