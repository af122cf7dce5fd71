"""PackageEvaluator: run one function of a saved .mlpackage with numpy.

Load time (once): the function is loaded from disk, constants and constexpr ops are
materialized, ops whose inputs are all constant are folded, and every remaining op becomes
a step: a closure over its constant parameters plus the slot numbers of its run-time
inputs and outputs. A call to `predict` is then a loop over steps reading and writing a
flat list of slots, with no MIL objects involved.

State semantics follow Core ML: `read_state` returns the state's current value,
`coreml_update_state` overwrites the state (in the caller's array, in place) and returns
the written value. Copies are made only where the program could tell (decided once, at
load, from op order: `_BufferPlan`):
- a read aliases the state array unless its value (or a view of it) is used after the
  next update of that state;
- `slice_update` writes into its input's array when nothing reads the old contents
  afterwards (and, for a state array, when the next thing done to that state is an
  update, so the early write is never seen);
- an update whose value already is the state array copies nothing, and returns the state
  array itself when its result is not used after the next update of that state.
So a KV row write (read_state -> slice_update -> coreml_update_state per row) costs a
row, not a copy of the cache.

An op without a kernel in ops.KERNELS is refused at load (NotImplementedError naming the
op and the package): the evaluator runs exactly the ops the build emits, with its own
kernels, and never borrows coremltools' value_inference (it must not depend on what it
checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .loader import Interface, LoadedFunction, load_functions
from .ops import (
    CHUNKED_ELEMENTWISE_MIN_ELEMENTS,
    ENGINE_OP_TYPES,
    FLOAT16,
    KERNELS,
    OpContext,
    chunked_elementwise,
    decompress_constexpr,
    numpy_dtype,
    to_dtype,
    widen,
)

logger = logging.getLogger(__name__)

# Ops whose result may be a view of (share memory with) their input `x` (_BufferPlan).
_VIEW_OPS = frozenset({"reshape", "slice_by_index", "slice_by_size", "identity", "cast"})
_NONE_SLOT = 0  # slot 0 always holds None: the value of an omitted optional input
_AFTER_LAST_OP = math.inf


# BLAS threads used by predict(). One thread is the robust choice on the 2 shared cores
# these builds run on: with other processes busy, OpenBLAS's 2-thread gemv spun against
# them and ran 2-8x slower than 1 thread (measured: 6144x2048 gemv 11 ms vs 5 ms).
DEFAULT_BLAS_THREADS = 1


@functools.cache
def _openblas_thread_setter() -> Callable[[int], int] | None:
    """numpy's bundled OpenBLAS `openblas_set_num_threads_local` (per calling thread)."""
    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*.so*"))):
        setter = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
        if setter is not None:
            setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
            return setter
    logger.warning("numpy's OpenBLAS has no openblas_set_num_threads_local; BLAS threads are left as they are")
    return None


@contextlib.contextmanager
def _blas_threads(count: int | None):
    setter = _openblas_thread_setter() if count is not None else None
    if setter is None:
        yield
        return
    previous = setter(count)
    try:
        yield
    finally:
        setter(previous)


class _Step:
    __slots__ = ("run", "args", "outs", "dtypes", "shapes", "release", "op_type", "op_name")

    def __init__(self, run, args, outs, dtypes, shapes, op_type, op_name):
        self.run = run
        self.args = args  # per argument: a slot number, or a tuple of slot numbers (variadic)
        self.outs = outs
        self.dtypes = dtypes
        self.shapes = shapes
        self.release: tuple[int, ...] = ()
        self.op_type = op_type
        self.op_name = op_name


class _BufferPlan:
    """Which arrays may be shared or written in place, decided once from op order.

    Every var gets a buffer: ("state", id(state)) for the caller's state array,
    ("const",), ("input", id) or ("fresh", id(var)) for an array an op made. View ops
    (_VIEW_OPS) and in-place writes give their output their input's buffer. Two rules:
    - a var on a state's buffer is valid until the next update of that state (a copy
      into the buffer): it and its views must not be used after it;
    - an in-place write into buffer B at position p needs every var already on B to be
      used no later than p (nobody reads the old contents), and, when B is a state's
      array, the next op on that state to be an update (the early write is never read,
      and never left behind at the end of the call).
    Results: read_copies (positions of read_state ops that copy), in_place (positions of
    slice_update ops writing into their input), update_returns_state (positions of
    coreml_update_state ops returning the state array rather than the value) and
    update_copies (updates returning a copy: their value is a state array that changes
    while the result is still used).
    """

    def __init__(self, operations, function, last_use: dict[int, float]):
        self.operations, self.last_use = operations, last_use
        self.read_copies: set[int] = set()
        self.in_place: set[int] = set()
        self.update_returns_state: set[int] = set()
        self.update_copies: set[int] = set()
        self.state_ops: dict[int, list[tuple[int, str]]] = {}  # id(state) -> [(position, "read" | "update")]
        for position, op in enumerate(operations):
            if op.op_type == "read_state":
                self.state_ops.setdefault(id(op.inputs["input"]), []).append((position, "read"))
            elif op.op_type == "coreml_update_state":
                self.state_ops.setdefault(id(op.inputs["state"]), []).append((position, "update"))
        self.buffer: dict[int, tuple] = {id(var): ("input", id(var)) for var in function.inputs.values()}
        self.members: dict[tuple, list] = {}  # buffer -> vars on it so far
        for position, op in enumerate(operations):
            self._visit(position, op)

    # -- helpers ------------------------------------------------------------------------
    def _next_state_op(self, state: int, position: int) -> tuple[float, str]:
        for other, kind in self.state_ops.get(state, ()):
            if other > position:
                return other, kind
        return _AFTER_LAST_OP, "end"

    def _next_update(self, state: int, position: int) -> float:
        return next((other for other, kind in self.state_ops.get(state, ()) if other > position and kind == "update"),
                    _AFTER_LAST_OP)

    def _latest_use(self, var, position: int) -> float:
        """Last use of `var` or of any view made of it (views of views included)."""
        latest, frontier = self.last_use.get(id(var), position), [var]
        while frontier:
            current = frontier.pop()
            latest = max(latest, self.last_use.get(id(current), position))
            for child in current.child_ops:
                if child.op_type in _VIEW_OPS and child.inputs.get("x") is current:
                    frontier.extend(child.outputs)
        return latest

    def _valid_on_state(self, var, state: int, position: int) -> bool:
        return self._latest_use(var, position) <= self._next_update(state, position)

    def _folds(self, op) -> bool:
        """The engine folds an op whose inputs are all constant: its result is a constant too."""
        if op.op_type in ("read_state", "coreml_update_state"):
            return False
        inputs = [v for var in op.inputs.values() for v in (var if isinstance(var, (list, tuple)) else (var,))]
        return all(self.buffer.get(id(v)) == ("const",) for v in inputs if v is not None)

    def _assign(self, var, buffer: tuple) -> None:
        self.buffer[id(var)] = buffer
        self.members.setdefault(buffer, []).append(var)

    # -- one op -------------------------------------------------------------------------
    def _visit(self, position: int, op) -> None:
        kind = op.op_type
        if kind == "const" or kind.startswith("constexpr_") or self._folds(op):
            for out in op.outputs:
                self._assign(out, ("const",))
        elif kind == "read_state":
            state = id(op.inputs["input"])
            if self._valid_on_state(op.outputs[0], state, position):
                self._assign(op.outputs[0], ("state", state))
            else:
                self.read_copies.add(position)
                self._assign(op.outputs[0], ("fresh", id(op.outputs[0])))
        elif kind == "coreml_update_state":
            state, out = id(op.inputs["state"]), op.outputs[0]
            value_buffer = self.buffer.get(id(op.inputs["value"]), ("fresh", id(out)))
            if self._valid_on_state(out, state, position):
                self.update_returns_state.add(position)
                self._assign(out, ("state", state))
            elif value_buffer[0] == "state" and not self._valid_on_state(out, value_buffer[1], position):
                self.update_copies.add(position)  # the value is a state array that changes before its last use
                self._assign(out, ("fresh", id(out)))
            else:
                self._assign(out, value_buffer)
        elif kind == "slice_update" and self._may_write_in_place(position, op):
            self.in_place.add(position)
            self._assign(op.outputs[0], self.buffer[id(op.inputs["x"])])
        elif kind in _VIEW_OPS and op.inputs.get("x") is not None and id(op.inputs["x"]) in self.buffer:
            for out in op.outputs:
                self._assign(out, self.buffer[id(op.inputs["x"])])
        else:
            for out in op.outputs:
                self._assign(out, ("fresh", id(out)))

    def _may_write_in_place(self, position: int, op) -> bool:
        buffer = self.buffer.get(id(op.inputs["x"]))
        if buffer is None or buffer[0] not in ("fresh", "state"):
            return False  # constants and the caller's inputs are never written
        if any(self.last_use.get(id(var), position) > position for var in self.members.get(buffer, ())):
            return False  # someone reads the old contents later
        if buffer[0] == "state":
            state = buffer[1]
            if self._next_state_op(state, position)[1] != "update":
                return False  # the early write would be read, or left in the state
            if not self._valid_on_state(op.outputs[0], state, position):
                return False
        return True


class ConstantPool:
    """Constants decoded for one package, shared by the evaluators of its functions.

    Keyed by loader.constant_keys: a weight that decode and prefill (or embed and lm_head)
    store once is decoded once, and its fp32 copy for arithmetic made once, whichever
    function asks first. (The device maps the blob once too.)"""

    def __init__(self):
        self.values: dict = {}    # key -> value in the declared dtype
        self.widened: dict = {}   # key -> fp32 copy

    def value(self, key, make: Callable[[], Any]) -> Any:
        if key is None:
            return make()
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]

    def widen(self, key, value: np.ndarray) -> np.ndarray:
        if key is None:
            return widen(value)
        if key not in self.widened:
            self.widened[key] = widen(value)
        return self.widened[key]


class _Planner:
    """Turns a loaded MIL function into initial slots and a list of steps."""

    def __init__(self, loaded: LoadedFunction, pool: ConstantPool | None = None):
        self.loaded = loaded
        self.pool = pool or ConstantPool()
        self.package = f"{loaded.package_path.name}:{loaded.function_name}"
        self.function = loaded.function
        self.operations = list(self.function.operations)
        self.slots: list[Any] = [None]  # slot 0 is _NONE_SLOT
        self.slot_of: dict[int, int] = {}  # id(var) -> slot with the value in its declared dtype
        self.widened_slot_of: dict[int, int] = {}  # id(var) -> slot with an fp32 copy of a constant
        self.const_values: dict[int, Any] = {}  # id(var) -> constant value (declared dtype)
        self.steps: list[_Step] = []
        self.constexpr_bytes = 0
        self.folded = 0

    # -- slots ------------------------------------------------------------------------

    def _new_slot(self, value: Any = None) -> int:
        self.slots.append(value)
        return len(self.slots) - 1

    def _constant_key(self, var):
        return self.loaded.constant_keys.get(var.name)

    def _slot(self, var, widened: bool) -> int:
        key = id(var)
        if key in self.const_values:
            value = self.const_values[key]
            if widened and isinstance(value, np.ndarray) and value.dtype == FLOAT16:
                if key not in self.widened_slot_of:
                    self.widened_slot_of[key] = self._new_slot(self.pool.widen(self._constant_key(var), value))
                return self.widened_slot_of[key]
            if key not in self.slot_of:
                self.slot_of[key] = self._new_slot(value)
            return self.slot_of[key]
        if key not in self.slot_of:
            raise RuntimeError(f"{self.package}: var {var.name!r} is used before it is computed")
        return self.slot_of[key]

    def _set_const(self, var, value: Any, key=None) -> None:
        if isinstance(value, str):
            self.const_values[id(var)] = value
            return
        self.const_values[id(var)] = self.pool.value(key, lambda: to_dtype(value, numpy_dtype(var.dtype)))

    def const_value(self, var) -> Any:
        return self.const_values.get(id(var))

    # -- ops --------------------------------------------------------------------------

    def build(self) -> None:
        for var in self.function.inputs.values():
            self.slot_of[id(var)] = self._new_slot()
        plan = _BufferPlan(self.operations, self.function, self._use_positions())
        self.buffer_counts = {"in_place_writes": len(plan.in_place), "state_read_copies": len(plan.read_copies),
                              "update_copies": len(plan.update_copies)}
        with np.errstate(all="ignore"):
            for position, op in enumerate(self.operations):
                if op.op_type == "const":
                    self._set_const(op.outputs[0], op.outputs[0].val, self._constant_key(op.outputs[0]))
                elif op.op_type.startswith("constexpr_"):
                    self._materialize_constexpr(op)
                elif op.op_type == "read_state":
                    self._add_read_state(op, copy=position in plan.read_copies)
                elif op.op_type == "coreml_update_state":
                    result = ("state" if position in plan.update_returns_state
                              else "copy" if position in plan.update_copies else "value")
                    self._add_update_state(op, result)
                else:
                    self._add_op(op, in_place=position in plan.in_place)
        self._plan_releases()

    def _materialize_constexpr(self, op) -> None:
        if op.op_type not in ENGINE_OP_TYPES:
            raise NotImplementedError(
                f"{self.loaded.package_path}: constexpr op type {op.op_type!r} ({op.name!r}) is not supported; "
                f"the evaluator decodes the kinds the build emits ({', '.join(sorted(ENGINE_OP_TYPES))})"
            )
        inputs = {}
        for name, var in op.inputs.items():
            if var is None:
                continue
            value = self.const_value(var)
            if value is None:
                raise NotImplementedError(f"{self.package}: {op.op_type} {op.name!r} has a non-constant input {name!r}")
            inputs[name] = value
        keys = [self.loaded.constant_keys.get(out.name) for out in op.outputs]
        if all(key is not None and key in self.pool.values for key in keys):  # another function decoded it
            for out, key in zip(op.outputs, keys):
                self.const_values[id(out)] = self.pool.values[key]
            return
        out_dtypes = [numpy_dtype(out.dtype) for out in op.outputs]
        values = decompress_constexpr(op.op_type, inputs, out_dtypes, op)
        for out, value, key in zip(op.outputs, values, keys):
            self._set_const(out, value, key)
            self.constexpr_bytes += self.const_values[id(out)].nbytes

    def _add_read_state(self, op, copy: bool) -> None:
        run = (lambda state: state.copy()) if copy else (lambda state: state)
        self._add_step(op, run, (self._slot(op.inputs["input"], widened=False),))

    def _add_update_state(self, op, result: str) -> None:
        """result: what the update returns: "state" (the state array), "value", or "copy"."""
        def run(state, value):
            if value is not state:  # a value written in place already is the state array
                np.copyto(state, value)
            if result == "state":
                return state
            return value.copy() if result == "copy" else value

        args = (self._slot(op.inputs["state"], widened=False), self._slot(op.inputs["value"], widened=False))
        self._add_step(op, run, args)

    def _add_op(self, op, in_place: bool = False) -> None:
        kernel = KERNELS.get(op.op_type)
        if kernel is None:
            raise NotImplementedError(
                f"{self.loaded.package_path}: op type {op.op_type!r} ({op.name!r}) has no evaluator kernel; "
                "the evaluator runs the ops the build emits (qwen3build/evaluator/ops.py KERNELS)"
            )
        run, names = kernel.build(OpContext(op, self.const_value, in_place=in_place))
        computes = kernel.computes

        args = []
        all_const = True
        for name in names:
            var = op.inputs.get(name)
            if var is None:
                args.append(_NONE_SLOT)
            elif isinstance(var, (list, tuple)):
                args.append(tuple(self._slot(v, computes) for v in var))
                all_const &= all(self.const_value(v) is not None for v in var)
            else:
                args.append(self._slot(var, computes))
                all_const &= self.const_value(var) is not None

        if all_const:
            self._fold(op, run, args)
            return
        out_shape = tuple(int(d) for d in op.outputs[0].shape)
        if (
            kernel.elementwise
            and numpy_dtype(op.outputs[0].dtype) == FLOAT16
            and math.prod(out_shape) >= CHUNKED_ELEMENTWISE_MIN_ELEMENTS
        ):
            input_shapes = [
                None if op.inputs.get(name) is None else tuple(int(d) for d in op.inputs[name].shape) for name in names
            ]
            run = chunked_elementwise(run, input_shapes, out_shape, FLOAT16)
        self._add_step(op, run, tuple(args))

    def _fold(self, op, run, args) -> None:
        values = [self.slots[a] if isinstance(a, int) else [self.slots[s] for s in a] for a in args]
        result = run(*values)
        results = result if isinstance(result, tuple) else (result,)
        for out, value in zip(op.outputs, results):
            self._set_const(out, value)
        self.folded += 1

    def _add_step(self, op, run, args) -> None:
        outs = tuple(self._new_slot() for _ in op.outputs)
        for out, slot in zip(op.outputs, outs):
            self.slot_of[id(out)] = slot
        dtypes = tuple(numpy_dtype(out.dtype) for out in op.outputs)
        shapes = tuple(tuple(int(d) for d in out.shape) for out in op.outputs)
        self.steps.append(_Step(run, args, outs, dtypes, shapes, op.op_type, op.name))

    # -- liveness -------------------------------------------------------------------------

    def _use_positions(self) -> dict[int, float]:
        """id(var) -> position of its last use (function outputs count as after the last op)."""
        last_use: dict[int, float] = {}
        for position, op in enumerate(self.operations):
            for var in op.inputs.values():
                for v in var if isinstance(var, (list, tuple)) else (var,):
                    if v is not None:
                        last_use[id(v)] = position
        for var in self.function.outputs:
            last_use[id(var)] = _AFTER_LAST_OP
        return last_use

    def _plan_releases(self) -> None:
        """Drop each intermediate right after the step that last reads it."""
        keep = set(self.slot_of[id(var)] for var in self.function.inputs.values())
        keep |= {self.slot_of[id(var)] for var in self.function.outputs if id(var) in self.slot_of}
        step_outputs = {slot for step in self.steps for slot in step.outs}
        last_reader: dict[int, int] = {}
        for index, step in enumerate(self.steps):
            for arg in step.args:
                for slot in arg if isinstance(arg, tuple) else (arg,):
                    last_reader[slot] = index
        releases: dict[int, list[int]] = {}
        for slot in step_outputs - keep:
            if slot in last_reader:
                releases.setdefault(last_reader[slot], []).append(slot)
        for index, slots in releases.items():
            self.steps[index].release = tuple(slots)


class PackageEvaluator:
    """Evaluate one function of a saved .mlpackage on the CPU with numpy.

    inputs / outputs / states: name -> (shape, numpy dtype), as declared in the package.
    """

    backend = "evaluator"

    def __init__(
        self,
        package_path: str | Path,
        function_name: str | None = None,
        *,
        blas_threads: int | None = DEFAULT_BLAS_THREADS,
        _loaded: LoadedFunction | None = None,
        _pool: ConstantPool | None = None,
    ):
        """blas_threads: OpenBLAS threads during predict (None: leave numpy's setting alone).
        Several functions of one package: PackageEvaluator.functions (one load, shared weights)."""
        started = time.perf_counter()
        self.blas_threads = blas_threads
        loaded = _loaded or next(iter(load_functions(package_path, [function_name]).values()))
        self.package_path = loaded.package_path
        self.function_name = loaded.function_name
        self.inputs: Interface = loaded.inputs
        self.outputs: Interface = loaded.outputs
        self.states: Interface = loaded.states
        self._label = f"{self.package_path.name}:{self.function_name}"

        planner = _Planner(loaded, _pool)
        planner.build()
        function = loaded.function
        self._input_slots = {name: planner.slot_of[id(var)] for name, var in function.inputs.items() if name in self.inputs}
        self._state_slots = {name: planner.slot_of[id(var)] for name, var in function.inputs.items() if name in self.states}
        self._output_slots = {}
        for var in function.outputs:
            if id(var) not in planner.slot_of and id(var) in planner.const_values:
                planner._slot(var, widened=False)  # an output that folded to a constant
            self._output_slots[var.name] = planner.slot_of[id(var)]
        missing = set(self.outputs) - set(self._output_slots)
        if missing:
            raise RuntimeError(f"{self._label}: declared outputs {sorted(missing)} are not produced by the program")
        self._initial_slots = planner.slots
        self._steps = planner.steps
        self.op_count = len(planner.operations)
        self.step_count = len(planner.steps)
        # How many slice_updates write in place, state reads copy, updates copy (_BufferPlan).
        self.buffer_counts = planner.buffer_counts
        logger.info(
            "evaluator %s: %d ops -> %d steps (%d folded, constexpr %.1f MB) in %.2f s",
            self._label,
            self.op_count,
            self.step_count,
            planner.folded,
            planner.constexpr_bytes / 1e6,
            time.perf_counter() - started,
        )
        # The MIL program is dropped here: only the slots and steps are kept.

    @classmethod
    def functions(cls, package_path: str | Path, function_names, *,
                  blas_threads: int | None = DEFAULT_BLAS_THREADS) -> dict[str, "PackageEvaluator"]:
        """Evaluators of several functions of one package (None: the default function),
        keyed by resolved name: the package is read once and every weight the functions
        share is decoded once (ConstantPool). Functions with a state of the same name take
        the same state dict (decode and prefill of a shard)."""
        pool = ConstantPool()
        loaded = load_functions(package_path, list(function_names))
        evaluators = {name: cls(package_path, name, blas_threads=blas_threads, _loaded=function, _pool=pool)
                      for name, function in loaded.items()}
        return evaluators

    def new_state(self) -> dict[str, np.ndarray]:
        """Zero-filled state arrays in their declared shapes and dtypes."""
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.states.items()}

    def state_arrays(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A snapshot of `state` (same surface as the Core ML backend's)."""
        return {name: np.array(state[name], copy=True) for name in self.states}

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise ValueError(f"{self._label}: unknown inputs {sorted(unknown)}; expected {sorted(self.inputs)}")
        checked = {}
        for name, (shape, dtype) in self.inputs.items():
            if name not in inputs:
                raise ValueError(f"{self._label}: missing input {name!r} (shape {shape}, {dtype})")
            value = np.asarray(inputs[name])
            if value.shape != shape:
                raise ValueError(f"{self._label}: input {name!r} has shape {value.shape}, expected {shape}")
            checked[name] = to_dtype(value, dtype)
        return checked

    def _check_state(self, state: dict[str, np.ndarray] | None) -> None:
        if not self.states:
            return
        if state is None:
            raise ValueError(f"{self._label}: stateful model needs state=; make one with new_state()")
        for name, (shape, dtype) in self.states.items():
            if name not in state:
                raise ValueError(f"{self._label}: missing state {name!r} (shape {shape}, {dtype})")
            value = state[name]
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
                got = f"{value.shape} {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"{self._label}: state {name!r} is {got}, expected a {shape} {dtype} array")
            if not value.flags.writeable:
                raise ValueError(f"{self._label}: state {name!r} is read-only; it is updated in place")

    def predict(
        self, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the function once; `state` arrays are updated in place."""
        checked = self._check_inputs(inputs)
        self._check_state(state)
        slots = list(self._initial_slots)
        for name, slot in self._input_slots.items():
            slots[slot] = checked[name]
        for name, slot in self._state_slots.items():
            slots[slot] = state[name]
        # fp16 overflow to inf is a result here, not an error.
        with np.errstate(all="ignore"), _blas_threads(self.blas_threads):
            for step in self._steps:
                args = [slots[a] if a.__class__ is int else [slots[s] for s in a] for a in step.args]
                try:
                    result = step.run(*args)
                except NotImplementedError:
                    raise
                except Exception as error:
                    raise RuntimeError(f"{self._label}: {step.op_type} {step.op_name!r} failed: {error}") from error
                results = result if result.__class__ is tuple else (result,)
                for slot, value, dtype, shape in zip(step.outs, results, step.dtypes, step.shapes):
                    value = to_dtype(value, dtype)
                    if value.shape != shape:
                        raise RuntimeError(
                            f"{self._label}: {step.op_type} {step.op_name!r} produced shape {value.shape}, "
                            f"declared {shape}"
                        )
                    slots[slot] = value
                for slot in step.release:
                    slots[slot] = None
        # Copies: an output must not alias a state array or a cached constant.
        return {name: np.array(slots[slot], copy=True) for name, slot in self._output_slots.items()}
