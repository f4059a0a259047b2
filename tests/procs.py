"""Failure text for tests that launch ``torchrun``: its own traceback fills the tail of stderr,
so the ranks' error lines (Python tracebacks, a C++ ``terminate called``) are shown first."""

from __future__ import annotations

import re
import subprocess

_RANK_ERROR = re.compile(r"Error|error:|terminate called|what\(\)|Abort|Signal|Traceback", re.IGNORECASE)


def explain(r: subprocess.CompletedProcess, tail: int = 1500) -> str:
    lines = [ln for ln in r.stderr.splitlines() if _RANK_ERROR.search(ln) and "elastic" not in ln]
    return "rank error lines:\n" + "\n".join(lines[:40]) + "\n--- stderr tail:\n" + r.stderr[-tail:]
