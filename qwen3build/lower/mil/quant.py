"""Emit quantized weights as iOS18 constexpr ops inside an `mb.program` / Builder context.

Each emitter returns a MIL var holding the dense fp16 tensor, built only from constexpr
ops, so the saved .mlpackage stores the compressed bytes and no dense copy. Every stored
array is a `shared_const` (weight_id = its name), so the functions of one package that
emit the same weight (decode and prefill) store it once:

- lut_weight:        constexpr_lut_to_dense (per-grouped-channel LUT, sub-byte indices),
                     then constexpr_blockwise_shift_scale with scale [out, 1] when the pack
                     has per-row scales (the same chain coremltools' palettizer emits for
                     enable_per_channel_scale).
- blockwise_weight:  constexpr_blockwise_shift_scale with int4 / int8 data.
- palettized_table:  a constant table with few distinct values (mask, one-hot rows) as a
                     per-tensor constexpr_lut_to_dense with the smallest index width.

iOS18 conventions used here (coremltools 9 `mil/ops/defs/iOS18/compression.py`):
indices / data carry their bit width in the numpy dtype's metadata
(types.np_uint4_dtype, types.np_int4_dtype, ...), and the LUT's rank is the indices'
rank + 2: [groups, 1, 2**bits, 1] for rows grouped along axis 0 (the trailing 1 is
VECTOR_SIZE: scalar palettization).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from ...quant.blockwise import BlockwisePack
from ...quant.lut import LutPack

# Index widths a constant table may use: byte-aligned packings only.
TABLE_BITS = (1, 2, 4, 8)


def shared_const(value: np.ndarray, name: str):
    """A const whose blob is written once per package, whichever functions use it: its
    `weight_id` is its name (coremltools' backend keys blobs by weight_id, so every
    function that emits a const of this name points at the same bytes)."""
    var = mb.const(val=value, name=name)
    var.op.weight_id = name
    return var


def _sub_byte_dtype(signed: bool, bits: int) -> np.dtype:
    """numpy dtype whose metadata tells coremltools the element bit width (uint4, int4, ...)."""
    name = f"{'int' if signed else 'uint'}{bits}"
    return types.nptype_from_builtin(types.string_to_builtin(name))


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """A weight's arrays exactly as the package stores them (sub-byte dtypes, MIL shapes),
    made once: every function that emits the weight (decode and prefill) hands the same
    arrays to its consts, so building a second function copies nothing (mb.const keeps the
    array it is given)."""

    kind: str          # "dense", "lut", "lut_row_scale" or "blockwise"
    arrays: dict       # name suffix -> array


def stored_weight(value) -> StoredWeight:
    """The arrays of a weight as the recipe packs it (dense fp16 array, LutPack or BlockwisePack)."""
    if isinstance(value, StoredWeight):
        return value
    if isinstance(value, LutPack):
        out_features, _ = value.shape
        indices = value.indices.astype(_sub_byte_dtype(False, value.bits))  # (out, in) uintN
        lut = value.lut.reshape(value.num_groups, 1, 1 << value.bits, 1)    # (G, 1, 2**bits, 1) fp16
        if value.row_scale is None:
            return StoredWeight("lut", {"indices": indices, "lut": lut})
        return StoredWeight("lut_row_scale", {
            "indices": indices,
            "row_lut": np.repeat(lut, value.group_size, axis=0),              # (out, 1, 2**bits, 1): a LUT per row
            "row_scale": value.row_scale.reshape(out_features, 1, 1, 1)})     # (out, 1, 1, 1)
    if isinstance(value, BlockwisePack):
        return StoredWeight("blockwise", {"data": value.data.astype(_sub_byte_dtype(True, value.bits)),  # int4 / int8
                                          "scale": value.scale})
    return StoredWeight("dense", {"value": np.asarray(value, np.float16)})


def mil_weight(value, name: str):
    """A weight (dense fp16 array, LutPack, BlockwisePack, or their StoredWeight) as a var."""
    stored = stored_weight(value)
    if stored.kind in ("lut", "lut_row_scale"):
        return lut_weight(stored, name)
    if stored.kind == "blockwise":
        return blockwise_weight(stored, name)
    return shared_const(stored.arrays["value"], name)


def lut_weight(pack: LutPack | StoredWeight, name: str):
    """Dense fp16 [out, in] var of a grouped-LUT pack, as constexpr ops only.

    Without row scales: one constexpr_lut_to_dense with LUT [groups, 1, 2**bits, 1].
    With row scales: the LUT is scaled first, then looked up (iOS18 order, see
    LUT_SCALE_ORDER_NOTE): constexpr_blockwise_shift_scale(data=LUT repeated per row
    [out, 1, 2**bits, 1], scale [out, 1, 1, 1]) -> constexpr_lut_to_dense.
    """
    arrays = stored_weight(pack).arrays
    indices = shared_const(arrays["indices"], f"{name}_indices")
    if "lut" in arrays:
        return mb.constexpr_lut_to_dense(indices=indices, lut=shared_const(arrays["lut"], f"{name}_lut"), name=name)
    scaled_lut = mb.constexpr_blockwise_shift_scale(
        data=shared_const(arrays["row_lut"], f"{name}_row_lut"),
        scale=shared_const(arrays["row_scale"], f"{name}_row_scale"), name=f"{name}_scaled_lut"
    )
    return mb.constexpr_lut_to_dense(indices=indices, lut=scaled_lut, name=name)


# iOS18 Core ML wants "dequantize, then depalettize": coremltools' default pipeline
# (common::canonicalize_quantized_lut_pattern, fixed only from iOS26) rewrites
# lut_to_dense -> shift_scale into shift_scale(LUT repeated per row) -> lut_to_dense.
# We emit that form directly so the saved program is the one built here. Cost: the LUT
# is stored once per row, out * 2**bits * 2 bytes (6144 x 2048 at 8 bits: +3 MB, +25%).
LUT_SCALE_ORDER_NOTE = "shift_scale(lut) -> lut_to_dense on iOS18"


def blockwise_weight(pack: BlockwisePack | StoredWeight, name: str):
    """Dense fp16 [rows, cols] var of a blockwise int4/int8 pack, as one constexpr op."""
    arrays = stored_weight(pack).arrays
    return mb.constexpr_blockwise_shift_scale(data=shared_const(arrays["data"], f"{name}_data"),
                                              scale=shared_const(arrays["scale"], f"{name}_scale"), name=name)


def table_bits(num_distinct: int) -> int:
    """Smallest index width in TABLE_BITS holding num_distinct values."""
    for bits in TABLE_BITS:
        if num_distinct <= 1 << bits:
            return bits
    raise ValueError(
        f"a palettized table holds at most {1 << TABLE_BITS[-1]} distinct values, got "
        f"{num_distinct}; emit it as a dense const instead"
    )


def palettize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(indices uint8 [table.shape], lut fp16 [2**bits], bits) that reproduce `table` in fp16."""
    table16 = np.asarray(table).astype(np.float16) + np.float16(0)  # -0.0 -> +0.0
    if not np.all(np.isfinite(table16)):
        raise ValueError("table holds values that are not finite in fp16")
    # Distinct values through a histogram of the 65,536 fp16 bit patterns: O(n), no sort
    # (a 4096 x 4096 mask is 16M entries).
    patterns = table16.view(np.uint16)
    present = np.flatnonzero(np.bincount(patterns.reshape(-1), minlength=1 << 16))
    distinct = present.astype(np.uint16).view(np.float16)
    order = np.argsort(distinct)
    bits = table_bits(distinct.size)
    lut = np.full(1 << bits, distinct[order[-1]], np.float16)  # unused entries repeat the last
    lut[: distinct.size] = distinct[order]
    entry_of_pattern = np.zeros(1 << 16, np.uint8)
    entry_of_pattern[present[order]] = np.arange(distinct.size)
    return entry_of_pattern[patterns], lut, bits


def packed_table_bytes(shape: tuple[int, ...], bits: int) -> int:
    """Bytes of the indices (packed to `bits`) plus the fp16 LUT."""
    return -(-int(np.prod(shape)) * bits // 8) + (1 << bits) * 2


def palettized_table(table: np.ndarray, name: str):
    """Emit a few-valued constant table; returns (fp16 var, bytes saved vs a dense fp16 const)."""
    indices, lut, bits = palettize_table(table)
    rank = indices.ndim
    lut = lut.reshape((1,) * rank + (1 << bits, 1))  # per-tensor LUT: rank + 2
    var = mb.constexpr_lut_to_dense(
        indices=shared_const(indices.astype(_sub_byte_dtype(False, bits)), f"{name}_indices"),
        lut=shared_const(lut, f"{name}_lut"), name=name
    )
    saved = indices.size * 2 - packed_table_bytes(indices.shape, bits)
    return var, saved


def constexpr_value(var) -> np.ndarray:
    """Numpy value of a var produced by const / constexpr ops (recursing through chains).

    coremltools' own materialized_val_inference does not follow a constexpr input of a
    constexpr_lut_to_dense (the loaded iOS18 per-row-scale chain), hence this walker.
    """
    if var.val is not None:
        return var.val
    op = var.op
    if op.op_type == "constexpr_lut_to_dense":
        vector_axis = None if op.vector_axis is None else op.vector_axis.val
        return op.decompress(constexpr_value(op.indices), constexpr_value(op.lut), vector_axis)
    if op.op_type == "constexpr_blockwise_shift_scale":
        offset = None if op.offset is None else constexpr_value(op.offset)
        return op.decompress(constexpr_value(op.data), constexpr_value(op.scale), offset)
    raise ValueError(f"{var.name}: cannot evaluate op type {op.op_type} as a constant")
