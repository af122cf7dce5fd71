"""The host loop of `qwen3build run`: read the prompt (through `prefill` in blocks of
PREFILL_LEN where the stack has it, else one position per `decode` call), then choose
tokens until EOS, the token budget or the context capacity, on any backend
(runtime/backends.py). `verify` feeds its prompts and teacher-forced runs the same way."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from ..errors import BuildError
from ..graph import sampler as sampling
from ..graph.sampler import SamplerSettings

STOP_REASONS = ("eos", "max_new_tokens", "context")
PREFILL, DECODE = "prefill", "decode"


@dataclasses.dataclass(frozen=True)
class PromptStep:
    kind: str        # PREFILL (one call of every prefill function) or DECODE (one position)
    position: int    # first position fed
    count: int       # positions fed (1 for DECODE)

def prefill_block_ids(name: str, tokens, block: int) -> np.ndarray:
    """(1, block) int32 ids of one prefill call: 1..block tokens, a partial block padded
    with graph.PREFILL_PAD_ID (harmless: docs/prefill.md). Every backend's prefill uses it."""
    from ..graph.decoder import PREFILL_PAD_ID
    count = len(tokens)
    if not block:
        raise BuildError(f"{name}: this stack has no prefill function (PREFILL_LEN=0); feed decode steps")
    if not 1 <= count <= block:
        raise ValueError(f"a prefill block takes 1..{block} tokens, got {count}")
    ids = np.full((1, block), PREFILL_PAD_ID, np.int32)
    ids[0, :count] = tokens
    return ids



def prompt_schedule(length: int, prefill_len: int, seq_len: int, start: int = 0) -> list[PromptStep]:
    """The calls that feed positions start .. start+length-1: blocks of prefill_len through
    `prefill`, the last one partial (padded) when the padded block still fits the ring
    (position + prefill_len <= seq_len); positions after the last block that fits go one by
    one through `decode`, so no call ever writes a slot at or beyond seq_len. prefill_len 0:
    every position through `decode`."""
    if start < 0 or start + length > seq_len:
        raise ValueError(f"positions {start}..{start + length - 1} are outside the context capacity 0..{seq_len - 1}")
    steps, position, end = [], start, start + length
    while position < end:
        if prefill_len and position + prefill_len <= seq_len:
            count = min(prefill_len, end - position)
            steps.append(PromptStep(PREFILL, position, count))
        else:
            count = 1
            steps.append(PromptStep(DECODE, position, count))
        position += count
    return steps


def prompt_logits(backend, ids, seq_len: int, start: int = 0, every: bool = False):
    """Feed `ids` at positions start.. (prompt_schedule over backend.prefill_len) and yield
    (step, logits) per call: with every=True the float32 (count, V) logits of each position
    fed (teacher forcing), else the last position's logits from the last call (as the
    backend's forward returns them) and None from the others."""
    steps = prompt_schedule(len(ids), backend.prefill_len, seq_len, start)
    for index, step in enumerate(steps):
        chunk = [int(t) for t in ids[step.position - start:step.position - start + step.count]]
        wanted = every or index == len(steps) - 1
        if step.kind == PREFILL:
            out = backend.prefill(chunk, step.position, ("all" if every else "last") if wanted else None)
        else:
            out = backend.forward(chunk[0], step.position, want_logits=wanted)
        if every:
            out = np.asarray(out, np.float32).reshape(step.count, -1)      # (count, V)
        yield step, out


@dataclasses.dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    stop_reason: str                 # one of STOP_REASONS
    prefill_seconds: float           # prompt forwards
    time_to_first_token: float       # start of prefill -> first token chosen
    decode_seconds: float            # first token chosen -> last token chosen
    decode_steps: int                # tokens chosen after the first
    prefill_calls: int = 0           # prompt calls through `prefill` (blocks)
    prompt_decode_calls: int = 0     # prompt positions fed through `decode`
    prefill_len: int = 0             # tokens per prefill block (0: none used)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else float("nan")


def generate(backend, prompt_ids: list[int], settings: SamplerSettings, max_new_tokens: int,
             eos_token_ids: tuple[int, ...], seq_len: int, seed: int | None = None,
             on_token: Callable[[int], None] | None = None,
             on_prefill: Callable[[int, int], None] | None = None) -> Generation:
    """Read `prompt_ids` (prompt_schedule: prefill blocks where the backend has them), then
    choose tokens until EOS, the token budget or the context capacity. EOS is not part of
    the returned tokens. on_prefill(done, total) after every prompt call."""
    if not prompt_ids:
        raise BuildError("the prompt encodes to no tokens; give a non-empty --prompt")
    if len(prompt_ids) > seq_len:
        raise BuildError(f"the prompt is {len(prompt_ids)} tokens but the stack's context capacity is {seq_len} "
                         f"(SEQ_LEN); shorten the prompt or rebuild with `./dev build SEQ_LEN=<more>`")
    if max_new_tokens < 1:
        raise BuildError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    rng = np.random.default_rng(seed)
    vocab_size = None
    backend.reset()
    started = time.perf_counter()
    logits = None
    calls = {PREFILL: 0, DECODE: 0}
    for step, out in prompt_logits(backend, prompt_ids, seq_len):
        calls[step.kind] += 1
        logits = out if out is not None else logits
        if on_prefill:
            on_prefill(step.position + step.count, len(prompt_ids))
    prefill_seconds = time.perf_counter() - started
    history = list(prompt_ids)
    generated: list[int] = []
    position = len(prompt_ids)
    chosen_times = []
    while True:
        vocab_size = vocab_size or np.asarray(logits).size
        noise = None if settings.greedy else sampling.uniform_noise(rng, vocab_size)
        token = backend.choose(logits, sampling.recent_window(history, backend.window), settings, noise)
        chosen_times.append(time.perf_counter())
        if token in eos_token_ids:
            stop = "eos"
            break
        generated.append(token)
        history.append(token)
        if on_token:
            on_token(token)
        if len(generated) >= max_new_tokens:
            stop = "max_new_tokens"
            break
        if position >= seq_len:  # the token just chosen has no KV row left to go to
            stop = "context"
            break
        logits = backend.forward(token, position)
        position += 1
    return Generation(prompt_tokens=len(prompt_ids), tokens=generated, stop_reason=stop,
                      prefill_seconds=prefill_seconds, time_to_first_token=chosen_times[0] - started,
                      decode_seconds=chosen_times[-1] - chosen_times[0], decode_steps=len(chosen_times) - 1,
                      prefill_calls=calls[PREFILL], prompt_decode_calls=calls[DECODE],
                      prefill_len=backend.prefill_len if calls[PREFILL] else 0)


