"""The ``labelwise`` command line.

Each sub-command lives in its own module with a ``register(subparsers)`` function that
adds its parser and sets ``func`` (called with the parsed namespace, returns an exit
code). Modules are imported lazily so ``labelwise --help`` stays fast and a sub-command
only pays for the imports it needs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from labelwise import __version__
from labelwise.errors import LabelwiseError

# (sub-command, module, one-line help). Order is the order shown in --help.
COMMANDS = [
    ("data", "labelwise.cli.data", "generate synthetic testbeds and inspect datasets"),
    ("train", "labelwise.cli.train", "train a method on a dataset"),
    ("infer", "labelwise.cli.infer", "write seeds, pseudo-masks or predictions from a trained run"),
    ("pseudo-masks", "labelwise.cli.pseudo_masks", "unsupervised pseudo-masks (OAP, MaskCut, TokenCut) for a folder of images"),
    ("evaluate", "labelwise.cli.evaluate", "score predictions against ground truth"),
    ("show", "labelwise.cli.show", "overlays of predicted masks (and ground truth) on their images and an HTML gallery"),
    ("explain", "labelwise.cli.explain", "CoCal: a run's dictionary components and chosen part -> object paths on one image"),
    ("run", "labelwise.cli.run", "run a recipe: resumable stages (train, infer, evaluate, ...) and a comparison table"),
    ("demo", "labelwise.cli.demo", "end-to-end demo on a synthetic testbed with an HTML report"),
    ("export", "labelwise.cli.export", "a trained run as safetensors weights, an ONNX or a TorchScript model"),
    ("bench", "labelwise.cli.bench", "speed and quality benchmarks"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's convention)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="labelwise", description="Label-efficient image segmentation.")
    parser.add_argument("--version", action="version", version=f"labelwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module, help_text in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        mod = importlib.import_module(module)
        mod.register(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only import the module of the command that runs (others get a placeholder parser).
    first = next((a for a in argv if not a.startswith("-")), None)
    names = {n for n, _, _ in COMMANDS}
    only = first if first in names else None
    if only is None and any(a in ("-h", "--help") for a in argv):
        only = "__none__"
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    if getattr(args, "no_progress", False):
        import os

        os.environ["LABELWISE_NO_PROGRESS"] = "1"  # every progress bar of this process and its workers
    try:
        rc = _dispatch(args)
    except BaseException:  # an unexpected error: leave the group without meeting the others, show it
        _leave_process_group(ok=False)
        raise
    _leave_process_group(ok=rc == 0, exit_code=rc)
    return rc


def _dispatch(args) -> int:
    try:
        return int(args.func(args) or 0)
    except LabelwiseError as e:
        print(f"labelwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labelwise: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the command cannot read or write: one line naming it, no traceback
        print(f"labelwise: error: {os_error_line(e)}", file=sys.stderr)
        return 2


_OS_HINTS = {
    errno.EACCES: "choose a path you can write to (or fix its permissions)",
    errno.EPERM: "choose a path you can write to (or fix its permissions)",
    errno.EEXIST: "a file stands where a folder is needed; pass another path",
    errno.ENOTDIR: "a file stands where a folder is needed; pass another path",
    errno.EISDIR: "a folder stands where a file is needed; pass a file path",
    errno.ENOENT: "check the path",
    errno.ENOSPC: "free disk space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
}


def os_error_line(e: OSError) -> str:
    """``PATH: reason; fix`` for an OSError (the path it names, the OS's reason, what to do)."""
    what = e.strerror or str(e)
    where = f"{e.filename}: " if e.filename is not None else ""
    hint = _OS_HINTS.get(e.errno or -1)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _leave_process_group(ok: bool, exit_code: int | None = None) -> None:
    """Under torchrun: leave the process group (:func:`labelwise.dist.shutdown`) and, once the
    command has ended, exit at once. Interpreter teardown would destroy objects that still hold
    the group (DDP's reducer) and gloo's threads in arbitrary order, which aborts a rank now and
    then ("terminate called without an active exception") after all its work is written."""
    if "torch.distributed" not in sys.modules:
        return
    from labelwise import dist

    if not dist.is_dist():
        return
    dist.shutdown(ok)
    if exit_code is not None:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
