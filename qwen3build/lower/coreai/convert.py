"""torch modules -> one .aimodel package: export, convert, save, with reproducible bytes.

    functions = [Function("decode", module, (hidden, position), ("hidden_states", "position"),
                          ("output_hidden_states",), ("kv_cache",))]
    save_package(convert(functions), path, metadata)

Per function: torch.export.export -> run_decompositions(coreai_torch.get_decomp_table())
-> TorchConverter.add_exported_program(entrypoint_name=...). Functions of one package
share their weights (constants are stored once by content) and, by name, their state.
The converter runs in Mode.RELEASE (DEBUG embeds torch stack traces with absolute paths).

Reproducible bytes (the same inputs give byte-identical packages; docs/coreai.md):
1. coreai names every large constant `resource_<hash>` with an LLVM hash seeded by an
   address (ASLR), so main.mlirb (and main.hash) differ between processes. While
   converting, deterministic_resource_names() wraps the private binding the converter
   calls, coreai._compiler._mlir_libs._coreaiIR._bindings.mlir.dialects.coreai.
   create_elements_attr, and re-creates each resource as `w_<sha256(type, bytes)>` with
   DenseResourceElementsAttr.get_from_buffer; identical contents get the same attribute,
   so a weight shared by two functions is still stored once.
2. save_asset stamps metadata.json with the current time and writes its keys in a
   per-process order (a Swift dictionary): canonical_metadata() rewrites it with sorted
   keys and the fixed CREATION_DATE (the runtime accepts the rewritten file).
Both hooks are private to coreai-core 1.0.0b3 (pinned; tests/test_coreai.py builds the
same package in two processes and compares every byte).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from . import require_coreai

METADATA_FILE = "metadata.json"
# Fixed creation date of every package (save_asset's format, the Unix epoch).
CREATION_DATE = "19700101T000000Z"
# Alignment of the re-created weight blobs (what coreai's own resources use).
RESOURCE_ALIGNMENT = 16
DESCRIPTION = "qwen3build Core AI package"


@dataclasses.dataclass(frozen=True)
class Function:
    """One entrypoint of a package: `module` exported with `example_inputs`."""
    name: str
    module: torch.nn.Module
    example_inputs: tuple
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    state_names: tuple[str, ...] = ()


def export(function: Function):
    import coreai_torch

    if len({id(value) for value in function.example_inputs}) != len(function.example_inputs):
        # torch.export gives inputs that are one tensor object one placeholder: the
        # converted function would read one input for several.
        raise ValueError(f"{function.name}: give every example input its own tensor")

    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13's exporter deep-copies pytree specs through a deprecated LeafSpec check.
        warnings.filterwarnings("ignore", message=".*LeafSpec.* is deprecated", category=FutureWarning)
        program = torch.export.export(function.module, function.example_inputs, strict=False)
        return program.run_decompositions(coreai_torch.get_decomp_table())


def convert(functions: list[Function]):
    """The functions as one optimized AIProgram (entrypoints in the given order)."""
    require_coreai()
    import coreai_torch

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    with deterministic_resource_names():
        for function in functions:
            converter.add_exported_program(export(function), input_names=list(function.input_names),
                                           output_names=list(function.output_names),
                                           state_names=list(function.state_names), entrypoint_name=function.name)
        with contextlib.redirect_stdout(_LogStream()):  # the converter prints a banner
            return converter.to_coreai()


def save_package(program, path: Path, metadata: dict) -> None:
    """Save `program` at `path` (a directory ending .aimodel), metadata as custom
    `qwen3build.<key>` strings, metadata.json canonical."""
    from coreai.runtime import AIModelAssetMetadata

    path = Path(path)
    if path.suffix != ".aimodel":
        raise ValueError(f"{path}: a Core AI package must end in .aimodel")
    if path.exists():
        shutil.rmtree(path)
    meta = AIModelAssetMetadata()
    meta.model_description = DESCRIPTION
    for key, value in sorted(metadata.items()):
        meta.set_custom(f"qwen3build.{key}", str(value))
    program.save_asset(path, metadata=meta)
    canonical_metadata(path)


def canonical_metadata(path: Path) -> None:
    """metadata.json with sorted keys and the fixed CREATION_DATE."""
    target = Path(path) / METADATA_FILE
    metadata = json.loads(target.read_text())
    metadata["creationDate"] = CREATION_DATE
    target.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


# -- deterministic resource names (private coreai-core hook, see the module docstring) ----

_NAMING_LOCK = threading.Lock()


@contextlib.contextmanager
def deterministic_resource_names():
    """Within the block, large constants are named by their content (see the module docstring)."""
    import coreai._compiler._mlir_libs._coreaiIR._bindings.mlir as bindings
    import coreai._compiler.dialects.coreai.constant as constant_module
    from coreai._compiler.ir import DenseResourceElementsAttr

    dialect = bindings.dialects.coreai
    original = dialect.create_elements_attr
    made: dict = {}  # (context id, digest) -> (context, attribute): the context kept alive with it

    def create_elements_attr(location, tensor_type, data):
        attribute = original(location, tensor_type, data)
        if not DenseResourceElementsAttr.isinstance(attribute):
            return attribute  # small and splat constants are inline: already deterministic
        raw = np.ascontiguousarray(np.asarray(data)).reshape(-1).view(np.uint8)
        digest = hashlib.sha256(str(tensor_type).encode() + b"\0" + raw.tobytes()).hexdigest()[:32]
        context = tensor_type.context
        key = (id(context), digest)
        if key not in made:
            made[key] = (context, DenseResourceElementsAttr.get_from_buffer(
                raw, f"w_{digest}", tensor_type, alignment=RESOURCE_ALIGNMENT))
        return made[key][1]

    with _NAMING_LOCK:
        dialect.create_elements_attr = create_elements_attr
        constant_module.create_elements_attr = create_elements_attr  # imported there by name
        try:
            yield
        finally:
            dialect.create_elements_attr = original
            constant_module.create_elements_attr = original
            made.clear()


class _LogStream:
    """A stdout stand-in that sends the converter's banner to the log at DEBUG."""

    def write(self, text: str) -> int:
        import logging
        if text.strip():
            logging.getLogger(__name__).debug("coreai-torch: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
