"""A saved package as the device compiles it: its ML Program protobuf, read without writing.

The audit reads the spec (qwen3build.evaluator.loader.read_spec: the read-only reader)
rather than loading the program into MIL with weights, for three reasons:
- "As stored" is exact: a constant's bytes come from its blob header in weight.bin (the
  sizes Core ML maps, sub-byte index packing included) or from its immediate value.
- Functions of one package that share a blob (io_model's embed and lm_head) point at the
  same weight.bin offset, so weights are counted once per package by offset.
- Nothing is decoded: no weight is read except the few float constants a rule inspects,
  so a 1.7B stack audits in seconds.

The op sequence is the proto's: state updates appear as `write_state` (+ `read_state`
when the updated value is used again), which is what the runtime executes; the MIL
loader would merge those pairs back into `coreml_update_state`. Both spellings are
understood by the traffic model.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np

# Bits per element of each MIL data type as stored (sub-byte types are packed).
DTYPE_BITS = {
    "BOOL": 8, "FLOAT8E4M3FN": 8, "FLOAT8E5M2": 8, "FLOAT16": 16, "FLOAT32": 32, "FLOAT64": 64, "BFLOAT16": 16,
    "INT4": 4, "INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64,
    "UINT1": 1, "UINT2": 2, "UINT3": 3, "UINT4": 4, "UINT6": 6, "UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64,
    "STRING": 0,
}
# Short names for reports ("fp16", "int32"), as the MIL dumps write them.
SHORT_DTYPE_NAMES = {"FLOAT16": "fp16", "FLOAT32": "fp32", "FLOAT64": "fp64", "BFLOAT16": "bf16"}
FLOAT_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64}
CONSTEXPR_PREFIX = "constexpr_"
# Core ML's blob storage (MILBlob): each blob has a 64-byte header at the offset the spec
# names: sentinel, data type, payload size in bytes, payload offset.
BLOB_SENTINEL = 0xDEADBEEF
BLOB_HEADER = struct.Struct("<IIQQ")
MODEL_PATH_PREFIX = "@model_path/"
MODEL_DATA_DIR = Path("Data") / "com.apple.CoreML"


@dataclasses.dataclass(frozen=True)
class TensorType:
    dtype: str                 # MIL data type name, e.g. "FLOAT16"
    shape: tuple               # ints; None for a dimension not known statically

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def static(self) -> bool:
        return all(d is not None for d in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(d if d is not None else 1 for d in self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor at its own data type (sub-byte types packed)."""
        return (self.numel * DTYPE_BITS.get(self.dtype, 0) + 7) // 8

    @property
    def short_dtype(self) -> str:
        return SHORT_DTYPE_NAMES.get(self.dtype, self.dtype.lower())

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"({dims}) {self.short_dtype}"


@dataclasses.dataclass(frozen=True)
class Constant:
    """A constant as stored: a blob in weight.bin or an immediate value in the spec."""

    key: tuple                 # ("blob", file, offset), or ("immediate", function, owner, slot)
    type: TensorType
    stored_bytes: int
    blob: tuple | None = None  # (weights file path, payload offset) for blobs
    immediate: object = None   # the proto TensorValue for immediates

    def float_values(self) -> np.ndarray | None:
        """The values of a float constant (None for other types): read on demand."""
        numpy_dtype = FLOAT_DTYPES.get(self.type.dtype)
        if numpy_dtype is None or not self.type.static:
            return None
        if self.blob is not None:
            path, offset = self.blob
            return np.fromfile(path, dtype=numpy_dtype, count=self.type.numel, offset=offset)
        value = self.immediate
        which = value.WhichOneof("value") if value is not None else None
        if which == "bytes":
            return np.frombuffer(value.bytes.values, dtype=numpy_dtype)
        if which == "floats":
            return np.asarray(value.floats.values, dtype=numpy_dtype)
        if which == "doubles":
            return np.asarray(value.doubles.values, dtype=numpy_dtype)
        return None


@dataclasses.dataclass
class Operation:
    type: str
    inputs: dict               # parameter -> list of arguments (a var name, or a Constant)
    outputs: list              # [(name, TensorType | None)]
    blocks: list               # nested blocks' operations (control flow), each a list of Operation

    @property
    def name(self) -> str:
        return self.outputs[0][0] if self.outputs else self.type

    def argument(self, parameter: str):
        values = self.inputs.get(parameter) or []
        return values[0] if len(values) == 1 else None

    def input_names(self) -> list[str]:
        return [a for args in self.inputs.values() for a in args if isinstance(a, str)]


@dataclasses.dataclass
class Function:
    name: str
    inputs: dict               # name -> TensorType (tensor inputs)
    states: dict               # name -> TensorType (the wrapped tensor of each state input)
    constants: dict            # var name -> Constant (outputs of `const` ops)
    operations: list           # non-const operations in program order
    outputs: list              # output var names
    types: dict                # var name -> TensorType of every tensor value

    def stored_constants(self) -> dict:
        """key -> Constant for every constant the function holds (const ops and inline values)."""
        found = {c.key: c for c in self.constants.values()}
        for op in walk(self.operations):
            for arguments in op.inputs.values():
                for argument in arguments:
                    if isinstance(argument, Constant):
                        found[argument.key] = argument
        return found

    def histogram(self) -> Counter:
        counts = Counter(op.type for op in walk(self.operations))
        if self.constants:
            counts["const"] = len(self.constants)
        return counts


@dataclasses.dataclass
class Package:
    path: Path
    functions: dict            # name -> Function
    default_function: str
    file_bytes: int            # every file of the .mlpackage
    weights_file_bytes: int    # weight.bin (0 when there is none)


def walk(operations):
    """Every operation, nested blocks included, in program order."""
    for op in operations:
        yield op
        for block in op.blocks:
            yield from walk(block)


def _tensor_type(value_type) -> TensorType | None:
    from coremltools.proto import MIL_pb2
    which = value_type.WhichOneof("type")
    if which == "stateType":
        return _tensor_type(value_type.stateType.wrappedType)
    if which != "tensorType":
        return None
    tensor = value_type.tensorType
    shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tensor.dimensions)
    return TensorType(MIL_pb2.DataType.Name(tensor.dataType), shape)


class _BlobHeaders:
    """Payload sizes of the blobs a spec points at, read from their 64-byte headers."""

    def __init__(self, package: Path):
        self.package, self.files, self.sizes = package, {}, {}

    def path(self, file_name: str) -> Path:
        relative = file_name[len(MODEL_PATH_PREFIX):] if file_name.startswith(MODEL_PATH_PREFIX) else file_name
        return self.package / MODEL_DATA_DIR / relative

    def payload(self, file_name: str, offset: int) -> tuple[Path, int, int]:
        """(path, payload offset, payload bytes) of the blob at `offset`."""
        key = (file_name, offset)
        if key not in self.sizes:
            path = self.path(file_name)
            handle = self.files.get(path)
            if handle is None:
                handle = self.files[path] = open(path, "rb")
            handle.seek(offset)
            header = handle.read(BLOB_HEADER.size)
            if len(header) != BLOB_HEADER.size:
                raise ValueError(f"{path}: no blob header at offset {offset}")
            sentinel, _dtype, size, data_offset = BLOB_HEADER.unpack(header)
            if sentinel != BLOB_SENTINEL:
                raise ValueError(f"{path}: no blob at offset {offset} (sentinel {sentinel:#x})")
            self.sizes[key] = (path, data_offset, size)
        return self.sizes[key]

    def close(self):
        for handle in self.files.values():
            handle.close()


def _constant(value, key_owner: tuple, headers: _BlobHeaders) -> Constant:
    tensor_type = _tensor_type(value.type) or TensorType("UNUSED_TYPE", ())
    which = value.WhichOneof("value")
    if which == "blobFileValue":
        blob = value.blobFileValue
        path, data_offset, size = headers.payload(blob.fileName, blob.offset)
        return Constant(("blob", blob.fileName, blob.offset), tensor_type, size, blob=(path, data_offset))
    return Constant(("immediate", *key_owner), tensor_type, tensor_type.nbytes, immediate=value.immediateValue.tensor)


def _operations(block, function_name: str, constants: dict, types: dict, headers: _BlobHeaders) -> list:
    operations = []
    for input_value in block.inputs:   # block arguments of nested blocks (loops, conditionals)
        tensor_type = _tensor_type(input_value.type)
        if tensor_type is not None:
            types[input_value.name] = tensor_type
    for op in block.operations:
        outputs = [(o.name, _tensor_type(o.type)) for o in op.outputs]
        for name, tensor_type in outputs:
            if tensor_type is not None:
                types[name] = tensor_type
        if op.type == "const":
            constants[outputs[0][0]] = _constant(op.attributes["val"], (function_name, outputs[0][0], "val"), headers)
            continue
        inputs = {}
        for parameter, argument in op.inputs.items():
            values = []
            for index, binding in enumerate(argument.arguments):
                if binding.WhichOneof("binding") == "name":
                    values.append(binding.name)
                else:
                    owner = (function_name, outputs[0][0] if outputs else op.type, f"{parameter}[{index}]")
                    values.append(_constant(binding.value, owner, headers))
            inputs[parameter] = values
        blocks = [_operations(nested, function_name, constants, types, headers) for nested in op.blocks]
        operations.append(Operation(op.type, inputs, outputs, blocks))
    return operations


def _function(name: str, proto, headers: _BlobHeaders) -> Function:
    inputs, states, types = {}, {}, {}
    for value in proto.inputs:
        tensor_type = _tensor_type(value.type)
        if tensor_type is None:
            continue
        types[value.name] = tensor_type
        (states if value.type.WhichOneof("type") == "stateType" else inputs)[value.name] = tensor_type
    block = proto.block_specializations[proto.opset]
    constants: dict = {}
    operations = _operations(block, name, constants, types, headers)
    return Function(name, inputs, states, constants, operations, list(block.outputs), types)


def read_package(path: str | Path) -> Package:
    """Every function of a saved .mlpackage (read-only). ValueError names what is wrong."""
    from ..evaluator.loader import read_spec

    path = Path(path)
    spec = read_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path}: model type is {spec.WhichOneof('Type')}; the audit reads ML Programs only")
    headers = _BlobHeaders(path)
    try:
        functions = {name: _function(name, proto, headers) for name, proto in spec.mlProgram.functions.items()}
    finally:
        headers.close()
    description = spec.description
    default = description.defaultFunctionName or ("main" if "main" in functions else next(iter(functions)))
    files = [p for p in path.rglob("*") if p.is_file()]
    weights = path / MODEL_DATA_DIR / "weights" / "weight.bin"
    return Package(path, functions, default, sum(p.stat().st_size for p in files),
                   weights.stat().st_size if weights.is_file() else 0)
