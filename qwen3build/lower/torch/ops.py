"""Eager fp32 torch backend for graph/decoder.py: the project's reference of the deployed graph.

States are torch tensors updated in place: read_state returns the state itself, and a
row write or a state write changes it, as Core ML's state update does. The graph only
reads a state value after the last write that should be in it, so aliasing is exact.
"""
from __future__ import annotations

import numpy as np
import torch


class TorchOps:
    def __init__(self, dtype=torch.float32):
        self.dtype = dtype

    def scope(self, name: str) -> None:
        pass

    def tensor(self, value: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.dtype)

    def linear(self, x, weight):
        return x @ weight.T

    def linear_channels(self, x, weight):
        return weight @ x                                   # (O, I) @ (I, T): channels-first

    def matmul(self, x, y, transpose_x=False, transpose_y=False):
        return (x.transpose(-1, -2) if transpose_x else x) @ (y.transpose(-1, -2) if transpose_y else y)

    def add(self, x, y):
        return x + y

    def mul(self, x, y):
        return x * y

    def rsub(self, constant: float, x):
        return constant - x

    def rsqrt(self, x):
        return torch.rsqrt(x)

    def mean_last(self, x):
        return x.mean(dim=-1, keepdim=True)

    def mean_axis(self, x, axis: int):
        return x.mean(dim=axis, keepdim=True)

    def softmax_last(self, x):
        return torch.softmax(x, dim=-1)

    def softmax(self, x, axis: int):
        return torch.softmax(x, dim=axis)

    def silu(self, x):
        return torch.nn.functional.silu(x)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def concat(self, values, axis):
        return torch.cat(values, dim=axis)

    def slice_last(self, x, begin, end):
        return x[..., begin:end]

    def slice_axis(self, x, axis: int, begin: int, end: int):
        return x.narrow(axis, begin, end - begin)

    def transpose(self, x, perm):
        return x.permute(*perm)

    def reverse(self, x, axis: int):
        return torch.flip(x, dims=(axis,))

    def gather_rows(self, table, index):
        return table[index.long()]

    def index_first(self, x, i):
        return x[i]

    def stack_first(self, values):
        return torch.stack(values, dim=0)

    # -- per-position rows and the KV state ----------------------------------------

    def slice_rows(self, table, start, count: int):
        first = int(start[0])
        if first < 0 or first + count > table.shape[0]:
            raise IndexError(f"rows {first}..{first + count - 1} are outside a table of {table.shape[0]} rows")
        return table[first:first + count]

    def index_rsub(self, constant: int, x):
        return constant - x

    def read_state(self, state):
        return state

    def write_state(self, state, value):
        state.copy_(value)
        return state

    def write_state_row(self, state, value, index: int, slot, row):
        if value is not state:
            raise ValueError("a row write must go to the state value last read or written")
        first = int(slot[0])
        if not 0 <= first < state.shape[2]:
            raise IndexError(f"ring slot {first} is outside the {state.shape[2]} slots")
        state[index, :, first:first + 1, :] = row  # row (KVH, 1, D)
        return state

    def write_state_rows(self, state, value, index: int, slot, rows, count: int):
        if value is not state:
            raise ValueError("a block write must go to the state value last read or written")
        first = int(slot[0])
        if not 0 <= first <= state.shape[2] - count:
            raise IndexError(f"ring slots {first}..{first + count - 1} are outside the {state.shape[2]} slots")
        state[index, :, first:first + count, :] = rows  # rows (KVH, T, D), newest position first
        return state
