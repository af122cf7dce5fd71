"""SLaNC: Static LayerNorm Calibration (arXiv 2410.10553), for RMSNorm in fp16.

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w overflows in fp16 once the sum of squares
passes 65504, i.e. once ||x||_2 passes ~256, which Qwen residual streams do. A static
factor s applied to the norm's input keeps the sum of squares in range, and RMSNorm(s x)
with eps * s^2 equals RMSNorm(x) exactly, so the output does not change. s is computed
offline from the weights that feed each norm: we propagate an estimate of each norm
input's L2 norm through the network (a linear map W sends a vector of norm n to one of
norm ~ ||W||_F n / sqrt(fan_in)), multiply by a safety factor for outliers, and pick the
largest power of two (exact in fp16: no rounding) that keeps the estimate under the
limit. This is an estimate, not a worst-case bound: see docs/numerics.md.

Scales table layout: float32 array (num_layers + 1, 4); row l = layer l's
(input_norm, q_norm, k_norm, post_norm) pre-scales; the last row holds the final norm's
pre-scale in column 0 (ones elsewhere).
"""
from __future__ import annotations

import math

import numpy as np

COLUMNS = ("input_norm", "q_norm", "k_norm", "post_norm")
# sqrt(65504): the L2 norm at which an fp16 sum of squares overflows.
FP16_SUMSQ_NORM_LIMIT = math.sqrt(65504.0)
# Headroom for activations far above the weight-based estimate (outlier features).
SAFETY_FACTOR = 16.0

# Embedding rows per norm step: a 2048-wide step is 64 MB of fp32, not the whole table.
NORM_ROWS_PER_STEP = 8192


def pow2_scale(norm_estimate: float) -> float:
    """Largest power of two s <= 1 with SAFETY_FACTOR * s * norm_estimate <= limit."""
    if norm_estimate <= 0 or not math.isfinite(norm_estimate):
        return 1.0
    exponent = math.floor(math.log2(FP16_SUMSQ_NORM_LIMIT / (SAFETY_FACTOR * norm_estimate)))
    return float(2.0 ** min(0, exponent))


def _gain(weight: np.ndarray) -> float:
    """Norm gain of y = W x for a generic x: ||W||_F / sqrt(fan_in)."""
    return float(np.linalg.norm(weight.astype(np.float32)) / math.sqrt(weight.shape[1]))


def compute_slanc_scales(tensors, config, progress=None) -> tuple[np.ndarray, dict]:
    """Scales (num_layers + 1, 4) and the norm estimates behind them.

    tensors: a tensor source (tensor(name) -> fp32 array); config: the model config."""
    from ..checkpoint.tensors import layer_tensor_name
    embed = tensors.tensor("model.embed_tokens.weight")
    # The worst token's embedding norm, in row steps (no table-sized temporary).
    residual = max(float(np.linalg.norm(embed[start:start + NORM_ROWS_PER_STEP], axis=1).max())
                   for start in range(0, len(embed), NORM_ROWS_PER_STEP))
    del embed
    layers = config.num_hidden_layers
    scales = np.ones((layers + 1, len(COLUMNS)), dtype=np.float32)
    estimates = []
    for layer in range(layers):
        w = lambda kind: tensors.tensor(layer_tensor_name(layer, kind))  # noqa: E731 - one tensor at a time
        normed = float(np.linalg.norm(w("input_norm")))  # RMSNorm output: ||x_hat * gamma||
        q_per_head = _gain(w("q_proj")) * normed / math.sqrt(config.num_attention_heads)
        k_per_head = _gain(w("k_proj")) * normed / math.sqrt(config.num_key_value_heads)
        v_norm = _gain(w("v_proj")) * normed
        attn_out = _gain(w("o_proj")) * v_norm * math.sqrt(config.num_key_value_groups)
        mid = math.hypot(residual, attn_out)
        normed_post = float(np.linalg.norm(w("post_norm")))
        gate = _gain(w("gate_proj")) * normed_post
        up = _gain(w("up_proj")) * normed_post
        act = gate * up / math.sqrt(config.intermediate_size)
        mlp_out = _gain(w("down_proj")) * act
        scales[layer] = [pow2_scale(residual), pow2_scale(q_per_head), pow2_scale(k_per_head), pow2_scale(mid)]
        estimates.append({"layer": layer, "residual": residual, "q_head": q_per_head,
                          "k_head": k_per_head, "post": mid})
        residual = math.hypot(mid, mlp_out)
        if progress:
            progress(layer)
    scales[layers, 0] = pow2_scale(residual)
    estimates.append({"final": residual})
    return scales, {"estimates": estimates}


# A pre-scale must survive the cast to fp16: above this it is inf, below the smallest
# subnormal it is 0 (and the norm's input would vanish).
FP16_MAX = 65504.0
FP16_SMALLEST_SUBNORMAL = 2.0 ** -24


def validate_scales(scales, num_layers: int, where: str) -> np.ndarray:
    """External SLaNC scales (SCALES=...): a real (num_layers + 1, 4) array of finite
    pre-scales that fp16 can hold. One-line BuildError naming `where` otherwise."""
    from ..errors import BuildError
    expected = (num_layers + 1, len(COLUMNS))
    remedy = (f"give a float .npy of shape {expected} (a build without SCALES writes one to "
              "artifacts/numerics/slanc_scales.npy), or leave SCALES empty")
    if not isinstance(scales, np.ndarray):
        raise BuildError(f"{where}: holds a {type(scales).__name__}, not one array; {remedy}")
    if scales.dtype == np.bool_ or not (np.issubdtype(scales.dtype, np.floating)
                                        or np.issubdtype(scales.dtype, np.integer)):
        raise BuildError(f"{where}: SLaNC scales have dtype {scales.dtype}, not numbers; {remedy}")
    if scales.shape != expected:
        raise BuildError(f"{where}: SLaNC scales have shape {scales.shape}, expected {expected} "
                         f"(num_layers + 1, {'/'.join(COLUMNS)}); {remedy}")
    values = scales.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise BuildError(f"{where}: SLaNC scales must be finite and positive, but hold NaN or inf; {remedy}")
    if np.any(values < FP16_SMALLEST_SUBNORMAL) or np.any(values > FP16_MAX):
        raise BuildError(f"{where}: SLaNC scales must be finite and positive, within fp16 range "
                         f"({FP16_SMALLEST_SUBNORMAL:.3g}..{FP16_MAX:g}), got {values.min():.3g}..{values.max():.3g}; "
                         f"{remedy}")
    return scales.astype(np.float32)
