"""The traffic model: bytes one decode call of a function moves (docs/audit.md).

Every op of the function is visited once, in program order, and charged for what it
reads and writes; each value remembers where its bytes live:

- weight: a `const`, or a `constexpr_*` output. A constexpr op's dense output is NOT an
  intermediate: the device decompresses it on the fly, so a reader is charged the bytes
  of the constexpr's stored inputs (indices + LUT, data + scales, ...), never the dense size.
- state: a view of a state buffer (`read_state`, or a row update written in place).
- input: a function input.
- intermediate: anything a compute op writes.

Views move nothing: reshape, squeeze, expand_dims, identity, split, read_state, and
slices with constant bounds produce a value that aliases their input; whoever reads the
view is charged the bytes the view covers (a slice of a weight: its share of the stored
bytes). Every other op is a compute op: it reads each distinct input once (gathers and
runtime-bounded slices read only the rows they return) and writes each output once, as an
intermediate; an intermediate is charged again at every op that reads it.

State updates:
- `slice_update` whose `x` is the whole state buffer and whose result flows (through
  views and further row updates) into a write of that same state is an in-place row
  write: it is charged the bytes of its `update` only, and its result is the state buffer.
  That is how coremltools' own state passes and the device runtime treat ANEMLL's
  identical pattern (DESIGN section 3); in the MIL each such op keeps the full state shape.
- a state write (`write_state`, or `coreml_update_state`) of a value that is not that
  in-place chain (the blend mode's stacked cache) reads the value and writes the whole
  state: a full-state write.

What the model does not know (docs/audit.md, "Limits"): operator fusion (the ANE compiler
keeps some elementwise chains on chip, so intermediates are an upper bound), caches
(a value read twice is charged twice), tiling and padding (bytes are at the tensors' own
dtypes, unpadded), and whether the runtime really updates in place (it assumes it does).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from .program import CONSTEXPR_PREFIX, Constant, Function, TensorType, walk

VIEW_OPS = frozenset({"reshape", "squeeze", "expand_dims", "identity", "split", "read_state"})
SLICE_OPS = frozenset({"slice_by_index", "slice_by_size"})
SLICE_BOUNDS = ("begin", "end", "size", "stride")
GATHER_OPS = frozenset({"gather", "gather_nd", "gather_along_axis"})
STATE_WRITE_OPS = {"write_state": ("input", "data"), "coreml_update_state": ("state", "value")}
# The parameter holding the tensor a view aliases, where it is not "x".
VIEW_SOURCE = {"read_state": "input"}

WEIGHT, STATE, INPUT, INTERMEDIATE = "weight", "state", "input", "intermediate"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a value's bytes live and what reading all of it costs."""

    kind: str               # WEIGHT, STATE, INPUT or INTERMEDIATE
    read_bytes: float       # bytes moved by reading the whole value
    root: tuple = ()        # WEIGHT: constant keys; STATE: (state name,)
    whole_state: bool = False  # STATE: the view covers the whole buffer


@dataclasses.dataclass
class Traffic:
    """Bytes one call of a function moves, by category."""

    weights_read: float = 0.0
    state_read: float = 0.0
    state_written: float = 0.0
    intermediate_written: float = 0.0
    intermediate_read: float = 0.0
    io: float = 0.0                     # function inputs read
    in_place_row_writes: int = 0        # slice_update ops charged as row writes
    full_state_writes: int = 0          # state writes charged the whole state
    by_op: Counter = dataclasses.field(default_factory=Counter)  # op type -> bytes it was charged

    @property
    def intermediates(self) -> float:
        return self.intermediate_written + self.intermediate_read

    @property
    def total(self) -> float:
        return (self.weights_read + self.state_read + self.state_written + self.intermediates + self.io)

    def add(self, other: "Traffic") -> None:
        for field in ("weights_read", "state_read", "state_written", "intermediate_written", "intermediate_read",
                      "io", "in_place_row_writes", "full_state_writes"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.by_op.update(other.by_op)

    def to_dict(self) -> dict:
        return {"weights_read": round(self.weights_read), "state_read": round(self.state_read),
                "state_written": round(self.state_written),
                "intermediate_written": round(self.intermediate_written),
                "intermediate_read": round(self.intermediate_read), "io": round(self.io),
                "total": round(self.total), "in_place_row_writes": self.in_place_row_writes,
                "full_state_writes": self.full_state_writes}


def is_runtime(argument) -> bool:
    """A var name that is not a constant of the function is computed at run time."""
    return isinstance(argument, str)


class _Model:
    def __init__(self, function: Function):
        self.function = function
        self.sources: dict[str, Source] = {}
        self.traffic = Traffic()
        self.flows_to_write = _values_flowing_into_state_writes(function)
        for name, tensor_type in function.inputs.items():
            self.sources[name] = Source(INPUT, tensor_type.nbytes)
        for name, tensor_type in function.states.items():
            self.sources[name] = Source(STATE, tensor_type.nbytes, (name,), whole_state=True)

    # -- what a value costs to read -----------------------------------------------------
    def type_of(self, argument) -> TensorType | None:
        if isinstance(argument, Constant):
            return argument.type
        constant = self.function.constants.get(argument)
        return constant.type if constant is not None else self.function.types.get(argument)

    def source(self, argument) -> Source:
        if isinstance(argument, Constant):
            return Source(WEIGHT, argument.stored_bytes, (argument.key,))
        constant = self.function.constants.get(argument)
        if constant is not None:
            return Source(WEIGHT, constant.stored_bytes, (constant.key,))
        if argument not in self.sources:   # a value from outside this block: charge it as an intermediate
            tensor_type = self.function.types.get(argument)
            self.sources[argument] = Source(INTERMEDIATE, tensor_type.nbytes if tensor_type else 0)
        return self.sources[argument]

    def read(self, argument, op_type: str, share: float = 1.0) -> None:
        source = self.source(argument)
        cost = source.read_bytes * min(share, 1.0)
        if source.kind == WEIGHT:
            self.traffic.weights_read += cost
        elif source.kind == STATE:
            self.traffic.state_read += cost
        elif source.kind == INPUT:
            self.traffic.io += cost
        else:
            self.traffic.intermediate_read += cost
        self.traffic.by_op[op_type] += cost

    def write(self, name: str, tensor_type: TensorType | None, op_type: str) -> None:
        size = tensor_type.nbytes if tensor_type is not None else 0
        self.sources[name] = Source(INTERMEDIATE, size)
        self.traffic.intermediate_written += size
        self.traffic.by_op[op_type] += size

    # -- the ops ------------------------------------------------------------------------
    def visit(self, op) -> None:
        if op.type.startswith(CONSTEXPR_PREFIX):
            self.constexpr(op)
        elif op.type in VIEW_OPS or (op.type in SLICE_OPS and not self.runtime_bounds(op)):
            self.view(op)
        elif op.type in STATE_WRITE_OPS:
            self.state_write(op)
        elif op.type == "slice_update" and self.in_place(op):
            self.row_write(op)
        else:
            self.compute(op)

    def runtime_bounds(self, op) -> bool:
        return any(is_runtime(a) and a not in self.function.constants
                   for p in SLICE_BOUNDS for a in op.inputs.get(p, []))

    def constexpr(self, op) -> None:
        """Decompressed on the fly: readers pay the stored inputs, nothing is written."""
        keys, stored = [], 0.0
        for arguments in op.inputs.values():
            for argument in arguments:
                source = self.source(argument)
                keys.extend(source.root)
                stored += source.read_bytes
        for name, _ in op.outputs:
            self.sources[name] = Source(WEIGHT, stored, tuple(keys))

    def view(self, op) -> None:
        parameter = VIEW_SOURCE.get(op.type, "x")
        argument = op.argument(parameter)
        if argument is None:
            return self.compute(op)
        source = self.source(argument)
        in_type = self.type_of(argument)
        for name, out_type in op.outputs:
            share = _share(out_type, in_type) if op.type in SLICE_OPS | {"split"} else 1.0
            self.sources[name] = dataclasses.replace(
                source, read_bytes=source.read_bytes * share,
                whole_state=source.whole_state and share == 1.0)

    def compute(self, op) -> None:
        x_parameter = "x" if op.type in GATHER_OPS or op.type in SLICE_OPS else None
        seen = set()
        for parameter, arguments in op.inputs.items():
            for argument in arguments:
                key = argument.key if isinstance(argument, Constant) else argument
                if key in seen:
                    continue
                seen.add(key)
                share = 1.0
                if parameter == x_parameter and op.outputs:   # only the rows returned are read
                    share = _share(op.outputs[0][1], self.type_of(argument))
                self.read(argument, op.type, share)
        for name, out_type in op.outputs:
            self.write(name, out_type, op.type)
        for block in op.blocks:
            for nested in block:
                self.visit(nested)

    def in_place(self, op) -> bool:
        x = op.argument("x")
        if x is None or not is_runtime(x) or x in self.function.constants:
            return False
        source = self.source(x)
        if source.kind != STATE or not source.whole_state:
            return False
        return op.outputs and op.outputs[0][0] in self.flows_to_write.get(source.root[0], set())

    def row_write(self, op) -> None:
        source = self.source(op.argument("x"))
        for parameter, arguments in op.inputs.items():
            if parameter == "x":
                continue
            for argument in arguments:
                if parameter == "update":
                    update_type = self.type_of(argument)
                    written = update_type.nbytes if update_type is not None else 0
                    self.traffic.state_written += written
                    self.traffic.by_op[op.type] += written
                self.read(argument, op.type)
        self.traffic.in_place_row_writes += 1
        for name, _ in op.outputs:
            self.sources[name] = source

    def state_write(self, op) -> None:
        state_parameter, value_parameter = STATE_WRITE_OPS[op.type]
        state, value = op.argument(state_parameter), op.argument(value_parameter)
        value_source = self.source(value)
        if value_source.kind == STATE and value_source.root == (state,) and value_source.whole_state:
            result = value_source          # the in-place chain already wrote its rows
        else:
            self.read(value, op.type)
            state_type = self.function.states.get(state)
            written = state_type.nbytes if state_type is not None else 0
            self.traffic.state_written += written
            self.traffic.by_op[op.type] += written
            self.traffic.full_state_writes += 1
            result = self.source(state)
        for name, _ in op.outputs:
            self.sources[name] = result

    def finish(self) -> Traffic:
        # Outputs were charged as written by the ops that made them; the next dispatch
        # pays for reading them as its inputs.
        return self.traffic


def _share(part: TensorType | None, whole: TensorType | None) -> float:
    if part is None or whole is None or whole.numel == 0:
        return 1.0
    return min(1.0, part.numel / whole.numel)


def _values_flowing_into_state_writes(function: Function) -> dict[str, set]:
    """state name -> values that reach a write of that state through views and
    `slice_update` x inputs only (the chain a runtime can run in place)."""
    producers = {}
    for op in walk(function.operations):
        for name, _ in op.outputs:
            producers[name] = op
    flows: dict[str, set] = {}
    for op in walk(function.operations):
        if op.type not in STATE_WRITE_OPS:
            continue
        state_parameter, value_parameter = STATE_WRITE_OPS[op.type]
        state, value = op.argument(state_parameter), op.argument(value_parameter)
        marked = flows.setdefault(state, set())
        todo = [value]
        while todo:
            name = todo.pop()
            if not is_runtime(name) or name in marked:
                continue
            marked.add(name)
            producer = producers.get(name)
            if producer is None:
                continue
            if producer.type == "slice_update" or producer.type in VIEW_OPS - {"read_state"}:
                todo.append(producer.argument("x"))
            elif producer.type in STATE_WRITE_OPS:   # read_state after a write: same buffer
                todo.append(producer.argument(STATE_WRITE_OPS[producer.type][1]))
    return flows


def function_traffic(function: Function) -> Traffic:
    """Bytes one call of `function` moves under the model above."""
    model = _Model(function)
    for op in function.operations:
        model.visit(op)
    return model.finish()
