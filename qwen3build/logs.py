"""Logging for the CLI and dodo.py: our one line per artifact, coremltools kept quiet."""
from __future__ import annotations

import logging
import os
import sys


def configure(level: int = logging.INFO) -> None:
    # coremltools logs every removed op at INFO, warns at import that it cannot run
    # models on Linux, and draws a tqdm bar per pass pipeline: none of it helps a user.
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    ours = logging.getLogger("qwen3build")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False
