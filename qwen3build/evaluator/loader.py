"""Load a saved .mlpackage from disk back into a MIL function, plus its declared interface.

Only the bytes on disk are used: the spec (Data/com.apple.CoreML/model.mlmodel) goes
through coremltools' milproto loader with the package's weights directory, exactly as
Core ML would see it. Nothing here touches the in-memory Builder objects that made the
package, so a bug in what was *saved* cannot hide behind what was *built*.

What the milproto loader hands back (worth knowing when reading the engine):
- `const` ops carry their value in `outputs[0].val`; sub-byte dtypes (uint4, int4, ...)
  arrive already unpacked, one element per byte, as numpy uint8/int8 with dtype metadata.
- `constexpr_*` ops are *not* materialized: their outputs have `val is None`; their
  inputs are `const` ops (or other constexpr ops, when chained).
- `write_state` in the proto is turned back into `coreml_update_state`; a
  `coreml_update_state` immediately followed by a `read_state` of the same state is
  merged into the update op (whose output is the written value).
- Every function of a multi-function package is loaded; vars are looked up per function.
  `load_functions` loads the program once for several functions and gives each stored
  constant a key (`constant_keys`), equal across functions that store it once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

WEIGHTS_SUBDIR = os.path.join("Data", "com.apple.CoreML", "weights")
DEFAULT_FUNCTION_NAME = "main"

# Core ML's ArrayFeatureType.ArrayDataType names -> numpy dtypes.
_ARRAY_DATATYPE_TO_NUMPY = {
    "FLOAT16": np.dtype(np.float16),
    "FLOAT32": np.dtype(np.float32),
    "DOUBLE": np.dtype(np.float64),
    "INT32": np.dtype(np.int32),
    "INT8": np.dtype(np.int8),
}

# name -> (shape, numpy dtype)
Interface = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclasses.dataclass
class LoadedFunction:
    """One function of a saved package, loaded into MIL, with its declared interface."""

    package_path: Path
    function_name: str
    function: object  # coremltools.converters.mil.mil.Function
    specification_version: int
    inputs: Interface
    outputs: Interface
    states: Interface
    # var name -> identity of the stored constant it is (const ops and constexpr outputs):
    # equal across the functions of a package exactly when they read the same stored bytes
    # (the same blob, or equal immediate values) the same way. Lets the evaluator decode a
    # weight two functions share once (engine.ConstantPool).
    constant_keys: dict = dataclasses.field(default_factory=dict)


def _feature_interface(features, package_path: Path, kind: str) -> Interface:
    from coremltools.proto import FeatureTypes_pb2

    interface: Interface = {}
    for feature in features:
        feature_type = feature.type
        if feature_type.HasField("stateType"):
            array_type = feature_type.stateType.arrayType
        elif feature_type.HasField("multiArrayType"):
            array_type = feature_type.multiArrayType
        else:
            raise NotImplementedError(
                f"{package_path}: {kind} {feature.name!r} is a {feature_type.WhichOneof('Type')}; "
                "only multi-array and state features are supported"
            )
        datatype_name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array_type.dataType)
        if datatype_name not in _ARRAY_DATATYPE_TO_NUMPY:
            raise NotImplementedError(
                f"{package_path}: {kind} {feature.name!r} has data type {datatype_name}; "
                f"supported: {sorted(_ARRAY_DATATYPE_TO_NUMPY)}"
            )
        if array_type.WhichOneof("ShapeFlexibility") is not None:
            raise NotImplementedError(
                f"{package_path}: {kind} {feature.name!r} has a flexible shape; "
                "the evaluator supports static shapes only"
            )
        shape = tuple(int(dim) for dim in array_type.shape)
        interface[feature.name] = (shape, _ARRAY_DATATYPE_TO_NUMPY[datatype_name])
    return interface


def _function_description(spec, function_name: str | None, package_path: Path):
    """Return (resolved function name, description with input/output/state lists)."""
    description = spec.description
    if len(description.functions) == 0:
        name = function_name or DEFAULT_FUNCTION_NAME
        if name != DEFAULT_FUNCTION_NAME:
            raise ValueError(
                f"{package_path}: single-function package has only {DEFAULT_FUNCTION_NAME!r}, "
                f"asked for {name!r}"
            )
        return name, description
    by_name = {function.name: function for function in description.functions}
    # Core ML's own default: the package's defaultFunctionName when none is asked for.
    name = function_name or description.defaultFunctionName or DEFAULT_FUNCTION_NAME
    if name not in by_name:
        raise ValueError(
            f"{package_path}: no function {name!r}; the package has {sorted(by_name)}"
        )
    return name, by_name[name]


@dataclasses.dataclass(frozen=True)
class PackageInterface:
    """The declared interface of one function of a saved package (read from its spec)."""

    package_path: Path
    function_name: str
    specification_version: int
    inputs: Interface
    outputs: Interface
    states: Interface


def read_spec(package_path: Path):
    """The package's Model spec, read without writing anything.

    coremltools' MLModel(path) opens the package read-write and rewrites Manifest.json;
    published packages are never written, so the root model file named by the manifest is
    parsed here directly."""
    import json

    from coremltools.proto import Model_pb2

    package_path = Path(package_path)
    if not package_path.is_dir():
        raise FileNotFoundError(f"{package_path}: not an .mlpackage directory")
    try:
        manifest = json.loads((package_path / "Manifest.json").read_text())
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
        data = (package_path / "Data" / root).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{package_path}: not a readable .mlpackage ({exc})") from None
    spec = Model_pb2.Model()
    spec.ParseFromString(data)
    return spec


def _read_spec(package_path: Path):
    spec = read_spec(package_path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise NotImplementedError(
            f"{package_path}: model type is {spec.WhichOneof('Type')}; only ML Programs are supported"
        )
    return spec


def _interface(spec, package_path: Path, function_name: str | None) -> PackageInterface:
    name, description = _function_description(spec, function_name, package_path)
    return PackageInterface(
        package_path=package_path,
        function_name=name,
        specification_version=spec.specificationVersion,
        inputs=_feature_interface(description.input, package_path, "input"),
        outputs=_feature_interface(description.output, package_path, "output"),
        states=_feature_interface(description.state, package_path, "state"),
    )


def read_interface(package_path: str | os.PathLike, function_name: str | None = None) -> PackageInterface:
    """The declared inputs / outputs / states of one function, without loading the program."""
    package_path = Path(package_path)
    return _interface(_read_spec(package_path), package_path, function_name)


def constant_keys(spec, function_name: str) -> dict:
    """var name -> key of every const op and constexpr op of one function of the spec.

    A const's key is its serialized value (for a blob: the file and offset it points at; for
    an immediate: the value itself) with its type; a constexpr's key is its op type,
    attributes, output types and its inputs' keys (inline values serialized, named inputs
    by their own keys). Two functions that store a weight once get equal keys for it."""
    if function_name not in spec.mlProgram.functions:
        return {}
    function = spec.mlProgram.functions[function_name]
    keys: dict = {}
    for op in function.block_specializations[function.opset].operations:
        if not op.outputs:
            continue
        if op.type == "const":
            keys[op.outputs[0].name] = ("const", op.attributes["val"].SerializeToString(deterministic=True))
            continue
        if not op.type.startswith("constexpr_"):
            continue
        parts = []
        for parameter in sorted(op.inputs):
            for binding in op.inputs[parameter].arguments:
                if binding.WhichOneof("binding") == "name":
                    parts.append((parameter, keys.get(binding.name, ("var", binding.name))))
                else:
                    parts.append((parameter, ("value", binding.value.SerializeToString(deterministic=True))))
        attributes = tuple(sorted((name, value.SerializeToString(deterministic=True))
                                  for name, value in op.attributes.items() if name != "name"))
        types = tuple(output.type.SerializeToString(deterministic=True) for output in op.outputs)
        key = (op.type, attributes, types, tuple(parts))
        for index, output in enumerate(op.outputs):
            keys[output.name] = (key, index)
    return keys


def load_functions(package_path: str | os.PathLike, function_names) -> dict[str, LoadedFunction]:
    """Read `package_path` (.mlpackage) from disk once and load the named functions into
    MIL (None: the package's default function), keyed by their resolved names."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    package_path = Path(package_path)
    spec = _read_spec(package_path)
    interfaces = [_interface(spec, package_path, function_name) for function_name in function_names]
    program = milproto_load(
        spec,
        spec.specificationVersion,
        file_weights_dir=str(package_path / WEIGHTS_SUBDIR),
    )
    loaded: dict[str, LoadedFunction] = {}
    for interface in interfaces:
        name = interface.function_name
        if name not in program.functions:
            raise ValueError(
                f"{package_path}: function {name!r} is in the description but not in the program "
                f"(program has {sorted(program.functions)})"
            )
        loaded[name] = LoadedFunction(
            package_path=package_path,
            function_name=name,
            function=program.functions[name],
            specification_version=spec.specificationVersion,
            inputs=interface.inputs,
            outputs=interface.outputs,
            states=interface.states,
            constant_keys=constant_keys(spec, name),
        )
        logger.info(
            "loaded %s:%s (spec v%d, %d ops, inputs %s, states %s)",
            package_path.name,
            name,
            spec.specificationVersion,
            len(loaded[name].function.operations),
            sorted(interface.inputs),
            sorted(interface.states),
        )
    return loaded


def load_function(package_path: str | os.PathLike, function_name: str | None = None) -> LoadedFunction:
    """Read `package_path` (.mlpackage) from disk and load one function into MIL."""
    return next(iter(load_functions(package_path, [function_name]).values()))
