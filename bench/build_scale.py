"""Time `doit build` at real size: cold, no-op, SEQ_LEN change, flip back, touch.

    .venv/bin/python bench/build_scale.py                       # 1.7B-shaped (made if missing)
    .venv/bin/python bench/build_scale.py --config assets/qwen3-tiny/config.json --seq-len 4096

Each step runs the real dodo.py in a subprocess with outputs under --work (default
bench/out/build-<name>), and prints wall time and the peak RSS of that doit process.
Timings are noisy on a shared 2-core machine: --repeat N reruns the cheap steps and
reports their median.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "bench" / "out" / "qwen3-1p7b"


def run_doit(work: Path, config: Path, **variables) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB of this doit process, output)."""
    assignments = {"CONFIG": str(config), "OUT_DIR": str(work / "artifacts/coreml/packages"),
                   "MIL_DIR": str(work / "artifacts/coreml/mil"), "TMP_DIR": str(work / "artifacts/.tmp"),
                   "CACHE_DIR": str(work / "cache"), **{k: str(v) for k, v in variables.items()}}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "build",
                             *(f"{k}={v}" for k, v in assignments.items())],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far, KB
    if result.returncode != 0:
        sys.exit(f"doit build failed:\n{result.stdout}\n{result.stderr}")
    return seconds, (peak if peak > before else float("nan")) / 1024 ** 2, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CHECKPOINT / "config.json")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--seq-len-b", type=int, default=2048)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--recipe", default="fp16", help="RECIPE for every step (quantization time is reported)")
    args = parser.parse_args()
    if not args.config.is_file() and args.config.parent == DEFAULT_CHECKPOINT:
        subprocess.run([sys.executable, str(REPO / "bench" / "make_qwen3_1p7b_checkpoint.py")], check=True)
    work = args.work or REPO / "bench" / "out" / f"build-{args.config.parent.name}-{args.recipe}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    common = {"RECIPE": args.recipe}
    seconds, rss, output = run_doit(work, args.config, SEQ_LEN=args.seq_len, **common)
    rows.append((f"cold build (RECIPE={args.recipe})", seconds, rss))
    print(output)
    quant = [json.loads(p.read_text()) for p in (work / "artifacts/.state").glob("quant__*.json")]
    if quant:
        rows.append((f"  of which quantization ({len(quant)} pack tasks)", sum(q["seconds"] for q in quant), float("nan")))
    noop = [run_doit(work, args.config, SEQ_LEN=args.seq_len, **common)[0] for _ in range(args.repeat)]
    rows.append((f"no-op build (median of {args.repeat})", statistics.median(noop), float("nan")))
    seconds, rss, output = run_doit(work, args.config, SEQ_LEN=args.seq_len_b, **common)
    rows.append((f"SEQ_LEN {args.seq_len} -> {args.seq_len_b}", seconds, rss))
    print(output)
    seconds, rss, output = run_doit(work, args.config, SEQ_LEN=args.seq_len, **common)
    rows.append((f"SEQ_LEN back to {args.seq_len} (restore)", seconds, float("nan")))
    print(output)
    weights = sorted(args.config.parent.glob("*.safetensors"))
    for path in weights:
        os.utime(path)
    rows.append(("after touch of the weights", run_doit(work, args.config, SEQ_LEN=args.seq_len, **common)[0], float("nan")))
    rows.append(("the run after that", run_doit(work, args.config, SEQ_LEN=args.seq_len, **common)[0], float("nan")))
    print(f"checkpoint: {args.config.parent}  ({sum(p.stat().st_size for p in weights) / 1e9:.2f} GB of weights)")
    print(f"{'step':44s} {'seconds':>9s} {'peak RSS GB':>12s}")
    for name, seconds, rss in rows:
        print(f"{name:44s} {seconds:9.2f} {rss:12.2f}")
    print("(peak RSS is the largest doit process so far in this bench; nan = not a new peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
