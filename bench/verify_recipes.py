"""Build and verify every shipped recipe; print the README's results table.

    .venv/bin/python bench/verify_recipes.py                       # default checkpoint, SEQ_LEN 4096
    .venv/bin/python bench/verify_recipes.py --config bench/out/qwen3-1p7b-l2/config.json \
        --seq-len 512 --verify WINDOWS=256 MAX_WINDOWS=1 PACKAGE_POSITIONS=256 ROLLOUTS=1

Each recipe is built and verified through the real dodo.py (outputs under --work) and
its JSON report is read back. Exit status 1 if any recipe fails its gate.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen3build.build.cache import ActionCache  # noqa: E402
RECIPES = ("fp16", "lut8", "default", "lut6-4")


def doit(work: Path, *args: str, **variables) -> subprocess.CompletedProcess:
    paths = {"OUT_DIR": work / "artifacts/coreml/packages", "MIL_DIR": work / "artifacts/coreml/mil",
             "TMP_DIR": work / "artifacts/.tmp", "CACHE_DIR": work / "cache"}
    assignments = [f"{k}={v}" for k, v in {**paths, **variables}.items()]
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args, *assignments],
                          capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "assets/qwen3-tiny/config.json")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--work", type=Path, default=REPO / "bench/out/verify-recipes")
    parser.add_argument("--verify", nargs="*", default=["MAX_WINDOWS=1"], help="extra verify variables")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.verify)
    rows, failed = [], False
    for recipe in args.recipes.split(","):
        common = {"CONFIG": args.config, "SEQ_LEN": args.seq_len, "RECIPE": recipe}
        started = time.perf_counter()
        built = doit(args.work, "build", **common)
        if built.returncode:
            sys.exit(f"{recipe}: build failed\n{built.stdout}\n{built.stderr}")
        build_seconds = time.perf_counter() - started
        report_path = args.work / f"report-{recipe}.json"
        started = time.perf_counter()
        verified = doit(args.work, "verify", REPORT=report_path, **common, **extra)
        if not report_path.is_file():
            sys.exit(f"{recipe}: verify wrote no report\n{verified.stdout}\n{verified.stderr}")
        verify_seconds = time.perf_counter() - started
        report = json.loads(report_path.read_text())
        failed |= not report["passed"]
        stack = json.loads((args.work / "artifacts/coreml/packages/stack.json").read_text())
        cache = ActionCache(args.work / "cache")
        metas = {artifact: cache.read_meta(key) for artifact, key in stack["keys"].items()}
        shards = [(metas[f"shard:{s['name']}"], s["last"] - s["first"] + 1) for s in stack["shards"]]
        bpw = sum(m["extra"]["bpw"] * layers for m, layers in shards) / max(sum(n for _, n in shards), 1)
        io_meta = metas["io_model"]
        io_state = {"bpw": io_meta["extra"]["bpw"]}
        total_mb = (sum(m["bytes"] for m, _ in shards) + io_meta["bytes"]) / 1e6
        for rung in ("reference", "packages"):
            figures = report["rungs"].get(rung)
            if not figures:
                continue
            tf, greedy = figures["teacher_forced"], figures["greedy"]
            ppl = "  ".join(f"{w}: {e['rung']:.3f} ({e['drift'] * 100:+.2f}%)" for w, e in figures["perplexity"].items())
            rows.append(f"| {recipe} | {rung} | {bpw:.2f} / {io_state['bpw']:.1f} | {total_mb:.1f} | "
                        f"{tf['top1']:.4f} ({tf['qualified']}) | {tf['top5']:.4f} | {tf['mean_kl']:.2e} | "
                        f"{ppl} | {greedy['identical']}+{greedy['knife_edge']}/{greedy['prompts']} | "
                        f"{'pass' if report['passed'] else 'FAIL'} |")
        oracle_ppl = "  ".join(f"{w}: {e['ppl']:.3f}" for w, e in report["oracle"]["perplexity"].items())
        print(f"{recipe}: build {build_seconds:.1f}s, verify {verify_seconds:.1f}s, oracle PPL {oracle_ppl}",
              file=sys.stderr)
        if not report["passed"]:
            print(f"{recipe}: " + "; ".join(report["failures"]), file=sys.stderr)
    print(f"checkpoint {args.config.parent.name}, SEQ_LEN {args.seq_len}, verify {' '.join(args.verify)}")
    print("| recipe | rung | bits/weight (proj / emb) | packages MB | top-1 (qualified) | top-5 | mean KL | "
          "PPL by window (drift vs oracle) | greedy identical+knife-edge/prompts | gate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
