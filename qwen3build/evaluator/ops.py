"""Numpy kernels for MIL ops, registered by op type.

Semantics (what the engine promises, and why):
- Every value the engine stores has exactly the numpy dtype its MIL var declares
  (fp16 vars hold np.float16 arrays, int32 vars np.int32, ...).
- Kernels compute in float32 (`widen` lifts fp16 inputs; matmuls run in fp32 BLAS) and
  return whatever dtype falls out; the engine then rounds each op's output once to the
  declared dtype (`to_dtype`). So an fp16 op that overflows yields inf, and an fp16
  rounding after every op shows up as it would on device. Integer casts wrap the way
  numpy's astype wraps (int32 150000 -> uint16 18928), which is what Core ML does.
- A kernel builder runs once per op at load time: it reads the op's constant parameters
  (axes, perm, epsilon, ...) and returns a closure over them plus the names of the inputs
  the closure takes at run time, in order. Nothing inspects MIL objects per call.
- KERNELS holds exactly the op types the build emits (EMITTED_OP_TYPES, checked against
  freshly built packages of every kind by tests/test_evaluator.py), each with the
  parameters the build uses; anything else is refused at load with NotImplementedError.

Constexpr ops (`decompress_constexpr`) are evaluated once at load time from their
constant inputs, written from the MIL op definitions (not coremltools' own decompress
helpers), so the evaluator checks the bytes independently of the code that wrote them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

try:  # torch's fp16 <-> fp32 casts are vectorized (F16C); numpy's are ~20x slower here.
    import torch as _torch
except ImportError:  # pragma: no cover - torch is a project dependency
    _torch = None

FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
# Below this many elements numpy's cast is as fast as a round trip through torch.
_TORCH_CAST_MIN_ELEMENTS = 1 << 12
# torch runs a copy inline (no OpenMP team) below its grain size of 32768 elements. Casting
# in chunks of that size keeps the cast single-threaded: on 2 shared cores, OpenMP threads
# spinning against OpenBLAS and other processes made casts 100x slower (16 ms vs 0.15 ms
# for 0.5M elements, measured).
_TORCH_CAST_CHUNK_ELEMENTS = 1 << 15
# Constexpr decompression works on slices of about this many elements to bound memory.
_DECOMPRESS_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------
# dtype helpers


def _torch_cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.empty(array.shape, dtype)
    source, target = _torch.from_numpy(array.reshape(-1)), _torch.from_numpy(out.reshape(-1))
    for start in range(0, source.numel(), _TORCH_CAST_CHUNK_ELEMENTS):
        target[start : start + _TORCH_CAST_CHUNK_ELEMENTS].copy_(source[start : start + _TORCH_CAST_CHUNK_ELEMENTS])
    return out


def to_dtype(value: Any, dtype: np.dtype) -> np.ndarray:
    """`value` as an ndarray of exactly `dtype` (round-to-nearest-even for fp16, inf past 65504)."""
    array = np.asarray(value)
    if array.dtype == dtype:
        return array
    if (
        _torch is not None
        and array.size >= _TORCH_CAST_MIN_ELEMENTS
        and array.dtype in (FLOAT16, FLOAT32)
        and dtype in (FLOAT16, FLOAT32)
        and array.flags.c_contiguous
        and array.flags.writeable
    ):
        return _torch_cast(array, dtype)
    return array.astype(dtype)


def widen(array: np.ndarray) -> np.ndarray:
    """fp16 -> fp32 for computing; every other dtype passes through unchanged."""
    if array.dtype == FLOAT16:
        return to_dtype(array, FLOAT32)
    return array


def numpy_dtype(mil_dtype) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(mil_dtype))


def _cast_into(target: np.ndarray, source: np.ndarray) -> None:
    """target[...] = source, rounded to target's dtype (torch copies for contiguous fp data)."""
    if (
        _torch is not None
        and source.dtype in (FLOAT16, FLOAT32)
        and target.dtype in (FLOAT16, FLOAT32)
        and source.shape == target.shape
        and source.flags.c_contiguous
        and target.flags.c_contiguous
        and source.flags.writeable
    ):
        source_flat, target_flat = _torch.from_numpy(source.reshape(-1)), _torch.from_numpy(target.reshape(-1))
        for start in range(0, source_flat.numel(), _TORCH_CAST_CHUNK_ELEMENTS):
            stop = start + _TORCH_CAST_CHUNK_ELEMENTS
            target_flat[start:stop].copy_(source_flat[start:stop])
    else:
        target[...] = source


# Elementwise ops on fp16 outputs at least this large run in pieces: each piece is widened,
# computed and rounded while it sits in cache, instead of making full-size fp32 temporaries
# (measured on an (8, 4096, 128) fp16 cache times a (1, 4096, 1) mask: 12-18 ms vs
# 22-34 ms whole-array, on busy cores).
CHUNKED_ELEMENTWISE_MIN_ELEMENTS = 1 << 18
# 128K elements: 512 KB per fp32 operand, inside L2, and few enough pieces that Python's
# per-piece overhead stays small (32K-element pieces spent ~4 ms of 10 ms on overhead).
_ELEMENTWISE_PIECE_ELEMENTS = 1 << 17


def chunked_elementwise(run, input_shapes, out_shape: tuple[int, ...], out_dtype: np.dtype):
    """Wrap an elementwise kernel so it computes `out_shape` piece by piece.

    input_shapes: the static shape of each argument (None for an omitted optional input).
    Pieces (about _ELEMENTWISE_PIECE_ELEMENTS each) split the output along one axis (and loop over the axes before it); each input
    is sliced the same way where it has that dimension and broadcast where it has 1.
    """
    rank = len(out_shape)
    padded = [None if shape is None else (1,) * (rank - len(shape)) + tuple(shape) for shape in input_shapes]
    split_axis = rank - 1
    inner = 1
    while split_axis > 0 and inner * out_shape[split_axis] <= _ELEMENTWISE_PIECE_ELEMENTS:
        inner *= out_shape[split_axis]
        split_axis -= 1
    rows_per_piece = max(1, _ELEMENTWISE_PIECE_ELEMENTS // inner)
    pieces = []  # (output index, per-input index)
    for outer in np.ndindex(*out_shape[:split_axis]):
        for start in range(0, out_shape[split_axis], rows_per_piece):
            stop = min(start + rows_per_piece, out_shape[split_axis])
            out_index = tuple(slice(i, i + 1) for i in outer) + (slice(start, stop),)
            input_indices = []
            for shape in padded:
                if shape is None:
                    input_indices.append(None)
                    continue
                index = tuple(
                    slice(None) if shape[axis] == 1 else out_index[axis] for axis in range(split_axis + 1)
                )
                input_indices.append(index)
            pieces.append((out_index, input_indices))

    def run_in_pieces(*values):
        views = [None if v is None else np.reshape(v, shape) for v, shape in zip(values, padded)]
        out = np.empty(out_shape, out_dtype)
        for out_index, input_indices in pieces:
            piece = run(*[None if v is None else v[index] for v, index in zip(views, input_indices)])
            target = out[out_index]
            piece = np.broadcast_to(piece, target.shape) if piece.shape != target.shape else piece
            _cast_into(target, piece)
        return out

    return run_in_pieces


# ---------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class Kernel:
    op_type: str
    build: Callable[["OpContext"], tuple[Callable[..., Any], tuple[str, ...]]]
    # True: float constant inputs are handed over pre-widened to fp32 (cached at load).
    computes: bool
    # True: output[i] depends only on the (broadcast) inputs at i, so the op can run in
    # cache-sized pieces (see chunked_elementwise).
    elementwise: bool


KERNELS: dict[str, Kernel] = {}


def kernel(*op_types: str, computes: bool = True, elementwise: bool = False):
    """Register a kernel builder for `op_types`; a second registration of a type is a bug."""

    def register(build):
        for op_type in op_types:
            if op_type in KERNELS:
                raise ValueError(f"kernel for {op_type!r} registered twice")
            KERNELS[op_type] = Kernel(op_type, build, computes, elementwise)
        return build

    return register


_REQUIRED = object()


class OpContext:
    """What a kernel builder may ask about its op: constant parameters and declared outputs."""

    def __init__(self, op, const_value: Callable[[Any], np.ndarray | None], in_place: bool = False):
        self.op = op
        self.op_type = op.op_type
        self._const_value = const_value
        # True: the engine's buffer plan allows writing the result into the input `x`
        # (only slice_update asks; see engine._BufferPlan).
        self.in_place = in_place

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def is_const(self, name: str) -> bool:
        var = self.op.inputs.get(name)
        return var is not None and not isinstance(var, (list, tuple)) and self._const_value(var) is not None

    def const(self, name: str, default: Any = _REQUIRED) -> Any:
        """The constant value of input `name`, or `default` when the op does not have it."""
        var = self.op.inputs.get(name)
        if var is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.op_type} {self.op.name!r}: missing required input {name!r}")
            return default
        value = self._const_value(var)
        if value is None:
            raise NotImplementedError(
                f"{self.op_type} {self.op.name!r}: input {name!r} is computed at run time; "
                "the evaluator supports only constant values for it"
            )
        return value

    def const_tuple(self, name: str, default: Any = _REQUIRED) -> tuple[int, ...] | None:
        value = self.const(name, default)
        if value is None:
            return None
        return tuple(int(v) for v in np.atleast_1d(value))

    def out_shape(self, index: int = 0) -> tuple[int, ...]:
        return tuple(int(d) for d in self.op.outputs[index].shape)

    def out_dtype(self, index: int = 0) -> np.dtype:
        return numpy_dtype(self.op.outputs[index].dtype)

    def in_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.op.inputs[name].shape)


def _normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# The op types of every package the build makes (decoder shards in both KV_WRITE modes,
# fp16 and quantized; io_model; sampler), read back from the saved bytes. The engine
# handles the state and constant ones itself; KERNELS covers the rest, and nothing more.
ENGINE_OP_TYPES = frozenset({"const", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale",
                             "read_state", "coreml_update_state"})
EMITTED_OP_TYPES = ENGINE_OP_TYPES | frozenset({
    "add", "cast", "clip", "concat", "exp", "gather", "gather_along_axis", "greater", "greater_equal", "identity",
    "less", "linear", "log", "logical_and", "matmul", "maximum", "mul", "real_div", "reduce_argmax", "reduce_max",
    "reduce_mean", "reduce_sum", "reshape", "reverse", "rsqrt", "scatter_along_axis", "select", "silu",
    "slice_by_index", "slice_by_size", "slice_update", "softmax", "stack", "sub", "transpose",
})


# ---------------------------------------------------------------------------------------
# elementwise


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.true_divide,
    "maximum": np.maximum,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "logical_and": np.logical_and,
}


@kernel(*_BINARY, elementwise=True)
def _binary(c: OpContext):
    ufunc = _BINARY[c.op_type]
    return (lambda x, y: ufunc(widen(x), widen(y))), ("x", "y")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for very negative x, giving 1/inf = 0: the right limit.
    return 1.0 / (1.0 + np.exp(-x))


_UNARY = {
    "exp": np.exp,
    "silu": lambda x: x * _sigmoid(x),
    "identity": lambda x: x,
}


@kernel(*_UNARY, elementwise=True)
def _unary(c: OpContext):
    function = _UNARY[c.op_type]
    return (lambda x: function(widen(x))), ("x",)


@kernel("rsqrt", "log", elementwise=True)
def _unary_with_epsilon(c: OpContext):
    # MIL: rsqrt = 1/sqrt(x + eps) (default 1e-12), log = log(x + eps) (1e-45). The
    # loader writes the default in when it was omitted.
    epsilon = np.float32(c.const("epsilon"))
    if c.op_type == "rsqrt":
        return (lambda x: 1.0 / np.sqrt(widen(x) + epsilon)), ("x",)
    return (lambda x: np.log(widen(x) + epsilon)), ("x",)


@kernel("clip", elementwise=True)
def _clip(c: OpContext):
    alpha, beta = np.float32(c.const("alpha")), np.float32(c.const("beta"))
    return (lambda x: np.minimum(np.maximum(widen(x), alpha), beta)), ("x",)


@kernel("cast")
def _cast(c: OpContext):
    # The engine's rounding to the declared output dtype *is* the cast (astype semantics:
    # float -> int truncates toward zero, int -> narrower int wraps).
    return (lambda x: x), ("x",)


@kernel("select", elementwise=True)
def _select(c: OpContext):
    return (lambda cond, a, b: np.where(cond.astype(bool, copy=False), widen(a), widen(b))), ("cond", "a", "b")


# ---------------------------------------------------------------------------------------
# linear algebra


def _project(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x @ weight.T over the last axis. Folding the leading axes into rows keeps numpy on a
    single BLAS gemv/gemm (3-D x against a transposed 2-D weight took 3x longer, measured)."""
    x = widen(x)
    rows = np.reshape(x, (-1, x.shape[-1]))
    return np.reshape(np.matmul(rows, widen(weight).T), x.shape[:-1] + (weight.shape[0],))


@kernel("linear")
def _linear(c: OpContext):
    if c.has("bias") and not c.is_const("bias"):
        return (lambda x, weight, bias: _project(x, weight) + widen(bias)), ("x", "weight", "bias")
    bias = c.const("bias", None)
    if bias is not None and not np.any(bias):
        bias = None  # coremltools writes an all-zero bias when none was given
    if bias is None:
        return _project, ("x", "weight")
    bias32 = np.asarray(bias, np.float32)
    return (lambda x, weight: _project(x, weight) + bias32), ("x", "weight")


@kernel("matmul")
def _matmul(c: OpContext):
    transpose_x = bool(c.const("transpose_x", False))
    transpose_y = bool(c.const("transpose_y", False))

    def run(x, y):
        x, y = widen(x), widen(y)
        if transpose_x:
            x = np.swapaxes(x, -1, -2)
        if transpose_y:
            y = np.swapaxes(y, -1, -2)
        return np.matmul(x, y)

    return run, ("x", "y")


@kernel("softmax")
def _softmax(c: OpContext):
    axis = int(c.const("axis", -1))

    def run(x):
        # In place on one fp32 working copy (a prefill block's scores are (KVH, S, G, T):
        # millions of elements, where every extra temporary costs a pass over memory).
        x = np.array(x, np.float32, copy=True)
        x -= np.max(x, axis=axis, keepdims=True)
        np.exp(x, out=x)
        x /= np.sum(x, axis=axis, keepdims=True)
        return x

    return run, ("x",)


# ---------------------------------------------------------------------------------------
# reductions


_REDUCE = {
    "reduce_mean": np.mean,
    "reduce_sum": np.sum,
    "reduce_max": np.max,
}


@kernel(*_REDUCE)
def _reduce(c: OpContext):
    function = _REDUCE[c.op_type]
    axes = c.const_tuple("axes", None)  # None: reduce over every axis
    keep_dims = bool(c.const("keep_dims", False))
    return (lambda x: function(widen(x), axis=axes, keepdims=keep_dims)), ("x",)


@kernel("reduce_argmax")
def _reduce_argmax(c: OpContext):
    # Lowest index on a tie, like numpy; int64 here, rounded to the declared index dtype
    # by the engine (so a 16-bit declaration would wrap exactly as on device).
    axis = int(c.const("axis", -1))
    keep_dims = bool(c.const("keep_dims", False))
    return (lambda x: np.argmax(x, axis=axis, keepdims=keep_dims)), ("x",)


# ---------------------------------------------------------------------------------------
# shape and data movement (no arithmetic: values keep their declared dtype)


@kernel("reshape", computes=False)
def _reshape(c: OpContext):
    # Shapes are static (the loader rejects flexible inputs): the declared output shape is the answer.
    shape = c.out_shape()
    return (lambda x: np.reshape(x, shape)), ("x",)


def _index_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    slices = []
    for axis, dim in enumerate(shape):
        step = int(stride[axis]) if stride is not None else 1
        if squeeze_mask is not None and squeeze_mask[axis]:
            index = int(begin[axis])
            slices.append(index + dim if index < 0 else index)
            continue
        start = None if begin_mask is not None and begin_mask[axis] else int(begin[axis])
        stop = None if end_mask is not None and end_mask[axis] else int(end[axis])
        slices.append(slice(start, stop, step))
    return tuple(slices)


@kernel("transpose", computes=False)
def _transpose(c: OpContext):
    # A contiguous copy, not numpy's strided view: the next matmul runs on packed rows, and
    # no later in-place write can reach the input through it.
    perm = c.const_tuple("perm")
    return (lambda x: np.ascontiguousarray(np.transpose(x, perm))), ("x",)


@kernel("reverse", computes=False)
def _reverse(c: OpContext):
    # MIL reverse: flip along `axes` (every axis when omitted); a contiguous copy, as transpose.
    axes = c.const_tuple("axes", None)
    return (lambda x: np.ascontiguousarray(np.flip(x, axis=axes))), ("x",)


@kernel("slice_by_index", computes=False)
def _slice_by_index(c: OpContext):
    shape = c.in_shape("x")
    stride = c.const_tuple("stride", None)
    begin_mask = c.const_tuple("begin_mask", None)
    end_mask = c.const_tuple("end_mask", None)
    squeeze_mask = c.const_tuple("squeeze_mask", None)
    out_shape = c.out_shape()
    if c.is_const("begin") and c.is_const("end"):
        slices = _index_slices(
            shape, c.const_tuple("begin"), c.const_tuple("end"), stride, begin_mask, end_mask, squeeze_mask
        )
        return (lambda x: np.reshape(x[slices], out_shape)), ("x",)

    def run(x, begin, end):
        slices = _index_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
        return np.reshape(x[slices], out_shape)

    return run, ("x", "begin", "end")


@kernel("slice_by_size", computes=False)
def _slice_by_size(c: OpContext):
    shape = c.in_shape("x")

    def slices_of(begin, size):
        slices = []
        for b, s, dim in zip(begin, size, shape):
            b, s = int(b), int(s)
            stop = dim if s == -1 else b + s
            # Core ML leaves a slice outside the tensor undefined; here it is an error,
            # not numpy's silently shorter result (a shard's position must be < SEQ_LEN).
            if b < 0 or stop > dim:
                raise IndexError(f"slice {b}..{stop - 1} is outside an axis of {dim}")
            slices.append(slice(b, stop))
        return tuple(slices)

    if c.is_const("begin") and c.is_const("size"):
        slices = slices_of(c.const_tuple("begin"), c.const_tuple("size"))
        return (lambda x: x[slices]), ("x",)
    return (lambda x, begin, size: x[slices_of(begin, size)]), ("x", "begin", "size")


@kernel("slice_update", computes=False)
def _slice_update(c: OpContext):
    shape = c.in_shape("x")
    stride = c.const_tuple("stride", None)
    begin_mask = c.const_tuple("begin_mask", None)
    end_mask = c.const_tuple("end_mask", None)
    squeeze_mask = c.const_tuple("squeeze_mask", None)
    in_place = c.in_place

    def run(x, update, begin, end):
        out = x if in_place else np.array(x, copy=True)  # in place: only the written rows move
        slices = _index_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
        target = out[slices]
        if target.size != np.size(update):
            raise IndexError(f"slice {list(begin)}..{list(end)} of {shape} has {target.size} elements, "
                             f"the update {np.size(update)}")
        out[slices] = np.reshape(update, target.shape)
        return out

    return run, ("x", "update", "begin", "end")


@kernel("concat", computes=False)
def _concat(c: OpContext):
    axis = int(c.const("axis"))
    if bool(c.const("interleave", False)):
        raise NotImplementedError(f"concat {c.op.name!r}: interleave=True (the build never emits it)")
    return (lambda values: np.concatenate(values, axis=axis)), ("values",)


@kernel("stack", computes=False)
def _stack(c: OpContext):
    axis = int(c.const("axis", 0))
    return (lambda values: np.stack(values, axis=axis)), ("values",)


@kernel("gather", computes=False)
def _gather(c: OpContext):
    axis = _normalize_axis(int(c.const("axis", 0)), len(c.in_shape("x")))
    if int(c.const("batch_dims", 0)) != 0:
        raise NotImplementedError(f"gather {c.op.name!r}: batch_dims > 0 (the build never emits it)")
    return (lambda x, indices: np.take(x, indices.astype(np.intp, copy=False), axis=axis)), ("x", "indices")


@kernel("gather_along_axis", computes=False)
def _gather_along_axis(c: OpContext):
    axis = int(c.const("axis", 0))

    def run(x, indices):
        indices = indices.astype(np.intp)
        indices = np.where(indices < 0, indices + x.shape[axis], indices)
        return np.take_along_axis(x, indices, axis=axis)

    return run, ("x", "indices")


@kernel("scatter_along_axis", computes=False)
def _scatter_along_axis(c: OpContext):
    axis = _normalize_axis(int(c.const("axis", 0)), len(c.in_shape("data")))
    mode = str(c.const("mode", "add"))
    if mode != "update":
        raise NotImplementedError(f"scatter_along_axis {c.op.name!r}: mode {mode!r} (the build emits 'update' only)")

    def run(data, indices, updates):
        out = np.array(data, copy=True)
        indices = indices.astype(np.intp)
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        np.put_along_axis(out, indices, updates, axis=axis)  # duplicates: the last write wins
        return out

    return run, ("data", "indices", "updates")


# ---------------------------------------------------------------------------------------
# constexpr decompression (load time only)


def _block_repeat_multiply(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, out_dtype) -> np.ndarray:
    """scale * (data - offset), scale/offset broadcast over blocks, computed in fp32 in chunks."""
    out = np.empty(data.shape, out_dtype)
    block = [d // s for d, s in zip(data.shape, scale.shape)]
    # View data as (g0, b0, g1, b1, ...) so one scale broadcasts over each block.
    scale_view = scale.astype(np.float32).reshape([v for g in scale.shape for v in (g, 1)])
    offset_view = None if offset is None else offset.astype(np.float32).reshape(scale_view.shape)
    row_elements = max(1, math.prod(data.shape[1:]))
    rows_per_chunk = max(block[0], (_DECOMPRESS_CHUNK_ELEMENTS // row_elements) // block[0] * block[0])
    for start in range(0, data.shape[0], rows_per_chunk):
        stop = min(start + rows_per_chunk, data.shape[0])
        chunk = data[start:stop].astype(np.float32)
        groups0 = (stop - start) // block[0]
        blocked = chunk.reshape([groups0, block[0]] + [v for g, b in zip(scale.shape[1:], block[1:]) for v in (g, b)])
        chunk_scale = scale_view[start // block[0] : start // block[0] + groups0]
        if offset_view is not None:
            blocked = blocked - offset_view[start // block[0] : start // block[0] + groups0]
        out[start:stop] = to_dtype((blocked * chunk_scale).reshape(chunk.shape), out_dtype)
    return out


def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 constexpr_lut_to_dense: per-block palettes, scalar or vector entries.

    lut has shape (G_0, ..., G_{K-1}, 2**nbits, VECTOR_SIZE) for K-rank indices; element
    indices[i] reads palette (i_0 // B_0, ..., i_{K-1} // B_{K-1}) with B_k = n_k / G_k.
    """
    rank = indices.ndim
    groups, palette_size, vector_size = lut.shape[:rank], lut.shape[-2], lut.shape[-1]
    block = [n // g for n, g in zip(indices.shape, groups)]
    if vector_size > 1 and vector_axis is None:
        raise ValueError("constexpr_lut_to_dense: VECTOR_SIZE > 1 needs vector_axis")
    vector_axis = 0 if vector_axis is None else _normalize_axis(int(vector_axis), rank)
    flat_lut = lut.reshape(-1, vector_size)  # row = palette_id * palette_size + index
    out_shape = list(indices.shape)
    out_shape[vector_axis] *= vector_size
    out = np.empty(out_shape, lut.dtype)
    row_factor = vector_size if vector_axis == 0 else 1

    # Palette id of every position along axes 1..K-1 (broadcast), fixed for all chunks.
    tail_palette = np.zeros([1] + list(indices.shape[1:]), np.int64)
    stride = 1
    for axis in range(rank - 1, 0, -1):
        along = (np.arange(indices.shape[axis]) // block[axis]) * stride
        tail_palette = tail_palette + along.reshape([1] * axis + [-1] + [1] * (rank - axis - 1))
        stride *= groups[axis]
    row_elements = max(1, math.prod(indices.shape[1:]))
    rows_per_chunk = max(1, _DECOMPRESS_CHUNK_ELEMENTS // row_elements)
    for start in range(0, indices.shape[0], rows_per_chunk):
        stop = min(start + rows_per_chunk, indices.shape[0])
        head_palette = (np.arange(start, stop) // block[0]) * stride
        palette = head_palette.reshape([-1] + [1] * (rank - 1)) + tail_palette
        rows = palette * palette_size + indices[start:stop].astype(np.int64)
        values = flat_lut[rows]  # (chunk..., VECTOR_SIZE)
        if vector_size > 1:
            values = np.moveaxis(values, -1, vector_axis + 1)
            shape = list(rows.shape)
            shape[vector_axis] *= vector_size
            values = values.reshape(shape)
        else:
            values = values[..., 0]
        out[start * row_factor : stop * row_factor] = values
    return out


def decompress_constexpr(op_type: str, inputs: dict[str, Any], out_dtypes: list[np.dtype], op) -> tuple:
    """Materialize one constexpr op (of the kinds the build emits) from its materialized inputs."""
    if op_type == "constexpr_lut_to_dense" and "shape" not in inputs:  # iOS18 form
        vector_axis = inputs.get("vector_axis")
        return (lut_to_dense(inputs["indices"], inputs["lut"], None if vector_axis is None else int(vector_axis)),)
    if op_type == "constexpr_blockwise_shift_scale":
        data, scale = inputs["data"], inputs["scale"]
        return (_block_repeat_multiply(data, scale, inputs.get("offset"), out_dtypes[0]),)
    raise NotImplementedError(
        f"constexpr op {op_type!r} ({op.name!r}) is not supported by the evaluator "
        "(the build emits iOS18 constexpr_lut_to_dense and constexpr_blockwise_shift_scale)"
    )
