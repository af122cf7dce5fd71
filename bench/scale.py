"""Real size in minutes and gigabytes: every build promise at the Qwen3-1.7B shape, one table.

    .venv/bin/python bench/scale.py                  # writes bench/out/qwen3-1p7b if missing
    .venv/bin/python bench/scale.py --jobs 0 2 --repeat 5 --skip-verify

For each worker count (`doit -n N`; 0 = serial), in a fresh tree with a fresh cache:
cold fp16 build, cold default-recipe build, no-op (median of --repeat), SEQ_LEN change,
flip back (a restore), `touch` of the weights and the run after it, PREFILL_LEN change,
and `doit verify` with its default options. Each row: wall seconds and the peak RSS of
the largest process of that run (the doit process or one of its workers). Then the peak
RSS of every build task, as each task recorded it (build/actions.py resets the peak
before each build body). Timings are noisy on a shared machine: medians where cheap.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "bench" / "out" / "qwen3-1p7b"
# One run of doit in a fresh process, reporting its own wall time and the peak RSS of the
# largest of its descendants (getrusage(RUSAGE_CHILDREN) of a process that ran only it).
RUNNER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"seconds": time.perf_counter() - started, "code": result.returncode,
                  "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "out": result.stdout[-4000:], "err": result.stderr[-4000:]}))
"""


class Tree:
    def __init__(self, root: Path, config: Path, jobs: int):
        self.root, self.config, self.jobs = root, config, jobs

    def run(self, task: str, gate: bool = False, **variables) -> dict:
        """gate: the task is a gate (verify) whose failure is a figure, not an error."""
        assignments = {"CONFIG": str(self.config), "OUT_DIR": str(self.root / "artifacts/coreml/packages"),
                       "MIL_DIR": str(self.root / "artifacts/coreml/mil"), "TMP_DIR": str(self.root / "artifacts/.tmp"),
                       "CACHE_DIR": str(self.root / "cache"), **{k: str(v) for k, v in variables.items()}}
        command = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-n", str(self.jobs), task,
                   *(f"{k}={v}" for k, v in assignments.items())]
        done = subprocess.run([sys.executable, "-c", RUNNER, *command], capture_output=True, text=True, cwd=self.root)
        report = json.loads(done.stdout)
        report["failed"] = report["code"] != 0
        if report["code"] != 0 and not (gate and "verify failed" in report["out"] + report["err"]):
            sys.exit(f"doit {task} {variables} failed ({report['code']}):\n{report['out']}\n{report['err']}")
        return report

    def task_peaks(self) -> dict[str, float]:
        """Peak RSS in GB each build task recorded (artifacts/.state/<task>.json)."""
        peaks = {}
        for path in sorted((self.root / "artifacts/.state").glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            if record.get("peak_rss") and record.get("status") == "rebuilt":
                peaks[path.stem.replace("__", ":")] = record["peak_rss"] / 1e9
        return peaks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CHECKPOINT / "config.json")
    parser.add_argument("--jobs", type=int, nargs="+", default=[0, 2], help="worker counts to bench (0 = serial)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--seq-len-b", type=int, default=2048)
    parser.add_argument("--prefill-len-b", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="runs of the cheap steps (medians)")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "scale")
    args = parser.parse_args()
    if not args.config.is_file() and args.config.parent == DEFAULT_CHECKPOINT:
        subprocess.run([sys.executable, str(REPO / "bench" / "make_qwen3_1p7b_checkpoint.py")], check=True)
    weights = sorted(args.config.parent.glob("*.safetensors"))
    rows, peaks = [], {}
    for jobs in args.jobs:
        label = "serial" if jobs == 0 else f"-n {jobs}"
        fp16 = Tree(args.work / f"fp16-n{jobs}", args.config, jobs)
        tree = Tree(args.work / f"default-n{jobs}", args.config, jobs)
        for t in (fp16, tree):
            shutil.rmtree(t.root, ignore_errors=True)
            t.root.mkdir(parents=True)
        common = {"SEQ_LEN": args.seq_len}

        def row(name, report, runs=None):
            seconds = statistics.median(r["seconds"] for r in runs) if runs else report["seconds"]
            name += " (gate failed)" if report and report.get("failed") else ""
            rows.append((label, name, seconds, max(r["peak_kb"] for r in (runs or [report])) / 1024 ** 2))

        row("cold build, RECIPE=fp16", fp16.run("build", RECIPE="fp16", **common))
        peaks[f"fp16 {label}"] = fp16.task_peaks()
        row("cold build, RECIPE=default", tree.run("build", **common))
        peaks[f"default {label}"] = tree.task_peaks()
        noop = [tree.run("build", **common) for _ in range(args.repeat)]
        row(f"no-op (median of {args.repeat})", None, noop)
        row(f"SEQ_LEN {args.seq_len} -> {args.seq_len_b}", tree.run("build", SEQ_LEN=args.seq_len_b))
        row(f"SEQ_LEN back to {args.seq_len} (restore)", tree.run("build", **common))
        for path in weights:
            os.utime(path)
        row("after `touch` of the weights", tree.run("build", **common))
        row("the run after that", tree.run("build", **common))
        row(f"PREFILL_LEN -> {args.prefill_len_b}", tree.run("build", PREFILL_LEN=args.prefill_len_b, **common))
        row("PREFILL_LEN back (restore)", tree.run("build", **common))
        if not args.skip_verify:
            row("doit verify (default options)", tree.run("verify", gate=True, **common))
            row("doit verify, RECIPE=fp16", fp16.run("verify", gate=True, RECIPE="fp16", **common))
    print(f"checkpoint: {args.config.parent} ({sum(p.stat().st_size for p in weights) / 1e9:.2f} GB of weights), "
          f"SEQ_LEN {args.seq_len}, {os.cpu_count()} cores")
    print(f"{'workers':8s} {'step':40s} {'seconds':>9s} {'peak RSS GB':>12s}")
    for label, name, seconds, rss in rows:
        print(f"{label:8s} {name:40s} {seconds:9.2f} {rss:12.2f}")
    print("\npeak RSS of every build task (GB), as each recorded it:")
    for name, table in peaks.items():
        print(f"  {name}: " + ", ".join(f"{task} {gb:.2f}" for task, gb in sorted(table.items(), key=lambda i: -i[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
