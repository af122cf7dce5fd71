"""Tokens/s of `qwen3build run`'s backends on a built stack, without a tokenizer.

    .venv/bin/python bench/run_speed.py                                   # the default build
    .venv/bin/python bench/run_speed.py --models-dir bench/out/build-qwen3-1p7b-fp16/artifacts/coreml/packages \
        --prompt-tokens 8 --new-tokens 8 --backends torch,evaluator

Feeds a fixed pseudo-random prompt of token ids (so it works on checkpoints that ship no
tokenizer, like the 1.7B-shaped bench checkpoint) through runtime.generate.generate, greedy, and
prints time to first token, prefill and decode tokens/s per backend (median of --repeat).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen3build.cli import default_models_dir  # noqa: E402
from qwen3build.runtime.backends import open_backend  # noqa: E402
from qwen3build.runtime.generate import generate  # noqa: E402
from qwen3build.stack import load_stack  # noqa: E402
from qwen3build.graph.sampler import GREEDY  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backends", default="torch,evaluator")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stack = load_stack(args.models_dir or default_models_dir())
    prompt = np.random.RandomState(0).randint(3, min(stack.vocab_size, 2000), args.prompt_tokens).tolist()
    print(f"stack: {stack.layout_text}, SEQ_LEN {stack.seq_len}, vocab {stack.vocab_size}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy")
    print(f"{'backend':10s} {'TTFT s':>8s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name in args.backends.split(","):
        backend = open_backend(stack, name)
        runs = [generate(backend, prompt, GREEDY, args.new_tokens, (), stack.seq_len) for _ in range(args.repeat)]
        print(f"{name:10s} {statistics.median(r.time_to_first_token for r in runs):8.3f} "
              f"{statistics.median(r.prefill_tokens_per_second for r in runs):14.1f} "
              f"{statistics.median(r.decode_tokens_per_second for r in runs):13.1f}")
        del backend
    return 0


if __name__ == "__main__":
    sys.exit(main())
