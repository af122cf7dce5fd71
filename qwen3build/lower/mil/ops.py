"""MIL backend for graph/decoder.py: emits the same math as iOS18 ML Program ops, in fp16.

Only call inside an `mb.program` function. Op names carry the current scope
(`layer07_linear_12`) so MIL dumps read like the graph. Index arithmetic (ring slot,
slice begins) stays int32.
"""
from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

FP16 = np.float16
INT32 = np.int32


class MilOps:
    def __init__(self, prefix: str = ""):
        """prefix: put before every op name (a second function of one package, e.g.
        "prefill_", so the two functions' op names differ in dumps and loaders)."""
        self._prefix = prefix
        self._scope = "in"
        self._count = 0

    def scope(self, name: str) -> None:
        self._scope = name

    def _name(self, op: str) -> str:
        self._count += 1
        return f"{self._prefix}{self._scope}_{op}_{self._count}"

    def linear(self, x, weight):
        return mb.linear(x=x, weight=weight, name=self._name("linear"))

    def linear_channels(self, x, weight):
        """weight (O, I) @ x (I, T) -> (O, T): a channels-first projection on the same (out, in)
        weight constant `linear` reads, so a decode and a prefill function share it."""
        return mb.matmul(x=weight, y=x, name=self._name("project"))

    def matmul(self, x, y, transpose_x=False, transpose_y=False):
        return mb.matmul(x=x, y=y, transpose_x=transpose_x, transpose_y=transpose_y, name=self._name("matmul"))

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

    def mean_axis(self, x, axis: int):
        return mb.reduce_mean(x=x, axes=[axis], keep_dims=True, name=self._name("mean"))

    def softmax_last(self, x):
        return mb.softmax(x=x, axis=-1, name=self._name("softmax"))

    def softmax(self, x, axis: int):
        return mb.softmax(x=x, axis=axis, name=self._name("softmax"))

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

    def slice_axis(self, x, axis: int, begin: int, end: int):
        """x[..., begin:end, ...] along `axis` (constant bounds: a view)."""
        rank = x.rank
        axis = axis % rank
        starts, stops = [0] * rank, list(x.shape)
        starts[axis], stops[axis] = begin, end
        return mb.slice_by_index(x=x, begin=starts, end=stops, name=self._name("slice"))

    def transpose(self, x, perm):
        return mb.transpose(x=x, perm=list(perm), name=self._name("transpose"))

    def reverse(self, x, axis: int):
        return mb.reverse(x=x, axes=[axis], name=self._name("reverse"))

    def gather_rows(self, table, index):
        return mb.gather(x=table, indices=index, axis=0, name=self._name("gather"))

    def index_first(self, x, i):
        rank = x.rank
        return mb.slice_by_index(x=x, begin=[i] + [0] * (rank - 1), end=[i + 1] + list(x.shape[1:]),
                                 squeeze_mask=[True] + [False] * (rank - 1), name=self._name("index"))

    def stack_first(self, values):
        return mb.stack(values=list(values), axis=0, name=self._name("stack"))

    # -- per-position rows and the KV state ----------------------------------------

    def slice_rows(self, table, start, count: int):
        """Rows start .. start+count-1 of `table` along axis 0; start (1,) int32 at run time.
        One slice_by_size (no gather, so no common::guard_negative_gather_indices ops)."""
        rank = table.rank
        begin = start if rank == 1 else mb.concat(values=[start, np.zeros(rank - 1, INT32)], axis=0,
                                                  name=self._name("begin"))
        return mb.slice_by_size(x=table, begin=begin, size=[count] + list(table.shape[1:]),
                                name=self._name("rows"))

    def index_rsub(self, constant: int, x):
        """constant - x in int32 (x an int32 index)."""
        return mb.sub(x=INT32(constant), y=x, name=self._name("index_rsub"))

    def read_state(self, state):
        return mb.read_state(input=state, name=self._name("kv_read"))

    def write_state(self, state, value):
        return mb.coreml_update_state(state=state, value=value, name=self._name("kv_write"))

    def write_state_row(self, state, value, index: int, slot, row):
        """value[index, :, slot, :] = row (row (KVH, 1, D); slot (1,) int32), stored in
        `state` right away: slice_update -> coreml_update_state, the pattern coremltools 9
        saves as read_state -> slice_update -> write_state (an in-place row write).
        Returns the update's value, which later reads must use."""
        _, kv_heads, _, head_dim = value.shape
        begin = mb.concat(values=[np.array([index, 0], INT32), slot, np.zeros(1, INT32)], axis=0,
                          name=self._name("row_begin"))                              # [index, 0, slot, 0]
        end = mb.add(x=begin, y=np.array([1, kv_heads, 1, head_dim], INT32), name=self._name("row_end"))
        row = mb.reshape(x=row, shape=[1, kv_heads, 1, head_dim], name=self._name("row"))  # (1, KVH, 1, D)
        written = mb.slice_update(x=value, update=row, begin=begin, end=end, name=self._name("row_write"))
        return mb.coreml_update_state(state=state, value=written, name=self._name("kv_write"))

    def write_state_rows(self, state, value, index: int, slot, rows, count: int):
        """value[index, :, slot:slot+count, :] = rows (rows (KVH, count, D), newest position
        first; slot (1,) int32), stored right away: one slice_update -> coreml_update_state
        for a whole prefill block, the in-place pattern of write_state_row."""
        _, kv_heads, _, head_dim = value.shape
        begin = mb.concat(values=[np.array([index, 0], INT32), slot, np.zeros(1, INT32)], axis=0,
                          name=self._name("rows_begin"))                             # [index, 0, slot, 0]
        end = mb.add(x=begin, y=np.array([1, kv_heads, count, head_dim], INT32), name=self._name("rows_end"))
        rows = mb.reshape(x=rows, shape=[1, kv_heads, count, head_dim], name=self._name("rows"))  # (1, KVH, T, D)
        written = mb.slice_update(x=value, update=rows, begin=begin, end=end, name=self._name("rows_write"))
        return mb.coreml_update_state(state=state, value=written, name=self._name("kv_write"))
