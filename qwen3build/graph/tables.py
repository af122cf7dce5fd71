"""Static RoPE and causal-mask constants for the reversed ring KV layout, all linear in S.

Reversed ring: the token at position p is stored in KV slot S-1-p (S = SEQ_LEN), so the
active context 0..p always occupies the contiguous suffix of slots S-1-p .. S-1. A
shard's position must lie in [0, S): the host stops at capacity (runtime/generate.py)
and the reference refuses a position outside it.

Per-position rows come from one slice at the position, never from an S x S table (at
MAX_SEQ_LEN = 32768 such a table would hold 2 GiB in fp16):
- RoPE: row p of one merged (S, 2D) table [cos | sin_signed].
- Causal mask: a (2S,) ramp, MASK_NEG for indices < S-1 and 0 from S-1 on. Its slice
  [p, p+S) is 0 exactly at slots s >= S-1-p (the active suffix) and MASK_NEG elsewhere.
- KV_WRITE=blend's one-hot write row: a (2S,) ramp with a single 1 at index S-1. Its
  slice [p, p+S) is 1 exactly at slot S-1-p. (KV_WRITE=slice needs no table: it writes
  the row at slot S-1-p with slice_update.)
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BuildError

# Additive causal mask for slots outside the context. Apple's ANE guidance (-40000, not
# -inf) keeps score + MASK_NEG finite in fp16 for every score above -25504 (the old
# -65504, fp16's most negative finite value, overflowed to -inf for any negative score),
# while exp(score + MASK_NEG - max) still underflows to exactly 0 in fp16 and fp32 (below
# -104) unless a masked score exceeds the row's max by ~39900. QK-normed, 1/sqrt(D)-scaled
# scores are orders of magnitude inside both bounds. Exact in fp16 (a multiple of 32).
MASK_NEG = -40000.0


def ring_slot(position: int, seq_len: int) -> int:
    """KV slot of the token at `position`, 0 <= position < seq_len, in the reversed ring."""
    if not 0 <= position < seq_len:
        raise ValueError(f"position {position} is outside the ring's capacity 0..{seq_len - 1}")
    return seq_len - 1 - position


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin, each (seq_len, head_dim), float32.

    HF Qwen3 applies q*cos + rotate_half(q)*sin with rotate_half(q) = [-q2, q1]. We fold
    the sign into the table: q*cos + [q2, q1]*sin_signed, sin_signed = [-sin, sin], so the
    graph needs a swap of halves and no negation.
    """
    # float64 here, like HF's fp32 inv_freq but without its rounding of positions.
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim))
    inv_freq = inv_freq.astype(np.float32).astype(np.float64)  # match HF's fp32 inv_freq
    freqs = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)  # (S, D/2)
    cos = np.cos(freqs)
    sin = np.sin(freqs)
    cos_table = np.concatenate([cos, cos], axis=1)          # (S, D)
    sin_signed = np.concatenate([-sin, sin], axis=1)        # (S, D)
    return cos_table.astype(np.float32), sin_signed.astype(np.float32)


def rope_table(seq_len: int, head_dim: int, theta: float) -> np.ndarray:
    """(S, 2D) float32: row p is [cos_p | sin_signed_p], read with one slice per shard call."""
    cos, sin_signed = rope_tables(seq_len, head_dim, theta)
    return np.concatenate([cos, sin_signed], axis=1)        # (S, 2D)


def mask_ramp(seq_len: int) -> np.ndarray:
    """(2S,) float32: [MASK_NEG] * (S-1) + [0] * (S+1); ramp[p:p+S] is position p's mask row."""
    ramp = np.zeros(2 * seq_len, np.float32)
    ramp[: seq_len - 1] = MASK_NEG
    return ramp


def write_ramp(seq_len: int) -> np.ndarray:
    """(2S,) float32 with one 1 at index S-1; ramp[p:p+S] is one-hot at slot S-1-p (KV_WRITE=blend)."""
    ramp = np.zeros(2 * seq_len, np.float32)
    ramp[seq_len - 1] = 1.0
    return ramp


@dataclasses.dataclass(frozen=True)
class ShardTables:
    rope: np.ndarray               # (S, 2D) [cos | sin_signed]
    mask_ramp: np.ndarray          # (2S,)
    write_ramp: np.ndarray | None  # (2S,) for KV_WRITE=blend, None for slice


def shard_tables(seq_len: int, head_dim: int, theta: float, kv_write: str) -> ShardTables:
    return ShardTables(rope=rope_table(seq_len, head_dim, theta), mask_ramp=mask_ramp(seq_len),
                       write_ramp=write_ramp(seq_len) if kv_write == "blend" else None)


def fp16_array(value: np.ndarray, what: str) -> np.ndarray:
    """Cast to fp16, refusing values that do not fit (they would become inf on device)."""
    out = np.asarray(value, dtype=np.float32).astype(np.float16)
    if not np.all(np.isfinite(out)):
        raise BuildError(f"{what}: values beyond fp16 range (|x| > 65504); this checkpoint cannot be lowered to fp16")
    return out
