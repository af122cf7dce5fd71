"""`doit verify`: the parity ladder from the HF oracle down to the saved packages.

Each rung (rungs.py) is measured against the fp32 transformers oracle on the same
held-out tokens, cut into windows and runs (windows.py): teacher-forced top-1 / top-5 /
KL / cosine, perplexity per window size, and greedy rollouts; the gate (gate.py) holds
each rung to the recipe's [verify.<RECIPE>] thresholds. The report is keyed (keys.py).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import BuildError
from ..runtime.generate import prompt_logits
from . import metrics
from .gate import check_rung, load_thresholds, validate_thresholds
from .keys import check_stack_matches, verify_inputs
from .keys import digest_json
from .options import VerifyOptions, coerce_options, default_report_path, default_text_path, stack_rungs
from .parity import parity_lengths, prefill_parity
from .rungs import CoreAIRung, PackageRung, ReferenceRung, prompt_last_logits
from .windows import plan_windows, read_text, resolve_window_sizes, tokenize

log = logging.getLogger(__name__)

REPORT_FORMAT = 2
# Context-depth buckets for the by-depth breakdown (an error invisible at 27 tokens can
# flip confident tokens at 272: DESIGN section 4).
DEPTH_EDGES = (0, 64, 256, 1024, 4096, 16384)


@dataclasses.dataclass
class OracleRun:
    hidden: object        # (L, H) torch fp32, final-normed
    nll: np.ndarray       # (L,) next-token NLL, NaN at the last position


def _teacher_forced(rung, oracle, runs, oracle_runs, tokens, budget: int, seq_len: int):
    """Feed every run through the rung as `run` reads a prompt (prefill blocks where the
    stack has them: runtime.generate.prompt_logits), taking every position's logits;
    per-position metrics against the oracle, in pieces of oracle.chunk positions."""
    parts, run_nll, covered = [], [], []
    steps, step_seconds = 0, 0.0
    total = sum(r.length for r in runs) if not budget else min(budget, sum(r.length for r in runs))
    next_log = 0.0

    def score(oracle_run, targets, logits, c0):
        for p0 in range(0, len(logits), oracle.chunk):
            p1 = min(len(logits), p0 + oracle.chunk)
            a, b = c0 + p0, c0 + p1
            part = metrics.position_metrics(oracle.logits(oracle_run.hidden[a:b]), logits[p0:p1], targets[a:b])
            part["depth"] = np.arange(a, b)
            parts.append(part)
            yield part["nll"]

    with rung.threads():
        for run, oracle_run in zip(runs, oracle_runs):
            n = run.length if not budget else max(0, min(run.length, budget - steps))
            ids = tokens[run.start:run.start + run.length]
            targets = np.append(ids[1:], -1)
            nll_parts = []
            if n:
                rung.reset()
                calls = prompt_logits(rung, ids[:n], seq_len, every=True)
                while True:
                    started = time.perf_counter()
                    item = next(calls, None)
                    step_seconds += time.perf_counter() - started
                    if item is None:
                        break
                    step, logits = item                                   # (count, V)
                    nll_parts += list(score(oracle_run, targets, logits, step.position))
                    steps += step.count
                    if steps / total >= next_log:
                        log.info("verify %s: %d/%d positions (%.1f tokens/s)", rung.name, steps, total,
                                 steps / max(step_seconds, 1e-9))
                        next_log += 0.25
            run_nll.append(np.concatenate(nll_parts) if nll_parts else np.zeros(0))
            covered.append(n)
    return metrics.concat_metrics(parts), run_nll, covered, steps, step_seconds


def _perplexity_table(windows, oracle_runs, run_nll=None, covered=None) -> dict:
    """Per window size: windows counted, oracle PPL, and (for a rung) its PPL on the same windows."""
    table = {}
    for size in sorted({w.size for w in windows}):
        oracle_parts, rung_parts = [], []
        for w in (w for w in windows if w.size == size):
            if covered is not None and covered[w.run] < size - 1:
                continue  # the rung's budget ended inside this window
            oracle_parts.append(oracle_runs[w.run].nll[:size - 1])
            if run_nll is not None:
                rung_parts.append(run_nll[w.run][:size - 1])
        entry = {"windows": len(oracle_parts), "predictions": int(sum(len(p) for p in oracle_parts)),
                 "oracle": metrics.perplexity(np.concatenate(oracle_parts)) if oracle_parts else None}
        if run_nll is not None:
            rung_ppl = metrics.perplexity(np.concatenate(rung_parts)) if rung_parts else None
            entry["rung"] = rung_ppl
            entry["drift"] = (rung_ppl / entry["oracle"] - 1.0) if rung_parts else None
        table[str(size)] = entry
    return table


def _prompts(n_tokens: int, options: VerifyOptions, seq_len: int) -> tuple[list[int], int, int]:
    if not options.rollouts or not options.rollout_tokens:
        return [], 0, 0
    prompt = max(1, min(options.prompt_tokens, n_tokens, seq_len - 1))
    new = min(options.rollout_tokens, seq_len - prompt)
    offsets = sorted({int(o) for o in np.linspace(0, n_tokens - prompt, options.rollouts)})
    return offsets, prompt, new


def _greedy(rung, tokens, offsets, prompt_len, oracle_rollouts, seq_len: int) -> dict:
    results = []
    with rung.threads():
        for offset, (oracle_tokens, oracle_margins) in zip(offsets, oracle_rollouts):
            logits = prompt_last_logits(rung, tokens[offset:offset + prompt_len], seq_len)  # as `run` reads it
            produced = []
            for k in range(len(oracle_tokens)):
                token = rung.next_token(logits)
                produced.append(token)
                if token != oracle_tokens[k] or k + 1 == len(oracle_tokens):
                    break
                logits = rung.step(token, prompt_len + k)
            results.append({"prompt_at": offset, **metrics.judge_rollout(oracle_tokens, oracle_margins, produced)})
    verdicts = [r["verdict"] for r in results]
    return {"prompts": len(results), "prompt_tokens": prompt_len,
            "new_tokens": len(oracle_rollouts[0][0]) if oracle_rollouts else 0,
            "identical": verdicts.count("identical"), "knife_edge": verdicts.count("knife-edge"),
            "hard": verdicts.count("hard"), "rollouts": results}


def _depth_edges(seq_len: int) -> list[int]:
    return [e for e in DEPTH_EDGES if e < seq_len] + [seq_len]


def run_verify(plan, text_path: Path | None = None, report_path: Path | None = None, options=None) -> dict:
    """Run the ladder, gate it on [verify.<RECIPE>], write the JSON report; returns the report.

    report["passed"] is the gate; report["failures"] holds one line per missed threshold."""
    started = time.perf_counter()
    options = coerce_options(options)
    text_path = Path(text_path) if text_path is not None else default_text_path()
    report_path = (Path(report_path) if report_path is not None
                   else default_report_path(plan, text_path, options.models_dir))
    thresholds = (validate_thresholds(options.thresholds, "thresholds option") if options.thresholds is not None
                  else load_thresholds(plan.settings.RECIPE))
    stack = check_stack_matches(plan, options.models_dir)
    rungs = ladder_rungs(stack, options)
    text = read_text(text_path)
    tokens = tokenize(stack.tokenizer, stack.vocab_size, text, text_path.name)
    seq_len = plan.settings.SEQ_LEN
    sizes, notes = resolve_window_sizes(options.windows, seq_len, len(tokens))
    if stack.is_release:
        notes = notes + [f"MODELS_DIR is a release ({stack.models_dir.name}): its packages only, the reference rung "
                         "needs the build's SLaNC scales and packs"]
    if not stack.is_release and "coreml" not in stack.formats:
        notes = [*notes, (f"built with FORMATS={','.join(stack.formats)}: no Core ML packages, so no packages rung "
                          "(nor its prefill parity check)")]
    runs, windows = plan_windows(len(tokens), sizes, options.max_windows)
    offsets, prompt_len, new_tokens = _prompts(len(tokens), options, seq_len)
    inputs = verify_inputs(plan, text_path, options, stack)
    if options.scaled:
        log.info("verify: %s", options.scaled)
    log.info("verify: %s, %d tokens; %d runs (%d positions), windows %s; %d greedy rollouts",
             text_path.name, len(tokens), len(runs), sum(r.length for r in runs),
             ", ".join(f"{sum(w.size == s for w in windows)}x{s}" for s in sizes), len(offsets))

    from .oracle import Oracle
    oracle_started = time.perf_counter()
    oracle = Oracle(plan)
    oracle_runs = []
    for run in runs:
        ids = tokens[run.start:run.start + run.length]
        hidden = oracle.hidden_states(ids)
        oracle_runs.append(OracleRun(hidden, oracle.run_nll(hidden, ids)))
    oracle_rollouts = [oracle.greedy(tokens[o:o + prompt_len], new_tokens) for o in offsets]
    oracle.release_decoder()  # the rungs need only its head: GBs freed before they load
    report = {
        "format": REPORT_FORMAT,
        "passed": False,
        "failures": [],
        "recipe": plan.settings.RECIPE,
        "key": digest_json(inputs),
        "checkpoint": str(plan.settings.CONFIG.parent),
        "packages": {"dir": str(stack.models_dir), "keys": stack.info.get("keys")},
        "seq_len": seq_len,
        "layout": [{"name": s.name, "first": s.first, "last": s.last, "role": s.role} for s in plan.layout],
        "text": {"path": str(text_path), "digest": inputs["text"]["digest"], "tokens": int(len(tokens))},
        "windows": {"sizes": sizes, "runs": [[r.start, r.length] for r in runs], "notes": notes},
        "options": options.to_dict(),
        "thresholds": thresholds,
        "knife_edge_margin": metrics.KNIFE_EDGE_MARGIN,
        "oracle": {"perplexity": {k: {"windows": v["windows"], "ppl": v["oracle"]}
                                  for k, v in _perplexity_table(windows, oracle_runs).items()},
                   "seconds": round(time.perf_counter() - oracle_started, 2)},
        "rungs": {},
        "platform": sys.platform,
        "inputs": inputs,
    }

    failures = []
    for name in rungs:
        rung = open_rung(name, stack, options, plan.settings.COREAI_COMPUTE_UNIT)
        budget = {"packages": options.package_positions, "coreai": options.coreai_positions}.get(name, 0)
        rollouts = len(offsets) if name != "coreai" else min(len(offsets), options.coreai_rollouts)
        rung_started = time.perf_counter()
        tf, run_nll, covered, steps, step_seconds = _teacher_forced(rung, oracle, runs, oracle_runs, tokens, budget,
                                                                    seq_len)
        figures = {
            "backend": rung.backend,
            "sampler": rung.sampler,
            "teacher_forced": metrics.summarize_teacher_forced(tf, _depth_edges(seq_len)),
            "perplexity": _perplexity_table(windows, oracle_runs, run_nll, covered),
            "greedy": _greedy(rung, tokens, offsets[:rollouts], prompt_len, oracle_rollouts[:rollouts], seq_len),
            "steps": steps,
            "budget": budget or None,
            "step_seconds": round(step_seconds, 2),
            "tokens_per_second": round(steps / step_seconds, 2) if step_seconds else None,
            "seconds": round(time.perf_counter() - rung_started, 2),
        }
        figures["prefill_len"] = rung.prefill_len  # prompts and teacher-forced runs read in blocks of this
        figures["failures"] = check_rung(name, figures, thresholds)
        failures += figures["failures"]
        report["rungs"][name] = figures
        if name == "packages":
            if rung.prefill_len:
                lengths = parity_lengths(rung.prefill_len, seq_len, options.rollout_tokens, len(tokens), budget,
                                         options.parity_tokens)
                report["prefill_parity"] = prefill_parity(rung, tokens, lengths, options.rollout_tokens, seq_len)
                failures += report["prefill_parity"]["failures"]
            else:
                report["prefill_parity"] = {"skipped": "the packages have no prefill function (PREFILL_LEN=0)"}
        getattr(rung, "close", lambda: None)()
        del rung  # free its weights before the next rung loads (a 1.7B model holds GBs per rung)
        gc.collect()
        log.info("verify %s: %s", name, "ok" if not figures["failures"] else f"{len(figures['failures'])} threshold(s) missed")
    report["failures"] = failures
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    _write_report(report_path, report)
    report["report_path"] = str(report_path)
    return report


def ladder_rungs(stack, options: VerifyOptions) -> tuple[str, ...]:
    """RUNGS, or every rung the stack has (options.stack_rungs); a rung the stack cannot
    give is refused in one line."""
    have = stack_rungs(stack)
    for name in options.rungs or ():
        if name in have:
            continue
        if name == "reference":
            raise BuildError(f"RUNGS=reference: MODELS_DIR={stack.models_dir} is a release, which ships no SLaNC "
                             "scales or quantization packs (the reference rung needs the build's); use RUNGS=packages")
        fmt = "coreml" if name == "packages" else "coreai"
        raise BuildError(f"RUNGS={name}: {stack.models_dir} was built with FORMATS={','.join(stack.formats)}, without "
                         f"{fmt} packages; build with FORMATS=coreml,coreai or leave {name} out of RUNGS")
    return tuple(options.rungs) if options.rungs else have


def open_rung(name: str, stack, options: VerifyOptions, compute_unit: str):
    if name == "reference":
        return ReferenceRung(stack)
    if name == "coreai":
        return CoreAIRung(stack, compute_unit)
    return PackageRung(stack, options.backend)


def _write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)
