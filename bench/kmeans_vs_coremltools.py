"""Benchmark: qwen3build's exact grouped k-means vs coremltools' palettizer.

Same matrix (random normal, std 0.02, rounded through bf16 like a real checkpoint), same
bits, GS128 per_grouped_channel on the output axis. coremltools is called through the
function its palettize pass uses (palettize_weights.grouped_channelwise_compress, mode
KMEANS), on the fp16 copy of the matrix: its exact kmeans1d path only runs on fp16.

Reports wall time and process CPU time (the machine's 2 cores are shared, so CPU time is
the steadier figure), the median of --repeats runs, and the MSE against the fp32 matrix.
--baseline FILE also times the fit_grouped_lut of another copy of qwen3build/quant/lut.py
(say, `git show HEAD~1:qwen3build/quant/lut.py > /tmp/lut_old.py`) in the same run, and
checks that it palettizes to the same dense matrix.

    .venv/bin/python bench/kmeans_vs_coremltools.py [--rows 6144 --cols 2048 --bits 4 6 8]
        [--baseline /tmp/lut_old.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings

import numpy as np

from qwen3build.quant.lut import fit_grouped_lut

GROUP_SIZE = 128


def bf16_rounded_normal(rows: int, cols: int, std: float = 0.02, seed: int = 0) -> np.ndarray:
    weight = np.random.default_rng(seed).normal(0, std, (rows, cols)).astype(np.float32)
    bits = weight.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.astype(np.uint32).view(np.float32)


def ours(weight: np.ndarray, bits: int) -> np.ndarray:
    return fit_grouped_lut(weight, bits, group_size=GROUP_SIZE).dequantize()


def load_baseline(path: str):
    """fit_grouped_lut of another copy of lut.py, as a function like `ours`."""
    spec = importlib.util.spec_from_file_location("baseline_lut", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_lut"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return lambda weight, bits: module.fit_grouped_lut(
        weight, bits, group_size=GROUP_SIZE
    ).dequantize()


def coremltools_kmeans(weight: np.ndarray, bits: int) -> np.ndarray:
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    params = palettize_weights.grouped_channelwise_compress(
        weight.astype(np.float16), "KMEANS", bits, 0, GROUP_SIZE
    )
    return palettize_weights.decompress(params).astype(np.float32)


def measure(fn, weight, bits, repeats):
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        dense = fn(weight, bits)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    mse = float(np.mean((dense - weight) ** 2))
    return statistics.median(walls), statistics.median(cpus), mse, dense


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6144)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="another lut.py to time in the same run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    weight = bf16_rounded_normal(args.rows, args.cols)
    coremltools_kmeans(weight[:GROUP_SIZE, :128], 4)  # import + warm up outside the timing

    print(f"matrix {args.rows}x{args.cols} bf16-rounded N(0, 0.02), group {GROUP_SIZE}, "
          f"median of {args.repeats}")
    header = (f"{'bits':>4} | {'ours wall s':>11} {'cpu s':>6} | {'ct wall s':>9} {'cpu s':>6} | "
              f"{'cpu ratio ct/ours':>17} | {'mse ours':>10} {'mse ct':>10} {'ours/ct':>8}")
    print(header)
    print("-" * len(header))
    baseline = load_baseline(args.baseline) if args.baseline else None
    results = []
    for bits in args.bits:
        o_wall, o_cpu, o_mse, o_dense = measure(ours, weight, bits, args.repeats)
        c_wall, c_cpu, c_mse, _ = measure(coremltools_kmeans, weight, bits, args.repeats)
        print(f"{bits:>4} | {o_wall:>11.2f} {o_cpu:>6.2f} | {c_wall:>9.2f} {c_cpu:>6.2f} | "
              f"{c_cpu / o_cpu:>17.2f} | {o_mse:>10.4e} {c_mse:>10.4e} {o_mse / c_mse:>8.6f}",
              flush=True)
        if baseline is not None:
            b_wall, b_cpu, b_mse, b_dense = measure(baseline, weight, bits, args.repeats)
            results.append((bits, b_wall, b_cpu, o_cpu, c_cpu, np.array_equal(b_dense, o_dense)))
    if results:
        print(f"\nbaseline {args.baseline}, same run, median of {args.repeats}")
        print(f"{'bits':>4} | {'base wall s':>11} {'cpu s':>6} | {'ours cpu s':>10} | "
              f"{'speedup':>7} | {'ct/base':>7} | same dense")
        for bits, b_wall, b_cpu, o_cpu, c_cpu, same in results:
            print(f"{bits:>4} | {b_wall:>11.2f} {b_cpu:>6.2f} | {o_cpu:>10.2f} | "
                  f"{b_cpu / o_cpu:>7.2f} | {c_cpu / b_cpu:>7.2f} | {same}")


if __name__ == "__main__":
    main()
