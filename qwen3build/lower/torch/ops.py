"""Eager fp32 torch backend for graph.py: the project's reference of the deployed graph."""
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

    def matmul(self, x, y, transpose_y=False):
        return x @ (y.transpose(-1, -2) if transpose_y else y)

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

    def softmax_last(self, x):
        return torch.softmax(x, dim=-1)

    def silu(self, x):
        return torch.nn.functional.silu(x)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def concat(self, values, axis):
        return torch.cat(values, dim=axis)

    def slice_last(self, x, begin, end):
        return x[..., begin:end]

    def gather_rows(self, table, index):
        return table[index.long()]

    def index_first(self, x, i):
        return x[i]

    def stack_first(self, values):
        return torch.stack(values, dim=0)
