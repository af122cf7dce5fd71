"""Static RoPE, causal-mask and KV-write tables for the reversed ring KV layout.

Reversed ring: the token at position p is stored in KV slot S-1-p (S = SEQ_LEN), so the
active context 0..p always occupies the contiguous suffix of slots S-1-p .. S-1. A new
row is written by a masked blend, cache * (1 - w) + new * w, with w a one-hot row of the
write table; attention adds the matching row of the mask table. Rows are picked by
position with a gather, so the graph stays static (the ANE compiler needs that).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BuildError

# Largest finite fp16 negative. Adding a negative score may round it to -inf, which
# softmax maps to 0 just the same; the current slot is always unmasked, so no row is all -inf.
MASK_NEG = -65504.0


def ring_slot(position: int, seq_len: int) -> int:
    """KV slot of the token at `position` (0-based) in the reversed ring."""
    return (seq_len - 1 - position) % seq_len


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


def write_table(seq_len: int) -> np.ndarray:
    """(S, S) one-hot rows: row p has a 1 at slot S-1-p (the anti-diagonal)."""
    return np.fliplr(np.eye(seq_len, dtype=np.float32)).copy()


def mask_table(seq_len: int) -> np.ndarray:
    """(S, S): row p is 0 on the active suffix (slots >= S-1-p), MASK_NEG elsewhere."""
    slots = np.arange(seq_len)[None, :]
    first_active = (seq_len - 1 - np.arange(seq_len))[:, None]
    return np.where(slots >= first_active, 0.0, MASK_NEG).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ShardTables:
    cos: np.ndarray
    sin_signed: np.ndarray
    write: np.ndarray
    mask: np.ndarray


def shard_tables(seq_len: int, head_dim: int, theta: float) -> ShardTables:
    cos, sin_signed = rope_tables(seq_len, head_dim, theta)
    return ShardTables(cos, sin_signed, write_table(seq_len), mask_table(seq_len))


def fp16_array(value: np.ndarray, what: str) -> np.ndarray:
    """Cast to fp16, refusing values that do not fit (they would become inf on device)."""
    out = np.asarray(value, dtype=np.float32).astype(np.float16)
    if not np.all(np.isfinite(out)):
        raise BuildError(f"{what}: values beyond fp16 range (|x| > 65504); this checkpoint cannot be lowered to fp16")
    return out
