"""Logging for the CLI and dodo.py: our one line per artifact, coremltools kept quiet."""
from __future__ import annotations

import logging
import os
import sys


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (not when configured):
    a caller that swaps stderr, like pytest's capture, never leaves us a closed stream."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure(level: int = logging.INFO) -> None:
    # coremltools logs every removed op at INFO, warns at import that it cannot run
    # models on Linux, and draws a tqdm bar per pass pipeline: none of it helps a user.
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    ours = logging.getLogger("qwen3build")
    if not ours.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False
