"""Time to first token and tokens/s of `qwen3build run`'s backends on a built stack, with and
without the prefill function, without a tokenizer.

    .venv/bin/python bench/run_speed.py                                   # the default build
    .venv/bin/python bench/run_speed.py --models-dir /path/to/OUT_DIR \\
        --prompt-tokens 128 --new-tokens 4 --backends evaluator --repeat 3

Feeds a fixed pseudo-random prompt of token ids (so it works on checkpoints that ship no
tokenizer, like the 1.7B-shaped bench checkpoint) through runtime.generate.generate, greedy,
once reading the prompt through `prefill` (blocks of the stack's PREFILL_LEN) and once one
token per call (`--no-prefill`), and prints per backend and mode the median of --repeat
runs: time to first token, prefill and decode tokens/s, and the calls the prompt took.
The two modes must choose the same tokens (greedy); a difference is reported.
"""
from __future__ import annotations

import argparse
import gc
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

MODES = {"prefill": True, "no-prefill": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backends", default="torch,evaluator")
    parser.add_argument("--modes", default="prefill,no-prefill", help="prefill, no-prefill or both (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stack = load_stack(args.models_dir or default_models_dir())
    prompt = np.random.RandomState(0).randint(3, min(stack.vocab_size, 2000), args.prompt_tokens).tolist()
    print(f"stack: {stack.layout_text}, SEQ_LEN {stack.seq_len}, PREFILL_LEN {stack.prefill_len}, vocab "
          f"{stack.vocab_size}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy, median of "
          f"{args.repeat}")
    print(f"{'backend':10s} {'mode':11s} {'TTFT s':>8s} {'prefill tok/s':>14s} {'decode tok/s':>13s}  prompt calls")
    for name in args.backends.split(","):
        tokens = {}
        for mode in args.modes.split(","):
            backend = open_backend(stack, name, use_prefill=MODES[mode])
            runs = [generate(backend, prompt, GREEDY, args.new_tokens, (), stack.seq_len) for _ in range(args.repeat)]
            calls = f"{runs[0].prefill_calls} prefill x{runs[0].prefill_len} + {runs[0].prompt_decode_calls} decode"
            print(f"{name:10s} {mode:11s} {statistics.median(r.time_to_first_token for r in runs):8.3f} "
                  f"{statistics.median(r.prefill_tokens_per_second for r in runs):14.1f} "
                  f"{statistics.median(r.decode_tokens_per_second for r in runs):13.1f}  {calls}", flush=True)
            tokens[mode] = runs[0].tokens
            del backend, runs
            gc.collect()  # a 1.7B backend holds GBs: free it before the next opens
        if len(set(map(tuple, tokens.values()))) > 1:
            print(f"{name}: the modes chose different tokens: {tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
