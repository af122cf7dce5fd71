"""PackageEvaluator: run one function of a saved .mlpackage with numpy.

Load time (once): the function is loaded from disk, constants and constexpr ops are
materialized, ops whose inputs are all constant are folded, and every remaining op becomes
a step: a closure over its constant parameters plus the slot numbers of its run-time
inputs and outputs. A call to `predict` is then a loop over steps reading and writing a
flat list of slots, with no MIL objects involved.

State semantics follow Core ML: `read_state` returns the state's current value,
`coreml_update_state` overwrites the state (in the caller's array, in place) and returns
the written value. A read whose value (or a view of it) is still used after a later
update of the same state gets a private copy; otherwise it aliases the state array.
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

from .loader import Interface, LoadedFunction, load_function
from .ops import (
    CHUNKED_ELEMENTWISE_MIN_ELEMENTS,
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

# Ops whose result may be a view of (share memory with) their first input; used to decide
# which state reads need a private copy.
_VIEW_OPS = frozenset(
    {"reshape", "expand_dims", "squeeze", "flatten2d", "transpose", "slice_by_index", "slice_by_size", "split", "identity", "cast"}
)
_STATE_OPS = frozenset({"read_state", "coreml_update_state"})
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


def _value_inference_kernel(op, package_path) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """Fallback for ops without a kernel here: call coremltools' own value_inference with
    the run-time values substituted into the op's input vars."""
    names = []
    for name, var in op.inputs.items():
        if isinstance(var, (list, tuple)):
            if any(v.val is None for v in var):
                raise NotImplementedError(
                    f"{package_path}: op type {op.op_type!r} ({op.name!r}) has a variadic run-time input; "
                    "the evaluator has no kernel for it"
                )
        elif var is not None and var.val is None:
            names.append(name)

    def run(*values):
        saved = []
        try:
            for name, value in zip(names, values):
                var = op.inputs[name]
                saved.append((var, var._sym_val))
                symbolic_value = var.sym_type()
                symbolic_value.val = value
                var._sym_val = symbolic_value
            result = op.value_inference()
        finally:
            for var, previous in saved:
                var._sym_val = previous
        if result is None:
            raise NotImplementedError(
                f"{package_path}: op type {op.op_type!r} ({op.name!r}): coremltools' value_inference "
                "gave no value for these inputs"
            )
        return result

    return run, tuple(names)


class _Planner:
    """Turns a loaded MIL function into initial slots and a list of steps."""

    def __init__(self, loaded: LoadedFunction):
        self.loaded = loaded
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

    def _slot(self, var, widened: bool) -> int:
        key = id(var)
        if key in self.const_values:
            value = self.const_values[key]
            if widened and isinstance(value, np.ndarray) and value.dtype == FLOAT16:
                if key not in self.widened_slot_of:
                    self.widened_slot_of[key] = self._new_slot(widen(value))
                return self.widened_slot_of[key]
            if key not in self.slot_of:
                self.slot_of[key] = self._new_slot(value)
            return self.slot_of[key]
        if key not in self.slot_of:
            raise RuntimeError(f"{self.package}: var {var.name!r} is used before it is computed")
        return self.slot_of[key]

    def _set_const(self, var, value: Any) -> None:
        if isinstance(value, str):
            self.const_values[id(var)] = value
            return
        self.const_values[id(var)] = to_dtype(value, numpy_dtype(var.dtype))

    def const_value(self, var) -> Any:
        return self.const_values.get(id(var))

    # -- ops --------------------------------------------------------------------------

    def build(self) -> None:
        for var in self.function.inputs.values():
            self.slot_of[id(var)] = self._new_slot()
        state_copy_needed = self._state_reads_needing_copy()
        with np.errstate(all="ignore"):
            for position, op in enumerate(self.operations):
                if op.op_type == "const":
                    self._set_const(op.outputs[0], op.outputs[0].val)
                elif op.op_type.startswith("constexpr_"):
                    self._materialize_constexpr(op)
                elif op.op_type == "read_state":
                    self._add_read_state(op, copy=position in state_copy_needed)
                elif op.op_type == "coreml_update_state":
                    self._add_update_state(op)
                else:
                    self._add_op(op)
        self._plan_releases()

    def _materialize_constexpr(self, op) -> None:
        inputs = {}
        for name, var in op.inputs.items():
            if var is None:
                continue
            value = self.const_value(var)
            if value is None:
                raise NotImplementedError(f"{self.package}: {op.op_type} {op.name!r} has a non-constant input {name!r}")
            inputs[name] = value
        out_dtypes = [numpy_dtype(out.dtype) for out in op.outputs]
        values = decompress_constexpr(op.op_type, inputs, out_dtypes, op)
        for out, value in zip(op.outputs, values):
            self._set_const(out, value)
            self.constexpr_bytes += self.const_values[id(out)].nbytes

    def _add_read_state(self, op, copy: bool) -> None:
        run = (lambda state: state.copy()) if copy else (lambda state: state)
        self._add_step(op, run, (self._slot(op.inputs["input"], widened=False),))

    def _add_update_state(self, op) -> None:
        def run(state, value):
            np.copyto(state, value)
            return value

        args = (self._slot(op.inputs["state"], widened=False), self._slot(op.inputs["value"], widened=False))
        self._add_step(op, run, args)

    def _add_op(self, op) -> None:
        kernel = KERNELS.get(op.op_type)
        if kernel is not None:
            run, names = kernel.build(OpContext(op, self.const_value))
            computes, deterministic = kernel.computes, kernel.deterministic
        else:
            run, names = self._fallback(op)
            computes, deterministic = False, True

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

        if all_const and deterministic:
            self._fold(op, run, args)
            return
        out_shape = tuple(int(d) for d in op.outputs[0].shape)
        if (
            kernel is not None
            and kernel.elementwise
            and numpy_dtype(op.outputs[0].dtype) == FLOAT16
            and math.prod(out_shape) >= CHUNKED_ELEMENTWISE_MIN_ELEMENTS
        ):
            input_shapes = [
                None if op.inputs.get(name) is None else tuple(int(d) for d in op.inputs[name].shape) for name in names
            ]
            run = chunked_elementwise(run, input_shapes, out_shape, FLOAT16)
        self._add_step(op, run, tuple(args))

    def _fallback(self, op):
        from coremltools.converters.mil.mil.operation import Operation

        if type(op).value_inference is Operation.value_inference:
            raise NotImplementedError(
                f"{self.loaded.package_path}: op type {op.op_type!r} ({op.name!r}) is not supported by the evaluator"
            )
        logger.debug("%s: %s %r runs through coremltools' value_inference", self.package, op.op_type, op.name)
        return _value_inference_kernel(op, self.loaded.package_path)

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

    def _state_reads_needing_copy(self) -> set[int]:
        """Positions of read_state ops whose value outlives a later update of that state."""
        last_use = self._use_positions()
        needing_copy = set()
        for position, op in enumerate(self.operations):
            if op.op_type != "read_state":
                continue
            state = op.inputs["input"]
            later_updates = [
                p
                for p, other in enumerate(self.operations)
                if p > position and other.op_type == "coreml_update_state" and other.inputs["state"] is state
            ]
            # Every var that may share memory with this read: the read and its views.
            aliases, frontier = [], [op.outputs[0]]
            while frontier:
                var = frontier.pop()
                aliases.append(var)
                for child in var.child_ops:
                    if child.op_type in _VIEW_OPS and child.inputs.get("x") is var:
                        frontier.extend(child.outputs)
            latest_use = max(last_use.get(id(var), position) for var in aliases)
            if latest_use == _AFTER_LAST_OP or (later_updates and latest_use > later_updates[0]):
                needing_copy.add(position)
        return needing_copy

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
    ):
        """blas_threads: OpenBLAS threads during predict (None: leave numpy's setting alone)."""
        started = time.perf_counter()
        self.blas_threads = blas_threads
        loaded = load_function(package_path, function_name)
        self.package_path = loaded.package_path
        self.function_name = loaded.function_name
        self.inputs: Interface = loaded.inputs
        self.outputs: Interface = loaded.outputs
        self.states: Interface = loaded.states
        self._label = f"{self.package_path.name}:{self.function_name}"

        planner = _Planner(loaded)
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
