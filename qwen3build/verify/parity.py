"""The prefill parity check: reading a prompt through `prefill` then continuing with `decode`
must give what decode alone gives, on the packages.

For each prompt length (not a multiple of PREFILL_LEN, so a partial block is exercised):
- decode alone: every prompt position through `decode`, logits at each, then a greedy
  continuation through decode (the sampler package, temperature 0);
- prefill: the prompt as `run` reads it (runtime.generate.prompt_logits: blocks of
  PREFILL_LEN, the last one padded, or finished by decode near capacity), taking every
  position's logits (lm_head_prefill) in one pass, and in another the last position's
  (lm_head on its hidden state, what `run` uses) followed by the same greedy continuation.

Held to named constants (fp16 tolerance, docs/prefill.md): at every prompt position and
every continuation step the two paths' logits agree within PARITY_MAX_KL and
PARITY_MIN_COSINE, their top-1 agrees wherever decode alone is confident (margin >=
KNIFE_EDGE_MARGIN), and the continuations are the same tokens (a divergence passes only at
a knife-edge tie of decode alone). A prefill that writes one K/V row at a wrong ring slot
fails all of these (tests/test_prefill.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from . import metrics
from .rungs import prompt_last_logits

log = logging.getLogger(__name__)

# Thresholds (packages in the evaluator, SEQ_LEN 4096, RECIPE default: docs/prefill.md).
# Decode and prefill compute the same values in another order (gemv vs gemm, a row vs a
# block per op), so their fp16 logits differ by rounding, more with depth and width:
# measured KL up to ~3e-5 nats on the default checkpoint (6 layers of 256) and 6.3e-4 at
# the Qwen3-1.7B shape (28 layers of 2048, in a continuation after 97 tokens), cosines
# >= 0.99998 on both; a K/V row at the wrong slot gives KL ~1e-1 and cosines below 0.99.
# The bounds leave ~3x headroom at 1.7B and ~50x below a wrong slot.
PARITY_MAX_KL = 2e-3            # nats, KL(decode alone || prefill) at any position
PARITY_MIN_COSINE = 0.999       # logit cosine at any position
PARITY_MIN_TOP1 = 1.0           # top-1 agreement where decode alone's margin >= KNIFE_EDGE_MARGIN


def parity_lengths(prefill_len: int, seq_len: int, new_tokens: int, available: int, budget: int = 0,
                   long_prompt: int = 1000) -> list[int]:
    """Prompt lengths to check: one full block and a padded one (T + T/2 + 1), always; and a
    long prompt of up to `long_prompt` tokens (the PARITY_TOKENS option), so decode's logits
    are compared with prefill's (which the ladder compares with the oracle) at depth. None
    is a multiple of prefill_len; each leaves room for the continuation; the long one is
    capped by the text, the context and PACKAGE_POSITIONS."""
    room = min(seq_len - new_tokens, available - 1)
    if budget:
        room = min(room, budget)
    base = prefill_len + prefill_len // 2 + 1
    wanted = [base] + ([long_prompt] if long_prompt > base else [])
    lengths = []
    for length in wanted:
        length = min(length, room)
        while length > 1 and length % prefill_len == 0:
            length -= 1
        if length >= 1 and length not in lengths:
            lengths.append(length)
    return sorted(lengths)


def _greedy(rung, logits: np.ndarray, start: int, new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation through decode from `logits` (V,) at position `start`."""
    tokens, steps = [], [logits]
    for k in range(new_tokens):
        token = rung.next_token(steps[-1])
        tokens.append(token)
        if k + 1 < new_tokens:
            steps.append(rung.step(token, start + k))
    return tokens, steps


def _compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Figures of candidate logits (N, V) against reference ones (decode alone)."""
    m = metrics.position_metrics(reference, candidate, np.full(len(reference), -1))
    confident = m["margin"] >= metrics.KNIFE_EDGE_MARGIN
    return {"positions": int(len(reference)), "confident": int(confident.sum()),
            "top1": float(m["top1"][confident].mean()) if confident.any() else None,
            "max_kl": float(m["kl"].max()), "mean_kl": float(m["kl"].mean()),
            "min_cosine": float(m["cosine"].min()),
            "max_abs_diff": float(np.max(np.abs(candidate - reference)))}


def _failures(where: str, figures: dict) -> list[str]:
    out = []
    if not figures["max_kl"] <= PARITY_MAX_KL:
        out.append(f"prefill parity: {where}: KL(decode || prefill) up to {figures['max_kl']:.3g} nats > "
                   f"PARITY_MAX_KL {PARITY_MAX_KL:g}")
    if not figures["min_cosine"] >= PARITY_MIN_COSINE:
        out.append(f"prefill parity: {where}: logit cosine down to {figures['min_cosine']:.6f} < "
                   f"PARITY_MIN_COSINE {PARITY_MIN_COSINE}")
    if figures["top1"] is not None and not figures["top1"] >= PARITY_MIN_TOP1:
        out.append(f"prefill parity: {where}: top-1 agrees on {figures['top1']:.4f} of {figures['confident']} "
                   f"confident positions < PARITY_MIN_TOP1 {PARITY_MIN_TOP1}")
    return out


def prefill_parity(rung, tokens: np.ndarray, lengths: list[int], new_tokens: int, seq_len: int) -> dict:
    """Prefill-then-decode against decode alone on `rung` (the packages) for each prompt
    length, from the start of `tokens`. Returns figures per prompt and one-line failures."""
    from ..runtime.generate import DECODE, prompt_logits, prompt_schedule

    started = time.perf_counter()
    prompts, failures = [], []
    with rung.threads():
        for length in lengths:
            ids = [int(t) for t in tokens[:length]]
            new = min(new_tokens, seq_len - length)
            rung.reset()
            alone = np.stack([rung.step(token, position) for position, token in enumerate(ids)])   # (L, V)
            alone_tokens, alone_steps = _greedy(rung, alone[-1], length, new)
            rung.reset()
            blocked = np.concatenate([out for _, out in prompt_logits(rung, ids, seq_len, every=True)])  # (L, V)
            last = prompt_last_logits(rung, ids, seq_len)                                      # (V,) as `run`
            prefill_tokens, prefill_steps = _greedy(rung, last, length, new)
            schedule = prompt_schedule(length, rung.prefill_len, seq_len)
            prompt = _compare(alone, blocked)
            # The continuations' tokens, held like a greedy rollout against decode alone's;
            # their logits compared while the two histories are the same.
            margins = [float(metrics.top2_margin(step[None])[0]) for step in alone_steps]
            judged = (metrics.judge_rollout(alone_tokens, margins, prefill_tokens) if new
                      else {"verdict": "identical", "diverged_at": None})
            same = len(alone_steps) if judged["diverged_at"] is None else judged["diverged_at"] + 1
            continuation = _compare(np.stack(alone_steps[:same]), np.stack(prefill_steps[:same]))
            entry = {"length": length, "prefill_calls": sum(s.kind != DECODE for s in schedule),
                     "decode_calls": sum(s.kind == DECODE for s in schedule), "new_tokens": new,
                     "prompt": prompt, "continuation": {**continuation, **judged}}
            prompts.append(entry)
            failures += _failures(f"prompt of {length} tokens", prompt)
            failures += _failures(f"continuation after {length} tokens", continuation)
            if judged["verdict"] == "hard":
                failures.append(f"prefill parity: greedy continuation after {length} tokens differs from decode alone "
                                f"at step {judged['diverged_at']} (decode alone's margin {judged['oracle_margin']:.3f} "
                                f">= {metrics.KNIFE_EDGE_MARGIN})")
            log.info("verify prefill parity: %d tokens, max KL %.2e, min cosine %.6f, continuation %s", length,
                     max(prompt["max_kl"], continuation["max_kl"]), min(prompt["min_cosine"],
                                                                        continuation["min_cosine"]), judged["verdict"])
    return {"prefill_len": rung.prefill_len, "lengths": lengths, "prompts": prompts, "failures": failures,
            "thresholds": {"max_kl": PARITY_MAX_KL, "min_cosine": PARITY_MIN_COSINE, "min_top1": PARITY_MIN_TOP1},
            "seconds": round(time.perf_counter() - started, 2)}
