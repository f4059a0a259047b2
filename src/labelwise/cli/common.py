"""Options every sub-command spells the same way.

* ``--set KEY=VALUE ...``: dotted config keys, repeatable (``--set a=1 --set b=2`` and
  ``--set a=1 b=2`` are the same); an unknown key names the closest valid one.
* ``--device``: ``auto | cpu | cuda | cuda:N`` (under torchrun ``cuda`` is the rank's GPU).
* ``--no-progress``: no progress bars (also ``LABELWISE_NO_PROGRESS=1``); applied by the
  dispatcher before the command runs.
"""

from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser, help: str = "dotted config overrides, e.g. --set optim.lr=1e-4 "
                                                     "train.batch_size=4 (repeatable)") -> None:
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help)


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEVICE",
                   help="auto | cpu | cuda | cuda:N (under torchrun, cuda = the rank's GPU; default %(default)s)")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (or LABELWISE_NO_PROGRESS=1)")


def add_common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    if device:
        add_device(p)
    add_progress(p)
