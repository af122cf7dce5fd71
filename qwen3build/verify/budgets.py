"""Default verify budgets that scale with the model, so `doit verify` takes minutes at any size.

A verify run's work is positions x parameters: every teacher-forced position, rollout step
and decode-alone parity step runs the whole model once, in the oracle, the reference and
the packages (the package evaluator on Linux: ~16 positions/s through prefill and ~1.2
tokens/s of decode at the Qwen3-1.7B shape here). So each default is capped by a budget in
parameter-positions divided by the model's non-embedding parameters P; a small model
(P up to ~1e8, the default checkpoint's is 5e6) keeps the full defaults, and at the 1.7B
shape (P = 1.41e9) the run fits in ten minutes on this machine. A value the user gives
(WINDOWS, MAX_WINDOWS, ROLLOUTS, PARITY_TOKENS, ...) is never changed; the report states
what was scaled and why (options.scaled).
"""
from __future__ import annotations

# Teacher-forced positions per rung: 1.7B gets one 1024-token window (256 is its prefix).
TF_PARAM_POSITIONS = 1.5e12
# Greedy rollout steps per rung (ROLLOUT_TOKENS each): 1.7B gets two of 32 tokens.
ROLLOUT_PARAM_STEPS = 1.0e11
# Decode-alone steps of the prefill parity check's long prompt: 1.7B gets none beyond the
# one-and-a-half-block prompt (T + T/2 + 1) that every run checks.
PARITY_PARAM_STEPS = 1.0e11
# The smallest perplexity window a scaled run keeps.
MIN_WINDOW = 128


def non_embedding_params(config) -> int:
    """Parameters of the decoder layers (projections; norms are negligible)."""
    hidden = config.hidden_size
    per_layer = hidden * (2 * config.q_dim + 2 * config.kv_dim) + 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * per_layer


def scaled_defaults(config, seq_len: int, defaults, given: set[str]) -> tuple[dict, str | None]:
    """(option overrides, a note for the report) for the options not in `given` (field
    names). `defaults` is VerifyOptions() (its field defaults)."""
    params = non_embedding_params(config)
    overrides, changed = {}, []
    positions = int(TF_PARAM_POSITIONS / params)
    if not {"windows", "max_windows"} & given:
        sizes = [seq_len if s == "SEQ_LEN" else min(int(s), seq_len) for s in defaults.windows]
        longest = max(sizes)
        if defaults.max_windows and defaults.max_windows * longest > positions:
            keep = sorted({s for s in sizes if s <= positions}) or [min(seq_len, max(MIN_WINDOW, positions))]
            overrides["windows"], overrides["max_windows"] = tuple(keep), 1
            changed.append(f"windows {','.join(map(str, overrides['windows']))} x1 "
                           f"(default {','.join(map(str, defaults.windows))} x{defaults.max_windows})")
    steps = int(ROLLOUT_PARAM_STEPS / params)
    if "rollouts" not in given and defaults.rollouts * defaults.rollout_tokens > steps:
        overrides["rollouts"] = max(1, steps // max(1, defaults.rollout_tokens))
        changed.append(f"rollouts {overrides['rollouts']} (default {defaults.rollouts})")
    parity = int(PARITY_PARAM_STEPS / params)
    if "parity_tokens" not in given and parity < defaults.parity_tokens:
        overrides["parity_tokens"] = parity
        changed.append(f"parity long prompt up to {parity} tokens (default {defaults.parity_tokens})")
    if not changed:
        return {}, None
    return overrides, (f"scaled to the model's {params / 1e9:.2f}B decoder parameters so verify takes minutes "
                       f"(verify/budgets.py): " + "; ".join(changed) + "; give the options to choose")
