"""User-facing errors.

Every problem caused by the user's input (a file, a flag, a config key) is raised as
:class:`LabelwiseError` with a one-line message that names the offending file or key
and says how to fix it. The CLI prints it as ``labelwise: error: <message>`` and exits 2;
library users can catch it.
"""

from __future__ import annotations


class LabelwiseError(Exception):
    """An error in the user's input, with a one-line message naming the file and the fix."""

    def __init__(self, message: str):
        text = str(message)
        # A DataLoader worker re-raises the error in the main process with the worker's whole
        # traceback as the message; keep only the original one-line message.
        if text.startswith("Caught ") and "Original Traceback" in text and _MARKER in text:
            text = text[text.rindex(_MARKER) + len(_MARKER):]
        # Keep messages on one line: CLI output and logs rely on it.
        super().__init__(" ".join(text.split()))


_MARKER = "LabelwiseError: "
