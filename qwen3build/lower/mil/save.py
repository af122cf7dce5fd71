"""Convert MIL programs to .mlpackage files: safe pass pipeline, deterministic bytes.

coremltools pitfalls guarded here (DESIGN section 3), each silently wrong otherwise:
- common::add_int16_cast turns vocab-sized argmax/topk indices into 16-bit ints
  (index 150000 comes back as 18928): removed from every pipeline.
- common::remove_redundant_ops merges repeated read_state ops on the same state even with
  a coreml_update_state between them: removed too (our graphs read each state once
  anyway; tests check the saved packages).
- Packages carry random UUIDs in Manifest.json and a conversion date in their metadata:
  both are made deterministic so identical inputs give identical bytes.
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
import uuid
from pathlib import Path

import coremltools as ct

log = logging.getLogger(__name__)

UNSAFE_PASSES = ("common::add_int16_cast", "common::remove_redundant_ops")
DATE_KEY = "com.github.apple.coremltools.conversion_date"
PACKAGE_UUID_NAMESPACE = uuid.UUID("5f0c1c55-3a43-4a8b-9a57-2a8c1f0e4b21")


def reset_op_names() -> None:
    """Restart coremltools' process-global op- and block-name counters.

    Unnamed ops (including ones passes create, like the write_state a state update
    lowers to) are named from a class-level counter, and blocks (`block0`, ...) from
    another, so without this a package's bytes and MIL dump depend on what the process
    built before it. Call right before building a program.
    """
    from coremltools.converters.mil.mil.block import Block
    from coremltools.converters.mil.mil.builder import Builder
    Builder.name_count.clear()
    Block.counter = 0


def safe_pipeline() -> ct.PassPipeline:
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(list(UNSAFE_PASSES))
    return pipeline


def convert(program, metadata: dict | None = None,
            compute_precision=ct.precision.FLOAT16) -> ct.models.MLModel:
    """compute_precision FLOAT16 (default) lowers fp32 ops to fp16; the sampler keeps fp32."""
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       skip_model_load=True, pass_pipeline=safe_pipeline(), compute_precision=compute_precision)
    meta = model.user_defined_metadata
    if DATE_KEY in meta:
        del meta[DATE_KEY]
    for key, value in (metadata or {}).items():
        meta[f"qwen3build.{key}"] = str(value)
    return model


def normalize_manifest(package: Path) -> None:
    """Replace the random item identifiers in Manifest.json with ones derived from paths."""
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    remap = {}
    for old, info in manifest.get("itemInfoEntries", {}).items():
        remap[old] = str(uuid.uuid5(PACKAGE_UUID_NAMESPACE, info.get("path", old))).upper()
    manifest["itemInfoEntries"] = {remap[k]: v for k, v in manifest["itemInfoEntries"].items()}
    if manifest.get("rootModelIdentifier") in remap:
        manifest["rootModelIdentifier"] = remap[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def serialize_spec_deterministically(package: Path) -> None:
    """Rewrite the root model file with protobuf's deterministic serialization.

    The metadata map (user_defined_metadata) is a protobuf map: its serialized order
    differs between processes unless asked to be deterministic."""
    from coremltools.proto import Model_pb2
    manifest = json.loads((package / "Manifest.json").read_text())
    path = package / "Data" / manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    path.write_bytes(spec.SerializeToString(deterministic=True))


def save_package(model: ct.models.MLModel, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.save(str(path))
    normalize_manifest(path)
    serialize_spec_deterministically(path)


# Core ML's blob storage (MILBlob): a 64-byte header at each offset the spec names:
# sentinel, data type, payload bytes, payload offset.
_BLOB_HEADER = struct.Struct("<IIQQ")
_BLOB_SENTINEL = 0xDEADBEEF


def _root_spec(package: Path):
    from coremltools.proto import Model_pb2
    manifest = json.loads((package / "Manifest.json").read_text())
    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"])
                         .read_bytes())
    return spec


def blob_references(package: Path) -> dict[str, dict[str, int]]:
    """function -> {stored value: blob offset in weight.bin} of a saved package. A stored
    value is named by its const op ("layer03_q_proj"), or, for a constant coremltools
    inlined into a constexpr op, by "<op>.<parameter>" ("layer03_q_proj.indices")."""
    spec = _root_spec(package)
    found: dict[str, dict[str, int]] = {}
    for function_name, function in spec.mlProgram.functions.items():
        refs = found.setdefault(function_name, {})
        for op in function.block_specializations[function.opset].operations:
            name = op.outputs[0].name if op.outputs else op.type
            if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
                refs[name] = op.attributes["val"].blobFileValue.offset
            for parameter, argument in op.inputs.items():
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "value" and \
                            binding.value.WhichOneof("value") == "blobFileValue":
                        refs[f"{name}.{parameter}"] = binding.value.blobFileValue.offset
    return found


def _payload_bytes(weights_file: Path, offsets) -> dict[int, int]:
    sizes = {}
    with open(weights_file, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            sentinel, _dtype, size, _data_offset = _BLOB_HEADER.unpack(handle.read(_BLOB_HEADER.size))
            if sentinel != _BLOB_SENTINEL:
                raise RuntimeError(f"{weights_file}: no blob at offset {offset}")
            sizes[offset] = size
    return sizes


def check_shared_weights(package: Path, base: tuple[str, ...], added: tuple[str, ...]) -> dict:
    """Check, after saving, that the functions of a package store each weight once.

    Every stored value emitted under one name in several functions (quant.shared_const:
    the weights and tables) must point at one blob; a pass that rewrote such a constant in
    one function (and so stored a copy) fails the build here. Returns the bytes: the
    weight file's blobs, and those only the `added` functions (the prefill twins) use,
    next to the `base` ones (decode, embed, lm_head): what the added functions cost."""
    refs = blob_references(package)
    offsets_of: dict[str, set] = {}
    for function in refs.values():
        for name, offset in function.items():
            offsets_of.setdefault(name, set()).add(offset)
    split = sorted(name for name, offsets in offsets_of.items() if len(offsets) > 1)
    if split:
        raise RuntimeError(f"{package.name}: {len(split)} weight(s) stored more than once across functions "
                           f"({', '.join(split[:4])}): a conversion pass rewrote a shared constant")
    weights_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    if not weights_file.is_file():
        return {"blob_bytes": 0, "added_bytes": 0, "shared": 0}
    base_offsets = {o for f in base for o in refs.get(f, {}).values()}
    added_offsets = {o for f in added for o in refs.get(f, {}).values()} - base_offsets
    sizes = _payload_bytes(weights_file, base_offsets | added_offsets)
    shared = sum(1 for name, offsets in offsets_of.items()
                 if sum(name in refs.get(f, {}) for f in (*base, *added)) > 1)
    return {"blob_bytes": sum(sizes.values()), "added_bytes": sum(sizes[o] for o in added_offsets),
            "shared": shared}


def mil_text(model: ct.models.MLModel) -> str:
    """Human-readable MIL of the program as converted (after passes)."""
    program = getattr(model, "_mil_program", None)
    return str(program) if program is not None else str(model.get_spec())
