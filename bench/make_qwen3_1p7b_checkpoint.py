"""Write a Qwen3-1.7B-shaped checkpoint with random weights, for scale benches.

    .venv/bin/python bench/make_qwen3_1p7b_checkpoint.py                 # bench/out/qwen3-1p7b
    .venv/bin/python bench/make_qwen3_1p7b_checkpoint.py --layers 10 --out bench/out/qwen3-1p7b-l10

Real Qwen3-1.7B config values (28 layers, hidden 2048, 16 heads x head_dim 128, 8 KV
heads, intermediate 6144, vocab 151936, rope_theta 1e6, tied embeddings, bf16), random
weights at a realistic scale, sharded into ~2 GB model-0000k-of-0000n.safetensors files
with model.safetensors.index.json. It streams (one row block in memory at a time), so
peak RSS is a few hundred MB. A 151936-entry tokenizer cannot be trained here: the
embedded default checkpoint's tokenizer.json (2048 ids, all inside the vocabulary) is
copied beside it as a stand-in, so `doit verify` and `run` can tokenize text.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tinymodel.synth import QWEN3_1P7B_CONFIG, write_random_qwen3_checkpoint  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "qwen3-1p7b"
SHARD_BYTES = 2 * 1000 ** 3  # ~2 GB shards, as Qwen releases are cut


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--layers", type=int, default=QWEN3_1P7B_CONFIG["num_hidden_layers"],
                        help="number of decoder layers (fewer makes a shallower variant)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")

    config = dict(QWEN3_1P7B_CONFIG, num_hidden_layers=args.layers,
                  max_window_layers=args.layers)
    started = time.perf_counter()
    write_random_qwen3_checkpoint(args.out, config, dtype="bfloat16",
                                  max_shard_bytes=SHARD_BYTES, seed=args.seed)
    shutil.copyfile(REPO_ROOT / "assets" / "qwen3-tiny" / "tokenizer.json", args.out / "tokenizer.json")
    logging.info("Qwen3-1.7B-shaped checkpoint (%d layers) in %s after %.1f s",
                 args.layers, args.out, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
