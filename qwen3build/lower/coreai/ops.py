"""TorchOps for torch.export -> Core AI: the same math as lower/torch/ops.py, in a form the
exporter traces and coreai-torch converts well.

What differs from TorchOps, and why:
- dtype fp16 (COMPUTE_DTYPE): the Core ML packages hold fp16 weights, state and
  activations and compute in fp16; Core AI has no precision switch, a program computes in
  its tensors' dtypes, so an fp16 module is what the deployed package must be.
- Projection weights may come stored [in, out] (InputMajor): the Linux runtime does not
  fold constant transposes, so `x @ W.T` would transpose W on every call (4x slower for a
  256 -> 768 linear, docs/coreai.md). The transpose is done once, at build time, on the packs.
- Runtime positions (the RoPE / mask rows and the ring slot) are read with .item() under
  torch._check bounds, and rows are sliced at them: the converter emits a slice /
  slice_update with a runtime begin, no gather and no S x S table. A row write (or a
  prefill block's T rows) is a 4-D slice of the state, kv[i:i+1, :, s:s+T, :] = rows: a
  first-axis `kv[i] = ...` would be functionalized into a where over the whole state per
  write (docs/coreai.md).
- Gathers take int32 indices (index_select): Core AI has no 64-bit types.
The eager module runs these ops too (the checks then raise on a bad position).
"""
from __future__ import annotations

import dataclasses

import torch

from ..torch.ops import TorchOps

COMPUTE_DTYPE = torch.float16


@dataclasses.dataclass(frozen=True)
class InputMajor:
    """A projection weight stored transposed, [in, out], so that linear is x @ value."""
    value: torch.Tensor


def runtime_index(index: torch.Tensor, high: int):
    """The single int32 of `index` (shape (1,)) as a traced integer in [0, high]."""
    value = index.item()  # index (1,): a reshape to () would lower to an f32-typed empty shape (rejected)
    torch._check(value >= 0)
    torch._check(value <= high)
    return value


class CoreAIOps(TorchOps):
    def __init__(self, dtype=COMPUTE_DTYPE):
        super().__init__(dtype)

    def linear(self, x, weight):
        if isinstance(weight, InputMajor):
            return x @ weight.value                   # (.., in) @ (in, out)
        return x @ weight.transpose(0, 1)             # weight (out, in): the io_model's head

    def gather_rows(self, table, index):
        return torch.index_select(table, 0, index)    # index (n,) int32

    def slice_rows(self, table, start, count: int):
        first = runtime_index(start, table.shape[0] - count)
        return table[first:first + count]

    def linear_channels(self, x, weight):
        """Channels-first projection (prefill): x (I, T) -> (O, T)."""
        if isinstance(weight, InputMajor):
            return (x.transpose(0, 1) @ weight.value).transpose(0, 1)  # ((T, I) @ (I, O))^T: moves activations only
        return weight @ x                                              # (O, I) @ (I, T)

    def write_state_rows(self, state, value, index: int, slot, rows, count: int):
        """A prefill block's rows (KVH, T, D) at ring slots slot .. slot+T-1 of entry `index`."""
        if value is not state:
            raise ValueError("a block write must go to the state value last read or written")
        _, kv_heads, seq_len, head_dim = state.shape
        first = runtime_index(slot, seq_len - count)
        state[index:index + 1, :, first:first + count, :] = rows.reshape(1, kv_heads, count, head_dim)  # (1, KVH, T, D)
        return state

    def write_state_row(self, state, value, index: int, slot, row):
        if value is not state:
            raise ValueError("a row write must go to the state value last read or written")
        _, kv_heads, seq_len, head_dim = state.shape
        first = runtime_index(slot, seq_len - 1)
        state[index:index + 1, :, first:first + 1, :] = row.reshape(1, kv_heads, 1, head_dim)  # (1, KVH, 1, D)
        return state
