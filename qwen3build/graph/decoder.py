"""The re-authored Qwen3 decode step, written once.

Every function here takes an `ops` backend (lower/torch/ops.py runs it eagerly in fp32
as the project's reference; lower/mil/ops.py emits it as MIL for the Core ML packages),
so the math of the deployed graph lives in this file only. One token per call, batch 1.

Deviations from the textbook layer, each for fp16 / the ANE:
- KV cache in the reversed ring layout (graph/tables.py), one state per shard holding
  every layer's K and V: (2L, KVH, S, D), K of local layer i at 2i, V at 2i + 1. The
  state is read once per call; how this token's rows get in is KV_WRITE:
  "slice" (default) writes each K / V row at its ring slot with a slice_update, each
  followed by a state update (the in-place pattern coremltools 9 keeps as
  read_state -> slice_update -> write_state), so a write touches one row per layer;
  "blend" is the seed stack's masked blend, cache*(1-w) + row*w with w a one-hot row
  over all S slots, and one write of the whole stacked state at the end.
  Either way attention reads the cache *after* this token's row is in it.
- RoPE rows and the causal-mask row are slices at the position of tables linear in S
  (one merged RoPE table, a (2S,) mask ramp): no S x S table, no gather.
- RMSNorm inputs carry a static SLaNC pre-scale (graph/slanc.py) so the fp16 sum of
  squares cannot overflow; eps is scaled by s^2 so the result is unchanged.
- q is scaled by 1/sqrt(head_dim) before the QK matmul, not after, to keep scores small.
- GQA without repeat_kv: queries are grouped (kv_heads, groups, head_dim) and attend to
  their shared KV head by a batched matmul.

A shard's `position` must lie in [0, SEQ_LEN): the slices above are not checked on device
(the host stops at capacity, runtime/generate.py; the reference refuses).
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
    """Per-position rows, sliced once per shard call."""
    cos: Any           # (1, D)
    sin_signed: Any    # (1, D)
    mask: Any          # (1, 1, S) additive causal mask
    slot: Any = None   # (1,) int32 ring slot S-1-p                      (KV_WRITE=slice)
    write: Any = None  # (1, S, 1) one-hot at the ring slot of this position (KV_WRITE=blend)
    keep: Any = None   # (1, S, 1) = 1 - write                              (KV_WRITE=blend)


def step_rows(ops, tables: dict, position, seq_len: int, head_dim: int, kv_write: str) -> StepRows:
    """tables: "rope" (S, 2D), "mask_ramp" (2S,), and for blend "write_ramp" (2S,)
    (graph/tables.py); position (1,) int32 in [0, S)."""
    rope = ops.slice_rows(tables["rope"], position, 1)                       # (1, 2D) [cos | sin_signed]
    mask = ops.reshape(ops.slice_rows(tables["mask_ramp"], position, seq_len), (1, 1, seq_len))
    rows = StepRows(cos=ops.slice_last(rope, 0, head_dim), sin_signed=ops.slice_last(rope, head_dim, 2 * head_dim),
                    mask=mask)
    if kv_write == "slice":
        rows.slot = ops.index_rsub(seq_len - 1, position)                   # (1,) int32: the reversed ring
    else:
        rows.write = ops.reshape(ops.slice_rows(tables["write_ramp"], position, seq_len), (1, seq_len, 1))
        rows.keep = ops.rsub(1.0, rows.write)
    return rows


class SliceWrite:
    """KV_WRITE=slice: each K / V row goes to its ring slot with one slice_update, and every
    write is stored in the state at once; the layer's caches are read back from the value
    the write returned (so they hold this token's row)."""

    def __init__(self, ops, state, rows: StepRows):
        self.ops, self.state, self.slot = ops, state, rows.slot
        self.kv = ops.read_state(state)                                      # (2L, KVH, S, D), read once

    def layer(self, local: int, key_row, value_row):
        """key_row / value_row (KVH, 1, D) of local layer `local` -> its caches (KVH, S, D) each."""
        ops = self.ops
        self.kv = ops.write_state_row(self.state, self.kv, 2 * local, self.slot, key_row)
        self.kv = ops.write_state_row(self.state, self.kv, 2 * local + 1, self.slot, value_row)
        return ops.index_first(self.kv, 2 * local), ops.index_first(self.kv, 2 * local + 1)

    def finish(self) -> None:
        pass  # every row write already updated the state


class BlendWrite:
    """KV_WRITE=blend (the seed stack's write): every layer's caches are rebuilt as
    cache*(1-w) + row*w over all S slots, and the stacked (2L, KVH, S, D) result is
    written back to the state once at the end."""

    def __init__(self, ops, state, rows: StepRows):
        self.ops, self.state, self.rows = ops, state, rows
        self.kv = ops.read_state(state)                                      # (2L, KVH, S, D), read once
        self.new_caches: list = []

    def layer(self, local: int, key_row, value_row):
        ops, rows = self.ops, self.rows
        k_cache = ops.index_first(self.kv, 2 * local)                        # (KVH, S, D)
        v_cache = ops.index_first(self.kv, 2 * local + 1)
        k_cache = ops.add(ops.mul(k_cache, rows.keep), ops.mul(key_row, rows.write))    # (KVH, S, D)
        v_cache = ops.add(ops.mul(v_cache, rows.keep), ops.mul(value_row, rows.write))
        self.new_caches += [k_cache, v_cache]
        return k_cache, v_cache

    def finish(self) -> None:
        self.ops.write_state(self.state, self.ops.stack_first(self.new_caches))  # (2L, KVH, S, D)


# One writer per KV_WRITE mode (settings.KV_WRITE_MODES names the same modes; a test keeps
# the two in step without the graph importing the settings machinery).
KV_WRITERS = {"slice": SliceWrite, "blend": BlendWrite}


def decoder_layer(ops, x, w: Callable[[str], Any], write_kv: Callable[[Any, Any], tuple], rows: StepRows,
                  config: ModelConfig, scales: np.ndarray):
    """One Qwen3 layer for one token.

    x (1, H); write_kv(key_row, value_row) stores this token's K / V rows (KVH, 1, D) in
    the ring and returns the layer's caches (KVH, S, D) with them in;
    scales = this layer's SLaNC row (input_norm, q_norm, k_norm, post_norm). Returns x.
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

    key_row = ops.reshape(key, (kv_heads, 1, head_dim))                    # (KVH, 1, D)
    value_row = ops.reshape(value, (kv_heads, 1, head_dim))
    k_cache, v_cache = write_kv(key_row, value_row)                        # (KVH, S, D) each

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
    return ops.add(x, mlp)


def decoder_shard(ops, hidden, position, kv_state, weight: Callable[[int, str], Any], tables: dict,
                  layers: range, is_exit: bool, config: ModelConfig, scales: np.ndarray,
                  seq_len: int, kv_write: str, final_norm=None):
    """A contiguous run of layers. hidden (1, 1, H); position (1,) int32 in [0, seq_len);
    kv_state: the shard's state, (2 * len(layers), KVH, S, D), K of local layer i at 2i,
    V at 2i + 1, updated through the ops (KV_WRITE = kv_write).
    Returns hidden (1, 1, H). The exit shard applies the final norm."""
    if kv_write not in KV_WRITERS:
        raise ValueError(f"kv_write={kv_write!r} is not one of {sorted(KV_WRITERS)}")
    hidden_size = config.hidden_size
    x = ops.reshape(hidden, (1, hidden_size))
    rows = step_rows(ops, tables, position, seq_len, config.head_dim, kv_write)
    ring = KV_WRITERS[kv_write](ops, kv_state, rows)
    for local, layer in enumerate(layers):
        ops.scope(f"layer{layer:02d}")
        x = decoder_layer(ops, x, lambda kind: weight(layer, kind),
                          lambda key_row, value_row: ring.layer(local, key_row, value_row),
                          rows, config, scales[layer])
    ops.scope("out")
    ring.finish()
    if is_exit:  # the final norm belongs to the exit shard only
        x = rmsnorm(ops, x, final_norm, config.rms_norm_eps, float(scales[config.num_hidden_layers, 0]))
    return ops.reshape(x, (1, 1, hidden_size))


def embed(ops, table, input_ids, hidden_size: int):
    """input_ids (1, 1) int32 -> hidden (1, 1, H)."""
    return ops.reshape(ops.gather_rows(table, ops.reshape(input_ids, (1,))), (1, 1, hidden_size))


def lm_head(ops, hidden, head_weight, hidden_size: int, vocab_size: int):
    """hidden (1, 1, H), already final-normed by the exit shard -> logits (1, V)."""
    return ops.linear(ops.reshape(hidden, (1, hidden_size)), head_weight)
