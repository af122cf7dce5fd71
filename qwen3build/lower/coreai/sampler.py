"""The sampler package as a torch module: the rules of graph/sampler.py, step for step.

Same inputs, outputs, order of operations and fp32 arithmetic as the MIL sampler
(lower/mil/sampler.py, which documents the interface); the noise comes from the host, so
the program holds no random op, and nothing sorts (Core AI's converter has no
aten.sort, torch.rand or multinomial: docs/coreai.md). Indices stay int32 except where
torch's gather / scatter insist on int64; the converter narrows those to int32 (Core AI
has no 64-bit types), and every index is < V + 1.
"""
from __future__ import annotations

import math

import torch

from ...graph import sampler as sampling
from .convert import Function

INPUT_NAMES = ("logits", "recent_tokens", "temperature", "min_p", "repetition_penalty", "coherence", "noise")
OUTPUT_NAMES = ("token", "effective_temperature")
ENTRYPOINT = "main"


class SamplerModule(torch.nn.Module):
    def __init__(self, vocab_size: int, window: int = sampling.DEFAULT_WINDOW):
        super().__init__()
        if vocab_size < 2 or window < 1:
            raise ValueError(f"SamplerModule: vocab_size={vocab_size} must be >= 2 and window={window} >= 1")
        self.vocab_size, self.window = vocab_size, window
        self.inv_log_vocab = 1.0 / math.log(vocab_size)

    def forward(self, logits, recent_tokens, temperature, min_p, repetition_penalty, coherence, noise):
        vocab = self.vocab_size
        x = logits.to(torch.float32).clamp(-sampling.FP16_MAX, sampling.FP16_MAX)          # (1, V)

        # 1. Repetition penalty, O(V + W): gather the window's logits from a copy padded
        #    with one extra column (where padding / out-of-range ids point), penalize,
        #    scatter back, cut the column off. A repeated id writes the same value twice.
        valid = (recent_tokens >= 0) & (recent_tokens < vocab)
        ids = torch.where(valid, recent_tokens, torch.full_like(recent_tokens, vocab)).to(torch.int64)  # (1, W)
        padded = torch.cat([x, torch.zeros(1, 1, dtype=torch.float32)], dim=1)         # (1, V + 1)
        seen = torch.gather(padded, 1, ids)                                              # (1, W)
        penalized = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        x = padded.scatter(1, ids, penalized)[:, :vocab]                                 # (1, V)

        # 2. Greedy branch.
        greedy_token = torch.argmax(x, dim=-1).to(torch.int32)                           # (1,)

        # 3. Coherence modulation by the normalized entropy at temperature 1.
        d = x - x.amax(dim=-1, keepdim=True)
        log_probs = d - torch.log(torch.exp(d).sum(dim=-1, keepdim=True))
        entropy = -(torch.exp(log_probs) * log_probs).sum(dim=-1, keepdim=True)         # (1, 1)
        norm_entropy = (entropy * self.inv_log_vocab).clamp(0.0, 1.0).reshape(1)         # (1,)
        t_eff = temperature * (1.0 - coherence * (1.0 - norm_entropy))                   # (1,)

        # 4. Temperature, floored so that the unused branch of a greedy step stays finite.
        scaled = x / torch.clamp(t_eff, min=sampling.MIN_TEMPERATURE)
        z = scaled - scaled.amax(dim=-1, keepdim=True)

        # 5. Min-p: p_i / p_max = exp(z_i) >= min_p.
        keep = torch.exp(z) >= min_p

        # 6. Gumbel-max with the host's uniform noise.
        u = noise.clamp(sampling.NOISE_MIN, sampling.NOISE_MAX)
        score = z - torch.log(-torch.log(u))
        score = torch.where(keep, score, score - sampling.PRUNED_OFFSET)
        sampled_token = torch.argmax(score, dim=-1).to(torch.int32)                      # (1,)

        token = torch.where(temperature > 0, sampled_token, greedy_token)
        return token, t_eff


def sampler_functions(vocab_size: int, window: int = sampling.DEFAULT_WINDOW) -> list[Function]:
    # One tensor per input: torch.export would merge inputs given the same tensor object.
    scalars = [torch.ones(1, dtype=torch.float32) for _ in range(4)]         # temperature .. coherence
    example = (torch.zeros(1, vocab_size, dtype=torch.float16),              # logits
               torch.full((1, window), sampling.PADDING_TOKEN, dtype=torch.int32),  # recent_tokens
               *scalars,
               torch.full((1, vocab_size), 0.5, dtype=torch.float32))         # noise
    return [Function(ENTRYPOINT, SamplerModule(vocab_size, window), example, INPUT_NAMES, OUTPUT_NAMES)]


def sampler_metadata(vocab_size: int, window: int, compute_units: str) -> dict:
    """What the package records (qwen3build.* keys), as the Core ML sampler does."""
    return {"package": "sampler_model", "compute_units": compute_units, "mode": "sample",
            "vocab_size": vocab_size, "window": window, "padding_token": sampling.PADDING_TOKEN,
            "inputs": ",".join(INPUT_NAMES), "outputs": ",".join(OUTPUT_NAMES)}
