"""The host loop of `qwen3build run`: prefill the prompt, then choose tokens until EOS,
the token budget or the context capacity, on any backend (runtime/backends.py)."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from ..errors import BuildError
from ..graph import sampler as sampling
from ..graph.sampler import SamplerSettings

STOP_REASONS = ("eos", "max_new_tokens", "context")


@dataclasses.dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    stop_reason: str                 # one of STOP_REASONS
    prefill_seconds: float           # prompt forwards
    time_to_first_token: float       # start of prefill -> first token chosen
    decode_seconds: float            # first token chosen -> last token chosen
    decode_steps: int                # tokens chosen after the first

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
    """Prefill `prompt_ids` one position at a time, then choose tokens until EOS, the
    token budget or the context capacity. EOS is not part of the returned tokens."""
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
    for position, token in enumerate(prompt_ids):
        logits = backend.forward(int(token), position, want_logits=position == len(prompt_ids) - 1)
        if on_prefill:
            on_prefill(position + 1, len(prompt_ids))
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
                      decode_seconds=chosen_times[-1] - chosen_times[0], decode_steps=len(chosen_times) - 1)


