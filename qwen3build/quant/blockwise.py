"""Blockwise symmetric int4 / int8 weight-only quantization for the embedding and LM head.

OmniQuant-style learnable weight clipping, reduced to its closed-form core: each block
of `block_size` consecutive input (hidden) columns of a row gets one fp16 scale
    scale = clip_ratio * absmax(block) / qmax,   qmax = 2**(bits-1) - 1
and the clip ratio is picked per block from a small grid to minimize that block's
squared reconstruction error, measured with the fp16-rounded scale exactly as Core ML
dequantizes it (constexpr_blockwise_shift_scale: fp16(scale * data)).

Outlier rows are never clipped (DESIGN.md section 4: clipping the outlier rows of a
big-vocab head flipped 6/16 oracle top-1s). A row is an outlier row when its absmax
exceeds median + OUTLIER_MADS robust standard deviations (1.4826 * MAD) of all row
absmaxes; its blocks use plain absmax scales (clip ratio 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..settings.limits import BLOCKWISE_BITS as ALLOWED_BITS

DEFAULT_BLOCK_SIZE = 32
# Clip ratios tried per block; 1.0 (plain absmax) is always among the candidates.
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# A row is an outlier when its absmax is this many robust sigmas above the median.
OUTLIER_MADS = 6.0
# MAD -> standard deviation for normal data.
_MAD_TO_SIGMA = 1.4826
# Rows quantized per step: the float32 buffers stay ~8 MB for a 2048-wide head (cache-sized
# steps measured fastest: 1024 rows 4.0 s vs 4096 rows 4.9 s for 16k x 2048).
_ROWS_PER_STEP = 1024


@dataclass(frozen=True)
class BlockwisePack:
    """W[r, c] ~= data[r, c] * scale[r, c // block_size] (symmetric, no offset)."""

    data: np.ndarray  # int8 [rows, cols], in [-qmax, qmax] (int4 values when bits == 4)
    scale: np.ndarray  # float16 [rows, cols // block_size], > 0
    bits: int
    block_size: int

    def __post_init__(self):
        check_blockwise_pack(self, where="BlockwisePack")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def dequantize_fp16(self, rows: slice = slice(None)) -> np.ndarray:
        """The dense weight (or a slice of its rows) exactly as
        constexpr_blockwise_shift_scale produces it (fp16)."""
        scale = np.repeat(self.scale[rows].astype(np.float32), self.block_size, axis=1)  # (rows, cols)
        # |data| <= 127 and an fp16 scale: the product is exact in fp32, rounded once.
        return (self.data[rows].astype(np.float32) * scale).astype(np.float16)

    def mse(self, weight: np.ndarray) -> float:
        """Mean squared error of the dequantized weight against `weight`, in row steps (a
        151,936 x 2048 table needs no full-size fp32 temporaries)."""
        total = 0.0
        for start in range(0, self.shape[0], _ROWS_PER_STEP):
            rows = slice(start, start + _ROWS_PER_STEP)
            diff = self.dequantize_fp16(rows).astype(np.float32) - weight[rows]
            total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        return total / max(1, self.data.size)

    def dequantize(self) -> np.ndarray:
        return self.dequantize_fp16().astype(np.float32)


def qmax_for(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def check_blockwise_pack(pack: BlockwisePack, where: str) -> None:
    """Raise ValueError (one line, naming `where`) if the pack's arrays do not fit together."""
    if pack.bits not in ALLOWED_BITS:
        raise ValueError(f"{where}: bits={pack.bits} is not one of {ALLOWED_BITS}")
    if pack.block_size < 1:
        raise ValueError(f"{where}: block_size={pack.block_size} must be >= 1")
    if pack.data.ndim != 2 or pack.data.dtype != np.int8:
        raise ValueError(
            f"{where}: data must be int8 [rows, cols], got {pack.data.dtype} {list(pack.data.shape)}"
        )
    rows, cols = pack.data.shape
    if cols % pack.block_size:
        raise ValueError(f"{where}: cols={cols} is not a multiple of block_size={pack.block_size}")
    scale_shape = (rows, cols // pack.block_size)
    if pack.scale.dtype != np.float16 or pack.scale.shape != scale_shape:
        raise ValueError(
            f"{where}: scale must be float16 {list(scale_shape)}, got {pack.scale.dtype} "
            f"{list(pack.scale.shape)}"
        )
    if not np.all(np.isfinite(pack.scale)):
        raise ValueError(f"{where}: scale holds non-finite values")
    qmax = qmax_for(pack.bits)
    if pack.data.size and max(-int(pack.data.min()), int(pack.data.max())) > qmax:
        raise ValueError(f"{where}: data values outside [-{qmax}, {qmax}] for {pack.bits} bits")


def outlier_rows(weight: np.ndarray, num_mads: float = OUTLIER_MADS) -> np.ndarray:
    """Boolean [rows]: rows whose absmax is above median + num_mads * robust sigma."""
    row_absmax = np.concatenate([np.abs(weight[start:start + _ROWS_PER_STEP]).max(axis=1)  # (rows,), in steps
                                 for start in range(0, len(weight), _ROWS_PER_STEP)])
    median = np.median(row_absmax)
    robust_sigma = _MAD_TO_SIGMA * np.median(np.abs(row_absmax - median))
    if robust_sigma == 0:
        return row_absmax > median
    return row_absmax > median + num_mads * robust_sigma


def fit_blockwise(
    weight: np.ndarray,
    bits: int = 8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    protect_outlier_rows: bool = True,
) -> BlockwisePack:
    """Quantize `weight` [rows, cols] to symmetric int`bits` with per-block fp16 scales."""
    weight = np.asarray(weight)
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits} is not one of the allowed values {ALLOWED_BITS}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [rows, cols], got shape {list(weight.shape)}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    rows, cols = weight.shape
    if block_size < 1 or cols % block_size:
        raise ValueError(
            f"weight shape {list(weight.shape)}: cols={cols} is not a multiple of "
            f"block_size={block_size}"
        )
    clip_grid = tuple(float(r) for r in clip_grid)
    if not clip_grid or any(not 0 < r <= 1 for r in clip_grid):
        raise ValueError(f"clip_grid={clip_grid} must be non-empty ratios in (0, 1]")
    if 1.0 not in clip_grid:
        clip_grid = (1.0, *clip_grid)
    weight = weight.astype(np.float32, copy=False)
    if not all(np.isfinite(weight[start:start + _ROWS_PER_STEP]).all() for start in range(0, rows, _ROWS_PER_STEP)):
        raise ValueError(f"weight {list(weight.shape)} holds non-finite values")

    protected = outlier_rows(weight) if protect_outlier_rows else np.zeros(rows, bool)
    data = np.empty((rows, cols), np.int8)
    scale = np.empty((rows, cols // block_size), np.float16)
    for start in range(0, rows, _ROWS_PER_STEP):
        stop = min(start + _ROWS_PER_STEP, rows)
        data[start:stop], scale[start:stop] = _quantize_rows(
            weight[start:stop], bits, block_size, clip_grid, protected[start:stop]
        )
    return BlockwisePack(data=data, scale=scale, bits=bits, block_size=block_size)


def _quantize_rows(weight, bits, block_size, clip_grid, protected):
    rows, cols = weight.shape
    qmax = qmax_for(bits)
    blocks = weight.reshape(rows, cols // block_size, block_size)  # (rows, nblocks, block)
    absmax = np.abs(blocks).max(axis=2)  # (rows, nblocks)
    best_err = np.full(absmax.shape, np.inf, np.float32)
    best_scale = np.ones(absmax.shape, np.float16)
    # One set of buffers for every ratio (in-place ops: half the time of fresh temporaries).
    work, half = np.empty_like(blocks), np.empty(blocks.shape, np.float16)
    err = np.empty(absmax.shape, np.float32)
    for ratio in clip_grid:
        scale16 = _fp16_scale(absmax * np.float32(ratio) / qmax)
        scale32 = scale16.astype(np.float32)[:, :, None]
        np.divide(blocks, scale32, out=work)
        np.rint(work, out=work)
        np.clip(work, -qmax, qmax, out=work)
        np.multiply(work, scale32, out=work)
        half[...] = work                     # the reconstruction as Core ML rounds it (fp16)
        work[...] = half
        np.subtract(work, blocks, out=work)
        np.einsum("rbk,rbk->rb", work, work, out=err)  # (rows, nblocks) squared error
        if ratio != 1.0:
            err[protected] = np.inf  # outlier rows: plain absmax only
        better = err < best_err
        np.copyto(best_err, err, where=better)
        np.copyto(best_scale, scale16, where=better)
    scale32 = best_scale.astype(np.float32)[:, :, None]
    data = np.clip(np.rint(blocks / scale32), -qmax, qmax).astype(np.int8)
    return data.reshape(rows, cols), best_scale


def _fp16_scale(scale: np.ndarray) -> np.ndarray:
    """Round scales to fp16; an all-zero (or fp16-underflowing) block gets scale 1, data 0."""
    if np.any(scale > np.finfo(np.float16).max):
        raise ValueError("block absmax too large: its scale overflows fp16")
    scale16 = scale.astype(np.float16)
    scale16[scale16 == 0] = 1
    return scale16
