"""The re-authored Qwen3 decoder, written once: a decode step (one token) and a prefill
block (PREFILL_LEN tokens), over the same weights and the same KV state.

Every function here takes an `ops` backend (lower/torch/ops.py runs it eagerly in fp32
as the project's reference; lower/mil/ops.py emits it as MIL for the Core ML packages),
so the math of the deployed graph lives in this file only. Batch 1.

Deviations from the textbook layer, each for fp16 / the ANE:
- KV cache in the reversed ring layout (graph/tables.py), one state per shard holding
  every layer's K and V: (2L, KVH, S, D), K of local layer i at 2i, V at 2i + 1. The
  state is read once per call; how the new rows get in is KV_WRITE:
  "slice" (default) writes each K / V row (or a prefill block's T rows) at its ring
  slots with a slice_update, each followed by a state update (the in-place pattern
  coremltools 9 keeps as read_state -> slice_update -> write_state), so a write touches
  only the new rows;
  "blend" is the seed stack's masked blend for decode, cache*(1-w) + row*w with w a
  one-hot row over all S slots, and one write of the whole stacked state at the end.
  A prefill block always uses the slice write (docs/prefill.md: a block blend would
  rewrite the whole cache per layer for no gain).
  Either way attention reads the cache *after* the new rows are in it.
- RoPE rows and the causal mask are slices at the position of tables linear in S
  (one merged RoPE table, a (2S,) mask ramp): no S x S table, no gather.
- RMSNorm inputs carry a static SLaNC pre-scale (graph/slanc.py) so the fp16 sum of
  squares cannot overflow; eps is scaled by s^2 so the result is unchanged.
- q is scaled by 1/sqrt(head_dim) before the QK matmul, not after, to keep scores small.
- GQA without repeat_kv: queries are grouped (kv_heads, groups, head_dim) and attend to
  their shared KV head by a batched matmul.

Two activation layouts, one layer (`decoder_layer`):
- decode (TokenLayout): one token, (1, C), channels last: `linear` projections, as the
  decode packages have always been laid out.
- prefill (ChannelsFirst): T tokens, (C, T), channels first and the sequence last, the
  layout of Apple's ml-ane-transformers reference (Principle 1: the ANE's native layout
  is (B, C, 1, S); its last axis is padded to 64 bytes, so the sequence belongs there,
  not a one-token axis, and channels-first needs no transposes between projections).
  Projections are `W @ x` (the same (out, in) weight constants as decode, so the two
  functions share them), attention scores are (KVH, S, G*T): keys on the channel axis,
  queries last, softmax over the keys (Apple's (1, key, 1, query) mask layout).
  docs/prefill.md says why.

A shard's `position` must lie in [0, SEQ_LEN), and a prefill block's positions
position .. position+T-1 too: the slices above are not checked on device (the host stops
at capacity and never feeds a block past it, runtime/generate.py; the reference refuses).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ..settings.model_config import ModelConfig

# fp16's smallest subnormal: eps * s^2 below it would flush to 0 and let rsqrt(0) blow up.
FP16_TINY = 2.0 ** -24

# Entry points of the lowered packages, by function name (docs/prefill.md). A shard holds
# DECODE (one token per call, the default function) and, with PREFILL_LEN > 0, PREFILL
# (PREFILL_LEN tokens per call); the io_model holds EMBED and LM_HEAD (one token) and,
# with PREFILL_LEN > 0, EMBED_PREFILL and LM_HEAD_PREFILL (PREFILL_LEN tokens).
DECODE, PREFILL = "decode", "prefill"
EMBED, LM_HEAD, EMBED_PREFILL, LM_HEAD_PREFILL = "embed", "lm_head", "embed_prefill", "lm_head_prefill"

# The id a partial prefill block's unused columns carry. Any id works: no real position
# attends to them (they come after every real one), and their K / V rows land at the ring
# slots of positions not reached yet, which decode (or the next block) overwrites before
# any query reads them.
PREFILL_PAD_ID = 0


def shard_functions(prefill_len: int) -> tuple[str, ...]:
    """A shard package's functions, the default (decode) first."""
    return (DECODE, PREFILL) if prefill_len else (DECODE,)


def io_functions(prefill_len: int) -> tuple[str, ...]:
    """The io_model's functions, the default (embed) first."""
    return (EMBED, LM_HEAD, EMBED_PREFILL, LM_HEAD_PREFILL) if prefill_len else (EMBED, LM_HEAD)


def rmsnorm(ops, x, weight, eps: float, prescale: float, axis: int = -1):
    """RMSNorm over `axis` (the channel axis) with a static SLaNC pre-scale (exactly
    scale-invariant); `weight` broadcasts along that axis."""
    if prescale != 1.0:
        x = ops.mul(x, prescale)
    squares = ops.mul(x, x)
    mean_square = ops.mean_last(squares) if axis == -1 else ops.mean_axis(squares, axis)
    inv_rms = ops.rsqrt(ops.add(mean_square, max(eps * prescale * prescale, FP16_TINY)))
    return ops.mul(ops.mul(x, inv_rms), weight)


def apply_rope(ops, x, cos_row, sin_signed_row, head_dim: int, axis: int = -1):
    """x (heads, D) -> x*cos + [x2, x1]*sin_signed (== HF's x*cos + rotate_half(x)*sin);
    with axis=-2, x (heads, D, T) and cos / sin_signed (D, T)."""
    half = head_dim // 2
    if axis == -1:
        swapped = ops.concat([ops.slice_last(x, half, head_dim), ops.slice_last(x, 0, half)], axis=-1)
    else:
        swapped = ops.concat([ops.slice_axis(x, axis, half, head_dim), ops.slice_axis(x, axis, 0, half)], axis=axis)
    return ops.add(ops.mul(x, cos_row), ops.mul(swapped, sin_signed_row))


@dataclasses.dataclass
class StepRows:
    """Per-position rows, sliced once per shard call."""
    cos: Any           # (1, D); prefill: (D, T)
    sin_signed: Any    # (1, D); prefill: (D, T)
    mask: Any          # (1, 1, S) additive causal mask; prefill: (S, 1, T)
    slot: Any = None   # (1,) int32 first ring slot written: S-1-p (decode), S-p-T (prefill)   (slice writes)
    write: Any = None  # (1, S, 1) one-hot at the ring slot of this position (KV_WRITE=blend)
    keep: Any = None   # (1, S, 1) = 1 - write                              (KV_WRITE=blend)
    count: int = 1     # rows written per K / V write (T for a prefill block)


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


def sliding_rows(ops, vector, rows: int, width: int):
    """(rows, width) with out[t, s] = vector[t + s], from `vector` of rows + width - 1 entries,
    without a gather or a table: rows + 1 copies of the vector laid end to end and read as
    rows of length L + 1 (L = the vector's length) start each row one entry further on,
    since t * (L + 1) + s = t + s (mod L) and t + s < L."""
    length = rows + width - 1
    tiled = ops.concat([vector] * (rows + 1), axis=0)                        # ((rows+1)*L,)
    flat = ops.slice_axis(tiled, 0, 0, rows * (length + 1))                  # (rows*(L+1),)
    grid = ops.reshape(flat, (rows, length + 1))                             # row t = vector[t:] ...
    return ops.slice_axis(grid, 1, 0, width)                                 # (rows, width)


def block_rows(ops, tables: dict, position, seq_len: int, head_dim: int, tokens: int) -> StepRows:
    """Rows of a prefill block at positions p .. p+T-1 (position (1,) int32 = p, p+T <= S).

    RoPE: rows p .. p+T-1 of the (S, 2D) table, channels-first (D, T) each. Mask: query
    t (position p+t) sees slots s >= S-1-(p+t), i.e. mask[t, s] = ramp[p+t+s]: the causal
    mask inside the block and the context before it, from the decode's (2S,) ramp (its
    slice [p, p+S+T-1) stays inside the ramp because p <= S-T), laid out (S, 1, T) for
    scores (KVH, S, G, T). The block's rows go to slots S-p-T .. S-p-1."""
    rope = ops.transpose(ops.slice_rows(tables["rope"], position, tokens), (1, 0))   # (2D, T)
    window = ops.slice_rows(tables["mask_ramp"], position, seq_len + tokens - 1)    # (S+T-1,) ramp[p : p+S+T-1]
    mask = ops.transpose(sliding_rows(ops, window, tokens, seq_len), (1, 0))        # (S, T)
    return StepRows(cos=ops.slice_axis(rope, 0, 0, head_dim), sin_signed=ops.slice_axis(rope, 0, head_dim, 2 * head_dim),
                    mask=ops.reshape(mask, (seq_len, 1, tokens)),                   # (S, 1, T)
                    slot=ops.index_rsub(seq_len - tokens, position), count=tokens)  # (1,) int32 S-T-p


class SliceWrite:
    """KV_WRITE=slice, and every prefill block: each layer's K rows, then its V rows, go to
    their ring slots with one slice_update each, and every write is stored in the state at
    once; the layer's caches are read back from the value the write returned (so they hold
    the new rows)."""

    def __init__(self, ops, state, rows: StepRows):
        self.ops, self.state, self.slot, self.count = ops, state, rows.slot, rows.count
        self.kv = ops.read_state(state)                                      # (2L, KVH, S, D), read once

    def layer(self, local: int, key_rows, value_rows):
        """key_rows / value_rows (KVH, n, D) of local layer `local`, in slot order (newest
        position first) -> its caches (KVH, S, D) each."""
        ops = self.ops
        if self.count == 1:
            self.kv = ops.write_state_row(self.state, self.kv, 2 * local, self.slot, key_rows)
            self.kv = ops.write_state_row(self.state, self.kv, 2 * local + 1, self.slot, value_rows)
        else:
            self.kv = ops.write_state_rows(self.state, self.kv, 2 * local, self.slot, key_rows, self.count)
            self.kv = ops.write_state_rows(self.state, self.kv, 2 * local + 1, self.slot, value_rows, self.count)
        return ops.index_first(self.kv, 2 * local), ops.index_first(self.kv, 2 * local + 1)

    def finish(self) -> None:
        pass  # every row write already updated the state


class BlendWrite:
    """KV_WRITE=blend (the seed stack's write, decode only): every layer's caches are rebuilt
    as cache*(1-w) + row*w over all S slots, and the stacked (2L, KVH, S, D) result is
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


class TokenLayout:
    """decode: one token, activations (1, C) with channels last."""

    channel_axis = -1

    def __init__(self, config: ModelConfig):
        self.config = config

    def activations(self, ops, hidden):
        return ops.reshape(hidden, (1, self.config.hidden_size))              # (1, 1, H) -> (1, H)

    def output(self, ops, x):
        return ops.reshape(x, (1, 1, self.config.hidden_size))               # (1, H) -> (1, 1, H)

    def project(self, ops, x, weight):
        return ops.linear(x, weight)                                          # (1, I) -> (1, O)

    def heads(self, ops, x, count: int):
        return ops.reshape(x, (count, self.config.head_dim))                  # (1, n*D) -> (n, D)

    def norm_weight(self, ops, weight):
        return weight                                                         # (C,), the last axis

    def kv_rows(self, ops, x, count: int):
        return ops.reshape(x, (count, 1, self.config.head_dim))               # (KVH, D) -> (KVH, 1, D)

    def attend(self, ops, query, k_cache, v_cache, mask):
        """query (Hq, D), caches (KVH, S, D), mask (1, 1, S) -> (1, Hq*D)."""
        c = self.config
        kv_heads, groups = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        query = ops.reshape(query, (kv_heads, groups, c.head_dim))            # (KVH, G, D)
        scores = ops.add(ops.matmul(query, k_cache, transpose_y=True), mask)  # (KVH, G, S)
        probs = ops.softmax_last(scores)
        return ops.reshape(ops.matmul(probs, v_cache), (1, c.num_attention_heads * c.head_dim))  # (1, Hq*D)


class ChannelsFirst:
    """prefill: T tokens, activations (C, T) with channels first and the sequence last (the
    packages' interface is (1, C, 1, T), the ANE's (B, C, 1, S))."""

    channel_axis = -2

    def __init__(self, config: ModelConfig, tokens: int, seq_len: int):
        self.config, self.tokens, self.seq_len = config, tokens, seq_len

    def activations(self, ops, hidden):
        return ops.reshape(hidden, (self.config.hidden_size, self.tokens))   # (1, H, 1, T) -> (H, T)

    def output(self, ops, x):
        return ops.reshape(x, (1, self.config.hidden_size, 1, self.tokens))  # (H, T) -> (1, H, 1, T)

    def project(self, ops, x, weight):
        return ops.linear_channels(x, weight)                                 # (O, I) @ (I, T) -> (O, T)

    def heads(self, ops, x, count: int):
        return ops.reshape(x, (count, self.config.head_dim, self.tokens))    # (n*D, T) -> (n, D, T)

    def norm_weight(self, ops, weight):
        return ops.reshape(weight, (-1, 1))                                   # (C,) -> (C, 1): along axis -2

    def kv_rows(self, ops, x, count: int):
        """(KVH, D, T) -> (KVH, T, D) in ring-slot order: the newest position first."""
        return ops.reverse(ops.transpose(x, (0, 2, 1)), axis=1)

    def attend(self, ops, query, k_cache, v_cache, mask):
        """query (Hq, D, T), caches (KVH, S, D), mask (S, 1, T) -> (Hq*D, T)."""
        c, tokens, seq_len = self.config, self.tokens, self.seq_len
        kv_heads, groups, head_dim = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
        query = ops.reshape(query, (kv_heads, groups, head_dim, tokens))      # (KVH, G, D, T)
        query = ops.reshape(ops.transpose(query, (0, 2, 1, 3)), (kv_heads, head_dim, groups * tokens))  # (KVH, D, G*T)
        scores = ops.reshape(ops.matmul(k_cache, query), (kv_heads, seq_len, groups, tokens))  # (KVH, S, G, T)
        probs = ops.softmax(ops.add(scores, mask), axis=1)                   # over the keys
        probs = ops.reshape(probs, (kv_heads, seq_len, groups * tokens))      # (KVH, S, G*T)
        attn = ops.matmul(v_cache, probs, transpose_x=True)                   # (KVH, D, G*T)
        attn = ops.transpose(ops.reshape(attn, (kv_heads, head_dim, groups, tokens)), (0, 2, 1, 3))  # (KVH, G, D, T)
        return ops.reshape(attn, (c.num_attention_heads * head_dim, tokens))  # (Hq*D, T)


def decoder_layer(ops, x, w: Callable[[str], Any], write_kv: Callable[[Any, Any], tuple], rows: StepRows,
                  config: ModelConfig, scales: np.ndarray, layout=None):
    """One Qwen3 layer, for one token (TokenLayout, the default) or a prefill block
    (ChannelsFirst).

    x (1, H) [prefill (H, T)]; write_kv(key_rows, value_rows) stores the new K / V rows
    (KVH, n, D) in the ring and returns the layer's caches (KVH, S, D) with them in;
    scales = this layer's SLaNC row (input_norm, q_norm, k_norm, post_norm). Returns x.
    """
    layout = layout or TokenLayout(config)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps, axis = config.rms_norm_eps, layout.channel_axis
    s_in, s_q, s_k, s_post = (float(v) for v in scales)
    norm = lambda value, kind, prescale: rmsnorm(ops, value, layout.norm_weight(ops, w(kind)), eps, prescale, axis)  # noqa: E731

    h = norm(x, "input_norm", s_in)                                          # (1, H)
    query = layout.heads(ops, layout.project(ops, h, w("q_proj")), heads)    # (Hq, D)
    key = layout.heads(ops, layout.project(ops, h, w("k_proj")), kv_heads)   # (KVH, D)
    value = layout.heads(ops, layout.project(ops, h, w("v_proj")), kv_heads)  # (KVH, D)
    query = norm(query, "q_norm", s_q)  # QK-norm: per head, before RoPE
    key = norm(key, "k_norm", s_k)
    query = apply_rope(ops, query, rows.cos, rows.sin_signed, head_dim, axis)
    key = apply_rope(ops, key, rows.cos, rows.sin_signed, head_dim, axis)

    k_cache, v_cache = write_kv(layout.kv_rows(ops, key, kv_heads), layout.kv_rows(ops, value, kv_heads))  # (KVH, S, D)

    query = ops.mul(query, 1.0 / math.sqrt(head_dim))
    attn = layout.attend(ops, query, k_cache, v_cache, rows.mask)           # (1, Hq*D)
    x = ops.add(x, layout.project(ops, attn, w("o_proj")))

    h = norm(x, "post_norm", s_post)
    gate = ops.silu(layout.project(ops, h, w("gate_proj")))                  # (1, I)
    mlp = layout.project(ops, ops.mul(gate, layout.project(ops, h, w("up_proj"))), w("down_proj"))
    return ops.add(x, mlp)


def _layers(ops, x, rows, ring, weight, layers: range, is_exit: bool, config: ModelConfig, scales: np.ndarray,
            final_norm, layout):
    for local, layer in enumerate(layers):
        ops.scope(f"layer{layer:02d}")
        x = decoder_layer(ops, x, lambda kind: weight(layer, kind),
                          lambda key_rows, value_rows: ring.layer(local, key_rows, value_rows),
                          rows, config, scales[layer], layout)
    ops.scope("out")
    ring.finish()
    if is_exit:  # the final norm belongs to the exit shard only
        x = rmsnorm(ops, x, layout.norm_weight(ops, final_norm), config.rms_norm_eps,
                    float(scales[config.num_hidden_layers, 0]), layout.channel_axis)
    return x


def decoder_shard(ops, hidden, position, kv_state, weight: Callable[[int, str], Any], tables: dict,
                  layers: range, is_exit: bool, config: ModelConfig, scales: np.ndarray,
                  seq_len: int, kv_write: str, final_norm=None):
    """The decode step of a contiguous run of layers. hidden (1, 1, H); position (1,) int32
    in [0, seq_len); kv_state: the shard's state, (2 * len(layers), KVH, S, D), K of local
    layer i at 2i, V at 2i + 1, updated through the ops (KV_WRITE = kv_write).
    Returns hidden (1, 1, H). The exit shard applies the final norm."""
    if kv_write not in KV_WRITERS:
        raise ValueError(f"kv_write={kv_write!r} is not one of {sorted(KV_WRITERS)}")
    layout = TokenLayout(config)
    x = layout.activations(ops, hidden)
    rows = step_rows(ops, tables, position, seq_len, config.head_dim, kv_write)
    ring = KV_WRITERS[kv_write](ops, kv_state, rows)
    x = _layers(ops, x, rows, ring, weight, layers, is_exit, config, scales, final_norm, layout)
    return layout.output(ops, x)


def decoder_block(ops, hidden, position, kv_state, weight: Callable[[int, str], Any], tables: dict,
                  layers: range, is_exit: bool, config: ModelConfig, scales: np.ndarray,
                  seq_len: int, tokens: int, final_norm=None):
    """The prefill block of a contiguous run of layers: T = `tokens` positions
    p .. p+T-1 at once. hidden (1, H, 1, T) channels-first, column t = position p+t;
    position (1,) int32 = p with p + T <= seq_len; kv_state as for decoder_shard (the same
    state: the block's rows land at slots S-p-T .. S-p-1 with one slice_update per layer
    for K and one for V, whatever KV_WRITE is). Causal inside the block: column t attends
    to positions <= p+t. Returns hidden (1, H, 1, T)."""
    if not 1 <= tokens <= seq_len:
        raise ValueError(f"a prefill block of {tokens} tokens does not fit a ring of {seq_len} slots")
    layout = ChannelsFirst(config, tokens, seq_len)
    x = layout.activations(ops, hidden)
    rows = block_rows(ops, tables, position, seq_len, config.head_dim, tokens)
    ring = SliceWrite(ops, kv_state, rows)
    x = _layers(ops, x, rows, ring, weight, layers, is_exit, config, scales, final_norm, layout)
    return layout.output(ops, x)


def embed(ops, table, input_ids, hidden_size: int):
    """input_ids (1, 1) int32 -> hidden (1, 1, H)."""
    return ops.reshape(ops.gather_rows(table, ops.reshape(input_ids, (1,))), (1, 1, hidden_size))


def lm_head(ops, hidden, head_weight, hidden_size: int, vocab_size: int):
    """hidden (1, 1, H), already final-normed by the exit shard -> logits (1, V)."""
    return ops.linear(ops.reshape(hidden, (1, hidden_size)), head_weight)


def embed_block(ops, table, input_ids, hidden_size: int, tokens: int):
    """input_ids (1, T) int32 -> hidden (1, H, 1, T), channels-first (the prefill layout)."""
    rows = ops.gather_rows(table, ops.reshape(input_ids, (tokens,)))         # (T, H)
    return ops.reshape(ops.transpose(rows, (1, 0)), (1, hidden_size, 1, tokens))


def lm_head_block(ops, hidden, head_weight, hidden_size: int, vocab_size: int, tokens: int):
    """hidden (1, H, 1, T) of a prefill block, final-normed -> logits (1, T, V), a row per position."""
    rows = ops.transpose(ops.reshape(hidden, (hidden_size, tokens)), (1, 0))  # (T, H)
    return ops.reshape(ops.matmul(rows, head_weight, transpose_y=True), (1, tokens, vocab_size))
