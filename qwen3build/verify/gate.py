"""Gate thresholds per quantization recipe, read from [verify.<recipe>] in qwen3build.toml,
and the checks that turn a rung's figures into one-line failures."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import BuildError
from ..paths import DEFAULTS_FILE
from ..settings.defaults import read_defaults
from .metrics import KNIFE_EDGE_MARGIN

# Every key a [verify.<recipe>] table must give, with what it bounds. Each rung (the torch
# reference and the packages) is held to the same table, against the fp32 HF oracle.
THRESHOLD_KEYS = {
    "min_qualified": "fewest teacher-forced positions with oracle margin >= 0.1 (fewer: the gate would be vacuous)",
    "min_top1": "top-1 agreement with the oracle on those positions",
    "min_top5": "fraction of positions whose oracle top-1 is in the rung's top-5",
    "max_mean_kl": "mean KL(oracle || rung) over positions, nats",
    "min_cosine": "smallest logit cosine over positions",
    "max_ppl_drift": "largest |PPL_rung / PPL_oracle - 1| over window sizes",
    "max_hard_divergences": "greedy rollouts that diverge where the oracle margin is >= 0.1",
}


def load_thresholds(recipe: str, path: Path = DEFAULTS_FILE) -> dict:
    """The [verify.<recipe>] table, validated: every key present, numbers only."""
    tables = read_defaults(path).verify
    table = tables.get(recipe)
    if not isinstance(table, dict):
        have = ", ".join(f"[verify.{name}]" for name in tables) or "none"
        raise BuildError(f"{path.name}: no [verify.{recipe}] table for RECIPE={recipe} (have: {have}); "
                         f"add one with keys {', '.join(THRESHOLD_KEYS)}")
    return validate_thresholds(table, f"{path.name} [verify.{recipe}]")


def validate_thresholds(table: dict, where: str = "thresholds") -> dict:
    unknown = sorted(set(table) - set(THRESHOLD_KEYS))
    if unknown:
        raise BuildError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(THRESHOLD_KEYS)}")
    missing = [key for key in THRESHOLD_KEYS if key not in table]
    if missing:
        raise BuildError(f"{where}: missing key(s) {', '.join(missing)}")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise BuildError(f"{where}: {key}={value!r} must be a finite number >= 0 ({THRESHOLD_KEYS[key]})")
    return {key: table[key] for key in THRESHOLD_KEYS}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def check_rung(rung: str, figures: dict, thresholds: dict) -> list[str]:
    """One line per threshold the rung misses, naming the rung, the figure and the bound.

    Comparisons are written so that NaN (or a missing figure) fails."""
    failures = []
    tf = figures["teacher_forced"]
    q = tf["qualified"]
    if not q >= thresholds["min_qualified"]:
        failures.append(f"{rung}: only {q} of {tf['positions']} positions have an oracle top-2 margin >= "
                        f"{KNIFE_EDGE_MARGIN} (need {thresholds['min_qualified']}); the gate would be vacuous: "
                        "use a longer text or a trained checkpoint")
    top1 = tf["top1"]
    if q and not top1 >= thresholds["min_top1"]:
        failures.append(f"{rung}: teacher-forced top-1 agreement {_fmt(top1)} < {thresholds['min_top1']} "
                        f"({tf['top1_mismatches']} of {q} confident positions flipped)")
    if tf["top5"] is None or not tf["top5"] >= thresholds["min_top5"]:
        failures.append(f"{rung}: top-5 containment {_fmt(tf['top5'])} < {thresholds['min_top5']} "
                        f"over {tf['positions']} positions")
    if tf["mean_kl"] is None or not tf["mean_kl"] <= thresholds["max_mean_kl"]:
        failures.append(f"{rung}: mean KL(oracle || {rung}) {_fmt(tf['mean_kl'])} nats > {thresholds['max_mean_kl']} "
                        f"(max {_fmt(tf['max_kl'])})")
    if tf["min_cosine"] is None or not tf["min_cosine"] >= thresholds["min_cosine"]:
        failures.append(f"{rung}: smallest logit cosine {_fmt(tf['min_cosine'])} < {thresholds['min_cosine']} "
                        f"(mean {_fmt(tf['mean_cosine'])})")
    for size, ppl in figures["perplexity"].items():
        if ppl["windows"] == 0:
            continue
        if not abs(ppl["drift"]) <= thresholds["max_ppl_drift"]:
            failures.append(f"{rung}: perplexity on {ppl['windows']} window(s) of {size} tokens {_fmt(ppl['rung'])} "
                            f"vs oracle {_fmt(ppl['oracle'])} (drift {ppl['drift']:+.4%}, allowed "
                            f"±{thresholds['max_ppl_drift']:.4%})")
    greedy = figures["greedy"]
    if not greedy["hard"] <= thresholds["max_hard_divergences"]:
        worst = next(r for r in greedy["rollouts"] if r["verdict"] == "hard")
        failures.append(f"{rung}: {greedy['hard']} of {greedy['prompts']} greedy rollouts diverged from the oracle "
                        f"at a confident step (first: prompt at token {worst['prompt_at']}, step {worst['diverged_at']}, "
                        f"oracle margin {worst['oracle_margin']:.3f} >= {KNIFE_EDGE_MARGIN})")
    return failures
