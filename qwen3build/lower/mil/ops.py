"""MIL backend for graph.py: emits the same math as iOS18 ML Program ops, in fp16.

Only call inside an `mb.program` function. Op names carry the current scope
(`layer07_linear_12`) so MIL dumps read like the graph.
"""
from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

FP16 = np.float16


class MilOps:
    def __init__(self):
        self._scope = "in"
        self._count = 0

    def scope(self, name: str) -> None:
        self._scope = name

    def _name(self, op: str) -> str:
        self._count += 1
        return f"{self._scope}_{op}_{self._count}"

    def linear(self, x, weight):
        return mb.linear(x=x, weight=weight, name=self._name("linear"))

    def matmul(self, x, y, transpose_y=False):
        return mb.matmul(x=x, y=y, transpose_y=transpose_y, name=self._name("matmul"))

    @staticmethod
    def _operand(y):
        return FP16(y) if isinstance(y, (float, int)) else y

    def add(self, x, y):
        return mb.add(x=x, y=self._operand(y), name=self._name("add"))

    def mul(self, x, y):
        return mb.mul(x=x, y=self._operand(y), name=self._name("mul"))

    def rsub(self, constant: float, x):
        return mb.sub(x=FP16(constant), y=x, name=self._name("rsub"))

    def rsqrt(self, x):
        return mb.rsqrt(x=x, name=self._name("rsqrt"))

    def mean_last(self, x):
        return mb.reduce_mean(x=x, axes=[-1], keep_dims=True, name=self._name("mean"))

    def softmax_last(self, x):
        return mb.softmax(x=x, axis=-1, name=self._name("softmax"))

    def silu(self, x):
        return mb.silu(x=x, name=self._name("silu"))

    def reshape(self, x, shape):
        return mb.reshape(x=x, shape=list(shape), name=self._name("reshape"))

    def concat(self, values, axis):
        return mb.concat(values=list(values), axis=axis, name=self._name("concat"))

    def slice_last(self, x, begin, end):
        rank = x.rank
        return mb.slice_by_index(x=x, begin=[0] * (rank - 1) + [begin], end=list(x.shape[:-1]) + [end],
                                 name=self._name("slice"))

    def gather_rows(self, table, index):
        return mb.gather(x=table, indices=index, axis=0, name=self._name("gather"))

    def index_first(self, x, i):
        rank = x.rank
        return mb.slice_by_index(x=x, begin=[i] + [0] * (rank - 1), end=[i + 1] + list(x.shape[1:]),
                                 squeeze_mask=[True] + [False] * (rank - 1), name=self._name("index"))

    def stack_first(self, values):
        return mb.stack(values=list(values), axis=0, name=self._name("stack"))
