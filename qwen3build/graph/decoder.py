"""The re-authored Qwen3 decode step, written once.

Every function here takes an `ops` backend (lower/torch_ops.py runs it eagerly in fp32
as the project's reference; lower/mil_ops.py emits it as MIL for the Core ML packages),
so the math of the deployed graph lives in this file only. One token per call, batch 1.

Deviations from the textbook layer, each for fp16 / the ANE:
- KV cache in the reversed ring layout with masked-blend writes (numerics/tables.py):
  static shapes, no scatter, no dynamic slicing.
- RoPE and the causal mask come from static tables, one row gathered by position.
- RMSNorm inputs carry a static SLaNC pre-scale (numerics/slanc.py) so the fp16 sum of
  squares cannot overflow; eps is scaled by s^2 so the result is unchanged.
- q is scaled by 1/sqrt(head_dim) before the QK matmul, not after, to keep scores small.
- GQA without repeat_kv: queries are grouped (kv_heads, groups, head_dim) and attend to
  their shared KV head by a batched matmul.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ..settings.model_config import ModelConfig

# fp16's smallest subnormal: eps * s^2 below it would flush to 0 and let rsqrt(0) blow up.
FP16_TINY = 2.0 ** -24


def rmsnorm(ops, x, weight, eps: float, prescale: float):
    """RMSNorm over the last axis with a static SLaNC pre-scale (exactly scale-invariant)."""
    if prescale != 1.0:
        x = ops.mul(x, prescale)
    mean_square = ops.mean_last(ops.mul(x, x))
    inv_rms = ops.rsqrt(ops.add(mean_square, max(eps * prescale * prescale, FP16_TINY)))
    return ops.mul(ops.mul(x, inv_rms), weight)


def apply_rope(ops, x, cos_row, sin_signed_row, head_dim: int):
    """x (heads, D) -> x*cos + [x2, x1]*sin_signed (== HF's x*cos + rotate_half(x)*sin)."""
    half = head_dim // 2
    swapped = ops.concat([ops.slice_last(x, half, head_dim), ops.slice_last(x, 0, half)], axis=-1)
    return ops.add(ops.mul(x, cos_row), ops.mul(swapped, sin_signed_row))


@dataclasses.dataclass
class StepRows:
    """Per-position rows gathered once per shard call."""
    cos: Any         # (1, D)
    sin_signed: Any  # (1, D)
    write: Any       # (1, S, 1) one-hot at the ring slot of this position
    keep: Any        # (1, S, 1) = 1 - write
    mask: Any        # (1, 1, S) additive causal mask


def gather_step_rows(ops, tables: dict, position, seq_len: int) -> StepRows:
    write = ops.reshape(ops.gather_rows(tables["write"], position), (1, seq_len, 1))
    return StepRows(
        cos=ops.gather_rows(tables["cos"], position),
        sin_signed=ops.gather_rows(tables["sin_signed"], position),
        write=write,
        keep=ops.rsub(1.0, write),
        mask=ops.reshape(ops.gather_rows(tables["mask"], position), (1, 1, seq_len)),
    )


def decoder_layer(ops, x, w: Callable[[str], Any], k_cache, v_cache, rows: StepRows,
                  config: ModelConfig, scales: np.ndarray):
    """One Qwen3 layer for one token.

    x (1, H); k_cache / v_cache (KVH, S, D) as read from the state;
    scales = this layer's SLaNC row (input_norm, q_norm, k_norm, post_norm).
    Returns (x, k_cache, v_cache) with this token's K/V written at its ring slot.
    """
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    s_in, s_q, s_k, s_post = (float(v) for v in scales)

    h = rmsnorm(ops, x, w("input_norm"), eps, s_in)                        # (1, H)
    query = ops.reshape(ops.linear(h, w("q_proj")), (heads, head_dim))     # (Hq, D)
    key = ops.reshape(ops.linear(h, w("k_proj")), (kv_heads, head_dim))    # (KVH, D)
    value = ops.reshape(ops.linear(h, w("v_proj")), (kv_heads, head_dim))  # (KVH, D)
    query = rmsnorm(ops, query, w("q_norm"), eps, s_q)  # QK-norm: per head, before RoPE
    key = rmsnorm(ops, key, w("k_norm"), eps, s_k)
    query = apply_rope(ops, query, rows.cos, rows.sin_signed, head_dim)
    key = apply_rope(ops, key, rows.cos, rows.sin_signed, head_dim)

    # Masked-blend write of this token's row into the ring: cache*(1-w) + new*w.
    key_row = ops.reshape(key, (kv_heads, 1, head_dim))                    # (KVH, 1, D)
    value_row = ops.reshape(value, (kv_heads, 1, head_dim))
    k_cache = ops.add(ops.mul(k_cache, rows.keep), ops.mul(key_row, rows.write))    # (KVH, S, D)
    v_cache = ops.add(ops.mul(v_cache, rows.keep), ops.mul(value_row, rows.write))

    groups = heads // kv_heads
    query = ops.mul(query, 1.0 / math.sqrt(head_dim))
    query = ops.reshape(query, (kv_heads, groups, head_dim))               # (KVH, G, D)
    scores = ops.add(ops.matmul(query, k_cache, transpose_y=True), rows.mask)  # (KVH, G, S)
    probs = ops.softmax_last(scores)
    attn = ops.reshape(ops.matmul(probs, v_cache), (1, heads * head_dim))  # (1, Hq*D)
    x = ops.add(x, ops.linear(attn, w("o_proj")))

    h = rmsnorm(ops, x, w("post_norm"), eps, s_post)
    gate = ops.silu(ops.linear(h, w("gate_proj")))                         # (1, I)
    mlp = ops.linear(ops.mul(gate, ops.linear(h, w("up_proj"))), w("down_proj"))
    return ops.add(x, mlp), k_cache, v_cache


def decoder_shard(ops, hidden, position, kv_state, weight: Callable[[int, str], Any], tables: dict,
                  layers: range, is_exit: bool, config: ModelConfig, scales: np.ndarray,
                  seq_len: int, final_norm=None):
    """A contiguous run of layers. hidden (1, 1, H); position (1,) int32;
    kv_state (2 * len(layers), KVH, S, D): K of local layer i at 2i, V at 2i + 1.
    Returns (hidden (1, 1, H), new kv_state). The exit shard applies the final norm."""
    hidden_size = config.hidden_size
    x = ops.reshape(hidden, (1, hidden_size))
    rows = gather_step_rows(ops, tables, position, seq_len)
    new_rows = []
    for local, layer in enumerate(layers):
        ops.scope(f"layer{layer:02d}")
        k_cache = ops.index_first(kv_state, 2 * local)       # (KVH, S, D)
        v_cache = ops.index_first(kv_state, 2 * local + 1)
        x, k_cache, v_cache = decoder_layer(ops, x, lambda kind: weight(layer, kind), k_cache, v_cache,
                                            rows, config, scales[layer])
        new_rows += [k_cache, v_cache]
    ops.scope("out")
    new_state = ops.stack_first(new_rows)                      # (2L, KVH, S, D)
    if is_exit:  # the final norm belongs to the exit shard only
        x = rmsnorm(ops, x, final_norm, config.rms_norm_eps, float(scales[config.num_hidden_layers, 0]))
    return ops.reshape(x, (1, 1, hidden_size)), new_state


def embed(ops, table, input_ids, hidden_size: int):
    """input_ids (1, 1) int32 -> hidden (1, 1, H)."""
    return ops.reshape(ops.gather_rows(table, ops.reshape(input_ids, (1,))), (1, 1, hidden_size))


def lm_head(ops, hidden, head_weight, hidden_size: int, vocab_size: int):
    """hidden (1, 1, H), already final-normed by the exit shard -> logits (1, V)."""
    return ops.linear(ops.reshape(hidden, (1, hidden_size)), head_weight)
