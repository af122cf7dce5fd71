"""The tools that made the embedded default checkpoint, and random Qwen3-shaped checkpoints.

Not part of the installed qwen3build package (nothing in the build or the runtime uses
them): the tests and benches import them from the repository.

- ``train.py`` trained ``assets/qwen3-tiny/`` (a small Qwen3-architecture code model) on
  the running interpreter's standard-library sources; see docs/default-checkpoint.md.
  ``python -m tinymodel.train --budget-minutes 30`` makes a sharper one.
- ``synth.write_random_qwen3_checkpoint`` writes random-weight checkpoints of any Qwen3
  shape (tests, and the Qwen3-1.7B-shaped bench checkpoint).
"""
