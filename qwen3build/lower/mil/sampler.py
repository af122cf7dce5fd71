"""The sampler package: logits + recent tokens + runtime parameters + host noise -> token.

One package serves every setting: temperature, min-p, repetition penalty and coherence
strength are inputs, not constants, and the randomness comes in as host noise, so a run
is reproducible from its seed and the graph holds no random op. The rules are written
out (and tested against) in qwen3build/graph/sampler.py; this module emits the same
steps, in the same order, as MIL. Per-token work is O(V + W): no op holds V x W values.

Inputs (docs/run.md has the table):
    logits              (1, V) fp16    the io_model lm_head output
    recent_tokens       (1, W) int32   the last W token ids, PADDING_TOKEN (-1) where empty
    temperature         (1,)   fp32    0 = greedy (argmax of the penalized logits)
    min_p               (1,)   fp32    in [0, 1]
    repetition_penalty  (1,)   fp32    > 0, 1 = off
    coherence           (1,)   fp32    in [0, 1], 0 = off
    noise               (1, V) fp32    uniform [0, 1) from the host RNG
Outputs:
    token                  (1,) int32
    effective_temperature  (1,) fp32   T after coherence modulation (0 when greedy)

Numerics: the whole program computes in fp32 (sampler.convert below): a sum of
exp() over a 151,936-entry vocabulary exceeds fp16's 65504, and Gumbel noise near u = 1
needs float32 resolution. Indices stay int32 (common::add_int16_cast removed: DESIGN
section 3).
"""
from __future__ import annotations

import math

import numpy as np
import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from ...graph import sampler as sampling
from . import save
from .programs import OPSET

INPUT_NAMES = ("logits", "recent_tokens", "temperature", "min_p", "repetition_penalty", "coherence", "noise")
OUTPUT_NAMES = ("token", "effective_temperature")


def _f32(value: float) -> np.float32:
    return np.float32(value)


def sampler_program(vocab_size: int, window: int = sampling.DEFAULT_WINDOW):
    """The sampler as an @mb.program for a vocabulary of `vocab_size` and a `window`-token
    repetition window. Same steps as sampling.sample (see its module docstring)."""
    if vocab_size < 2 or window < 1:
        raise ValueError(f"sampler_program: vocab_size={vocab_size} must be >= 2 and window={window} >= 1")
    scalar = lambda: mb.TensorSpec((1,), dtype=types.fp32)  # noqa: E731
    inv_log_vocab = _f32(1.0 / math.log(vocab_size))
    save.reset_op_names()

    @mb.program(input_specs=[
        mb.TensorSpec((1, vocab_size), dtype=types.fp16),   # logits
        mb.TensorSpec((1, window), dtype=types.int32),      # recent_tokens
        scalar(), scalar(), scalar(), scalar(),              # temperature, min_p, repetition_penalty, coherence
        mb.TensorSpec((1, vocab_size), dtype=types.fp32),   # noise
    ], opset_version=OPSET)
    def program(logits, recent_tokens, temperature, min_p, repetition_penalty, coherence, noise):
        x = mb.cast(x=logits, dtype="fp32", name="logits_fp32")
        # An overflowed fp16 logit (inf) would make the entropy NaN.
        x = mb.clip(x=x, alpha=_f32(-sampling.FP16_MAX), beta=_f32(sampling.FP16_MAX), name="logits_finite")

        # 1. Repetition penalty, O(V + W): gather the window's logits, penalize them, write
        #    them back with one scatter. Padding / out-of-range ids go to an extra column V
        #    that is cut off again. A repeated id gathers the same unpenalized logit each
        #    time and writes the same value back, so duplicates cannot penalize twice and
        #    the order of the writes does not matter. Indices stay int32.
        valid = mb.logical_and(x=mb.greater_equal(x=recent_tokens, y=np.int32(0)),
                               y=mb.less(x=recent_tokens, y=np.int32(vocab_size)), name="window_valid")
        ids = mb.select(cond=valid, a=recent_tokens, b=np.int32(vocab_size), name="window_ids")   # (1, W)
        padded = mb.concat(values=[x, np.zeros((1, 1), np.float32)], axis=1, name="logits_padded")  # (1, V + 1)
        seen = mb.gather_along_axis(x=padded, indices=ids, axis=1, name="window_logits")           # (1, W)
        # Full-shape a/b for select (its type inference ignores cond's shape: DESIGN section 3).
        penalized = mb.select(cond=mb.greater(x=seen, y=_f32(0)),
                              a=mb.real_div(x=seen, y=repetition_penalty), b=mb.mul(x=seen, y=repetition_penalty),
                              name="window_penalized")                                        # (1, W)
        padded = mb.scatter_along_axis(data=padded, indices=ids, updates=penalized, axis=1, mode="update",
                                       name="logits_penalized_padded")                        # (1, V + 1)
        x = mb.slice_by_size(x=padded, begin=[0, 0], size=[1, vocab_size], name="penalized")   # (1, V)

        # 2. Greedy branch.
        greedy_token = mb.reduce_argmax(x=x, axis=-1, keep_dims=False, name="greedy_token")   # (1,) int32

        # 3. Coherence modulation by the normalized entropy at temperature 1.
        d = mb.sub(x=x, y=mb.reduce_max(x=x, axes=[-1], keep_dims=True), name="centered")
        log_partition = mb.log(x=mb.reduce_sum(x=mb.exp(x=d), axes=[-1], keep_dims=True), name="log_partition")
        log_probs = mb.sub(x=d, y=log_partition, name="log_probs")
        neg_entropy = mb.reduce_sum(x=mb.mul(x=mb.exp(x=log_probs), y=log_probs), axes=[-1], keep_dims=True)
        entropy = mb.mul(x=neg_entropy, y=_f32(-1), name="entropy")                            # (1, 1)
        norm_entropy = mb.clip(x=mb.mul(x=entropy, y=inv_log_vocab), alpha=_f32(0), beta=_f32(1))
        norm_entropy = mb.reshape(x=norm_entropy, shape=[1], name="normalized_entropy")        # (1,)
        damping = mb.mul(x=coherence, y=mb.sub(x=_f32(1), y=norm_entropy))
        t_eff = mb.mul(x=temperature, y=mb.sub(x=_f32(1), y=damping), name="t_eff")            # (1,)

        # 4. Temperature, floored so that the unused branch of a greedy step stays finite.
        scaled = mb.real_div(x=x, y=mb.maximum(x=t_eff, y=_f32(sampling.MIN_TEMPERATURE)), name="scaled")
        z = mb.sub(x=scaled, y=mb.reduce_max(x=scaled, axes=[-1], keep_dims=True), name="scaled_centered")

        # 5. Min-p: p_i / p_max = exp(z_i) >= min_p.
        keep = mb.greater_equal(x=mb.exp(x=z), y=min_p, name="min_p_keep")

        # 6. Gumbel-max with the host's uniform noise.
        u = mb.clip(x=noise, alpha=_f32(sampling.NOISE_MIN), beta=_f32(sampling.NOISE_MAX), name="noise_clipped")
        g = mb.mul(x=mb.log(x=mb.mul(x=mb.log(x=u), y=_f32(-1))), y=_f32(-1), name="gumbel")
        score = mb.add(x=z, y=g, name="score")
        score = mb.select(cond=keep, a=score, b=mb.sub(x=score, y=_f32(sampling.PRUNED_OFFSET)), name="score_kept")
        sampled_token = mb.reduce_argmax(x=score, axis=-1, keep_dims=False, name="sampled_token")

        token = mb.select(cond=mb.greater(x=temperature, y=_f32(0)), a=sampled_token, b=greedy_token, name="token")
        return token, mb.identity(x=t_eff, name="effective_temperature")

    return program


def convert(program, metadata: dict | None = None) -> ct.models.MLModel:
    """save.convert computing in fp32: at full vocab the sum of exp() passes fp16's 65504
    and fp16 noise would lose resolution (see the module docstring)."""
    return save.convert(program, metadata, compute_precision=ct.precision.FLOAT32)


def sampler_metadata(vocab_size: int, window: int, compute_units: str) -> dict:
    """What the build task records in the package (qwen3build.* keys)."""
    return {"package": "sampler_model", "compute_units": compute_units, "mode": "sample",
            "vocab_size": vocab_size, "window": window, "padding_token": sampling.PADDING_TOKEN,
            "inputs": ",".join(INPUT_NAMES), "outputs": ",".join(OUTPUT_NAMES)}
