"""Weights as the recipe packs them (quant/provider.py), as torch modules whose forward
returns the dense fp16 tensor through coreai-torch's compression ops, so the saved
.aimodel stores the packed bytes (no dense copy) and the runtime dequantizes them to
exactly pack.dequantize_fp16() (tests/test_coreai.py checks it bit for bit):

- LutWeight:       torch.ops.coreai.lut_to_dense(indices, lut, 0), then, for a pack
                   with row scales, torch.ops.coreai.constexpr_blockwise_shift_scale(w,
                   scale). Stored [in, out] (indices transposed, the LUT grouped along
                   axis 1): see ops.InputMajor.
- BlockwiseTable:  torch.ops.coreai.constexpr_blockwise_shift_scale(data, scale,
                   input_dtype=int4/int8), [rows, cols] as packed (the embedding / head).
- DenseWeight:     an fp16 buffer (the fp16 recipe, or an unquantized matrix).

Packages compute in fp16 (ops.COMPUTE_DTYPE). For another dtype (fp32: the tests' check of
the lowering without fp16 rounding) every weight is a DenseWeight of its packed values
(as_array: dequantized, exact in fp32): casting an fp16 weight inside the graph is no
way to get them there, since Linux's runtime multiplies `x_fp32 @ cast(w_fp16)` at about
fp16 precision (1.4e-4 relative error on a 64 x 128 product, against 1.6e-7 for an fp32
constant).

coreai-torch's conventions (coreai_torch/_compression): lut_to_dense's LUT has rank
indices' rank + 2, [..groups.., 2**bits, VECTOR_SIZE=1]; the converter packs uint8
indices to the LUT's bit width only when the exported placeholders' names contain
"indices" and "lut" (hence the buffer names below, and no "lut" in any module name
above them); a blockwise data buffer's bit width is given by input_dtype (else it is
guessed from the value range).
"""
from __future__ import annotations

import numpy as np
import torch

from ...quant.blockwise import BlockwisePack
from ...quant.lut import LutPack
from ...quant.provider import as_array
from .ops import InputMajor

# Buffer names the converter's sub-byte injection looks for (see the module docstring).
INDICES_BUFFER = "indices"
LUT_BUFFER = "lut"
BLOCKWISE_INPUT_DTYPES = {4: torch.int4, 8: torch.int8}


def _buffer(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value))




class LutWeight(torch.nn.Module):
    """W^T [in, out] fp16 of a LutPack (grouped rows of W are grouped columns of W^T)."""

    def __init__(self, pack: LutPack):
        super().__init__()
        out_features, _ = pack.shape
        self.register_buffer(INDICES_BUFFER, _buffer(pack.indices.T))                   # (in, out) uint8
        self.register_buffer(LUT_BUFFER, _buffer(pack.lut.reshape(1, pack.num_groups, 1 << pack.bits, 1)))
        self.scaled = pack.row_scale is not None
        if self.scaled:
            self.register_buffer("scale", _buffer(pack.row_scale.reshape(1, out_features)))  # (1, out) fp16

    def forward(self) -> InputMajor:
        dense = torch.ops.coreai.lut_to_dense(self.indices, self.lut, 0)                # (in, out) fp16
        if self.scaled:  # fp16 x fp16, one rounding: LutPack.dequantize_fp16's order
            dense = torch.ops.coreai.constexpr_blockwise_shift_scale(dense, self.scale)
        return InputMajor(dense)


class DenseWeight(torch.nn.Module):
    """A dense weight in `dtype`; projections ([out, in] in the checkpoint) are stored [in, out]."""

    def __init__(self, value: np.ndarray, input_major: bool, dtype: torch.dtype = torch.float16):
        super().__init__()
        value = torch.from_numpy(np.ascontiguousarray(value.T if input_major else value)).to(dtype)
        self.input_major = input_major
        self.register_buffer("weight", value)

    def forward(self):
        return InputMajor(self.weight) if self.input_major else self.weight


class BlockwiseTable(torch.nn.Module):
    """[rows, cols] fp16 of a BlockwisePack: data int4 / int8, one fp16 scale per block."""

    def __init__(self, pack: BlockwisePack):
        super().__init__()
        self.register_buffer("data", _buffer(pack.data))                                # (rows, cols) int8
        self.register_buffer("scale", _buffer(pack.scale))                              # (rows, cols / block)
        self.input_dtype = BLOCKWISE_INPUT_DTYPES[pack.bits]

    def forward(self) -> torch.Tensor:
        return torch.ops.coreai.constexpr_blockwise_shift_scale(self.data, self.scale, input_dtype=self.input_dtype)


def projection_module(value, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """A projection weight (dense fp16 [out, in] or LutPack) as a module returning InputMajor."""
    if dtype != torch.float16:
        return DenseWeight(as_array(value), input_major=True, dtype=dtype)
    if isinstance(value, LutPack):
        return LutWeight(value)
    return DenseWeight(value, input_major=True)


def table_module(value, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """The embedding / head table (dense fp16 or BlockwisePack) as a module returning [V, H]."""
    if dtype != torch.float16:
        return DenseWeight(as_array(value), input_major=False, dtype=dtype)
    if isinstance(value, BlockwisePack):
        return BlockwiseTable(value)
    return DenseWeight(value, input_major=False)
