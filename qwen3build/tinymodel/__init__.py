"""The embedded default checkpoint and the tools that make Qwen3-shaped checkpoints.

- ``assets/qwen3-tiny/`` is a small Qwen3-architecture code model trained here on the
  running interpreter's standard-library sources (see ``train.py`` and
  docs/default-checkpoint.md). The build uses it when no checkpoint is given, and the
  parity gate runs on it because its next-token distributions are peaked.
- ``assets/heldout/heldout_code.py.txt`` is original Python text that was never trained
  on: the parity gate's input.
- ``synth.write_random_qwen3_checkpoint`` writes random-weight checkpoints of any Qwen3
  shape (tests, and the Qwen3-1.7B-shaped bench checkpoint).

Nothing here imports torch at module import time: the paths are cheap to reach.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "assets" / "qwen3-tiny"
HELDOUT_TEXT_PATH = REPO_ROOT / "assets" / "heldout" / "heldout_code.py.txt"

__all__ = ["REPO_ROOT", "DEFAULT_CHECKPOINT_DIR", "HELDOUT_TEXT_PATH"]
