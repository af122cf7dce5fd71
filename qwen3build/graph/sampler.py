"""The sampling rules in plain numpy: the reference the sampler package is tested against.

One step turns next-token logits (V,) into a token id, in this order (each rule is
written out once here; qwen3build/lower/mil/sampler.py emits the same steps as MIL, and
docs/run.md states them for users):

1. Repetition penalty (CTRL, Keskar et al. 2019, as in HF's
   RepetitionPenaltyLogitsProcessor): for every token id in the recent-token window, a
   positive logit is divided by the penalty and a negative one multiplied by it, so a
   penalty > 1 always lowers a repeated token's odds. An id that occurs several times in
   the window is penalized once. Window slots holding PADDING_TOKEN (or any id outside
   0..V-1) are ignored. A penalty of 1 changes nothing. Cost O(V + W): the window's
   logits are gathered, penalized and written back (one scatter in the package).
2. Greedy mode (temperature == 0): the token is the argmax of the penalized logits
   (lowest index on a tie). Min-p, coherence and noise play no part.
3. Coherence modulation: the effective temperature is
       T_eff = T * (1 - c * (1 - H / log V))
   where H is the entropy (nats) of softmax(penalized logits) at temperature 1 and
   c in [0, 1] the strength. c = 0 is plain temperature sampling; at c = 1 a confident
   step (H ~ 0) is sampled near-greedily while a step on which the model is unsure (H
   near log V) gets the full temperature. Why: a fixed temperature high enough to give
   variety where many continuations are plausible also picks unlikely tokens where the
   model is sure (the middle of an identifier, a closing bracket), and those slips are
   what breaks coherence. Scaling by the model's own uncertainty keeps the confident
   steps tight and spends the randomness where it is harmless (the dynamic-temperature
   idea of llama.cpp's "dynatemp" and of EDT sampling, Zhang et al. 2024, linear form).
4. Temperature: scaled = penalized / max(T_eff, MIN_TEMPERATURE).
5. Min-p (Nguyen et al. 2024, HF MinPLogitsWarper, applied after temperature as in HF):
   a token survives when p_i >= min_p * p_max, computed as exp(scaled_i - max) >= min_p.
   The most likely token always survives; min_p = 0 keeps everything.
6. Gumbel-max with host noise: token = argmax over survivors of
   (scaled_i - max) + g_i, g_i = -log(-log(u_i)), u (V,) uniform from a host RNG (so a
   seed reproduces a run and the graph holds no random op); u is clipped into
   [NOISE_MIN, NOISE_MAX] first. This draws exactly from softmax over the survivors.

All arithmetic is float32, in the order written here, so that the saved package
(evaluated in fp32) returns the same token as this module for the same inputs.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import BuildError

# Window slots with no token (the window is fixed-length; the start of a run has fewer).
PADDING_TOKEN = -1
# llama.cpp's repeat_last_n default: how many recent tokens the penalty looks at.
DEFAULT_WINDOW = 64
# Floor under the effective temperature: coherence modulation can drive it to 0, and a
# division by 0 would turn the sampled branch into NaN. 1e-3 is greedy in practice.
MIN_TEMPERATURE = 1e-3
# The host noise is clipped into the open interval (0, 1) so that -log(-log(u)) is finite;
# these are the float32 neighbours of 0 and 1 at 2**-24.
NOISE_MIN = 2.0 ** -24
NOISE_MAX = 1.0 - 2.0 ** -24
# Subtracted from the score of tokens that min-p pruned: far below any survivor's score
# (>= log(min_p) - 3), finite so that 0 * it stays 0. float32 only (fp16 max is 65504).
PRUNED_OFFSET = 1e30
# fp16 logits that overflowed (inf) are clipped to the fp16 range so that the entropy
# stays finite.
FP16_MAX = 65504.0

# Defaults of `qwen3build run --decode-mode sample` (Qwen3's non-thinking recommendation
# is temperature 0.7; min-p 0.05 is the value min-p's authors suggest as a start).
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MIN_P = 0.05
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_COHERENCE = 0.0


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Runtime parameters of one sampling step; temperature 0 means greedy."""

    temperature: float = DEFAULT_TEMPERATURE
    min_p: float = DEFAULT_MIN_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    coherence: float = DEFAULT_COHERENCE

    def __post_init__(self):
        checks = (
            ("temperature", self.temperature, 0.0, math.inf, "0 (greedy) or more"),
            ("min_p", self.min_p, 0.0, 1.0, "between 0 and 1"),
            ("repetition_penalty", self.repetition_penalty, 0.0, math.inf, "above 0 (1 = off)"),
            ("coherence", self.coherence, 0.0, 1.0, "between 0 and 1 (0 = off)"),
        )
        for name, value, low, high, allowed in checks:
            ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
            if name == "repetition_penalty":
                ok = ok and value > 0
            if not ok:
                raise BuildError(f"{name}={value!r} is out of range: it must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def inputs(self) -> dict[str, np.ndarray]:
        """The sampler package's parameter inputs, each (1,) float32."""
        return {
            "temperature": np.array([self.temperature], np.float32),
            "min_p": np.array([self.min_p], np.float32),
            "repetition_penalty": np.array([self.repetition_penalty], np.float32),
            "coherence": np.array([self.coherence], np.float32),
        }


GREEDY = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=1.0, coherence=0.0)


def recent_window(token_ids, window: int) -> np.ndarray:
    """The last `window` ids of a sequence as (1, window) int32, left-padded with PADDING_TOKEN."""
    recent = list(token_ids)[-window:] if window else []
    out = np.full((1, window), PADDING_TOKEN, np.int32)
    if recent:
        out[0, window - len(recent):] = recent
    return out


def uniform_noise(rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    """(1, V) float32 uniform in [0, 1) from the host RNG: one draw per sampled token."""
    return rng.random((1, vocab_size), dtype=np.float32)


# ------------------------------------------------------------------ the rules, step by step

def as_fp32_logits(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    return np.clip(x, np.float32(-FP16_MAX), np.float32(FP16_MAX))


def window_mask(window_ids, vocab_size: int) -> np.ndarray:
    """(V,) bool: which token ids occur in the window (padding and out-of-range ids ignored)."""
    ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
    seen = np.zeros(vocab_size, bool)
    seen[ids[(ids >= 0) & (ids < vocab_size)]] = True
    return seen


def window_columns(window_ids, vocab_size: int) -> np.ndarray:
    """(W,) column of each window slot: its id, or vocab_size (an extra, discarded column)
    for padding and out-of-range ids."""
    ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
    return np.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)


def penalize(logits: np.ndarray, window_ids, penalty: float) -> np.ndarray:
    """Rule 1 on fp32 logits (V,), as the package does it: gather the window's logits
    (from a copy padded with one extra column), penalize, write back, drop the column.
    A repeated id gathers the same unpenalized logit each time: penalized once."""
    x = as_fp32_logits(logits)
    p = np.float32(penalty)
    padded = np.append(x, np.float32(0))                                   # (V + 1,)
    columns = window_columns(window_ids, x.size)                           # (W,)
    seen = padded[columns]
    padded[columns] = np.where(seen > 0, seen / p, seen * p).astype(np.float32)
    return padded[: x.size]


def normalized_entropy(logits: np.ndarray) -> np.float32:
    """H(softmax(logits)) / log V, in [0, 1]."""
    x = np.asarray(logits, np.float32)
    d = x - np.max(x, keepdims=True)
    log_partition = np.log(np.sum(np.exp(d), keepdims=True))
    log_probs = d - log_partition
    entropy = -np.sum(np.exp(log_probs) * log_probs, keepdims=True)
    normalized = entropy * np.float32(1.0 / math.log(x.size))
    return np.clip(normalized, np.float32(0), np.float32(1)).astype(np.float32)[0]


def effective_temperature(temperature: float, coherence: float, norm_entropy) -> np.float32:
    """Rule 3: T * (1 - c * (1 - H / log V))."""
    t, c = np.float32(temperature), np.float32(coherence)
    return np.float32(t * (np.float32(1) - c * (np.float32(1) - np.float32(norm_entropy))))


def min_p_keep(scaled: np.ndarray, min_p: float) -> np.ndarray:
    """Rule 5 on temperature-scaled logits: (V,) bool of the survivors."""
    z = scaled - np.max(scaled)
    return np.exp(z) >= np.float32(min_p)


def gumbel(noise) -> np.ndarray:
    u = np.clip(np.asarray(noise, np.float32).reshape(-1), np.float32(NOISE_MIN), np.float32(NOISE_MAX))
    return -np.log(-np.log(u))


@dataclasses.dataclass(frozen=True)
class SampleResult:
    token: int
    effective_temperature: float


def sample(logits, window_ids, settings: SamplerSettings, noise=None) -> SampleResult:
    """One step of the rules above. `noise` (V,) uniform is required unless greedy."""
    penalized = penalize(logits, window_ids, settings.repetition_penalty)
    if settings.greedy:
        return SampleResult(int(np.argmax(penalized)), 0.0)
    if noise is None:
        raise ValueError("sampling needs host noise: pass uniform_noise(rng, vocab_size)")
    t_eff = effective_temperature(settings.temperature, settings.coherence, normalized_entropy(penalized))
    scaled = penalized / np.maximum(t_eff, np.float32(MIN_TEMPERATURE))
    z = scaled - np.max(scaled)
    keep = np.exp(z) >= np.float32(settings.min_p)
    score = z + gumbel(noise)
    score = np.where(keep, score, score - np.float32(PRUNED_OFFSET))
    return SampleResult(int(np.argmax(score)), float(t_eff))
