"""What one artifact reads, declared as data: the whole of its key, and all its build gets.

An artifact's build function (build/artifacts/<kind>.py) is called as
`build(inputs, outputs)` with a BuildInputs made from its Declared and nothing else:
- values: its slice of the settings and model config (JSON data, in the key as is);
- tensors: the checkpoint tensors it may read, by name (their digests are in the key,
  and every read is checked against the digest, so a file changed mid-build fails);
- files: external files it may read (LUT_DIR / OMNIQ_DIR packs, SCALES), by name
  (content digests in the key, reads checked);
- upstream: outputs of other artifacts it reads, by name (their content digests are in
  the key; the paths are verified cache entries).
The key also covers the build module's code closure and the tool versions. Nothing else
is given to the build, so nothing undeclared can reach its bytes.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from .keys import code_digest, digest_json, tool_versions

# What runs inside every build besides its own module: the inputs it is handed.
INPUTS_MODULE = "qwen3build.build.inputs"

# Tools whose versions shape the bytes of each kind of output.
NUMPY_TOOLS = ("numpy",)
COREML_TOOLS = ("coremltools", "numpy", "protobuf")
# coreai-torch converts the torch.export program that torch traces; coreai-core writes it.
COREAI_TOOLS = ("coreai-core", "coreai-torch", "numpy", "torch")


@dataclasses.dataclass(frozen=True)
class Upstream:
    artifact: str  # e.g. "quant:layer03"
    key: str       # where its cache entry is (not in our key)
    output: str    # which of its outputs we read
    digest: str    # content digest of that output (in our key)


@dataclasses.dataclass(frozen=True)
class ExternalFile:
    path: Path     # where it is (not in the key)
    digest: str    # its content digest (in the key)


@dataclasses.dataclass(frozen=True)
class Declared:
    artifact: str                   # artifact id, e.g. "shard:mid" (not in the key)
    kind: str                       # kind of action, e.g. "shard"
    module: str                     # the build module: qwen3build.build.artifacts.<kind>
    outputs: tuple[str, ...]        # output names, in order
    publish: tuple[str, ...]        # per output: the generation folder it is published in
    values: dict
    tensors: dict                   # checkpoint tensor name -> digest
    files: dict                     # name -> ExternalFile
    upstream: dict                  # name -> Upstream
    tools: tuple[str, ...]

    def key_inputs(self) -> dict:
        """Exactly what the key is the digest of."""
        return {
            "kind": self.kind,
            "code": code_digest(self.module, INPUTS_MODULE),
            "tools": tool_versions(self.tools),
            "outputs": list(self.outputs),
            "values": self.values,
            "tensors": self.tensors,
            "files": {name: f.digest for name, f in self.files.items()},
            "upstream": {name: u.digest for name, u in self.upstream.items()},
        }

    @functools.cached_property
    def key(self) -> str:
        return digest_json(self.key_inputs())
