"""What a build function is handed: its declared inputs and nothing else (see declared.py).

This module's code runs inside every build (reading tensors, checking digests), so it is
part of every artifact's key, beside the build module's own code closure.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import numpy as np
import xxhash

from ..checkpoint.digests import tensor_hasher
from ..checkpoint.reader import TensorSource
from ..errors import BuildError


class DeclaredTensors(TensorSource):
    """The checkpoint restricted to the declared tensors; every read is digest-checked."""

    def __init__(self, checkpoint, digests: dict, artifact: str):
        self.config = checkpoint.config
        self._checkpoint, self._digests, self._artifact = checkpoint, digests, artifact
        self.entries = {name: checkpoint.entries[name] for name in digests}

    def shape(self, name: str) -> tuple[int, ...]:
        """Any tensor's shape: config.json implies it (the checkpoint was checked against it)."""
        return self._checkpoint.entries[name].shape

    def raw_bytes(self, name: str) -> np.ndarray:
        if name not in self._digests:
            raise KeyError(f"{self._artifact} reads tensor {name} but did not declare it (build/declare.py)")
        data = self._checkpoint.raw_bytes(name)
        hasher = tensor_hasher(self.entries[name])
        hasher.update(memoryview(data))
        if hasher.hexdigest() != self._digests[name]:
            raise BuildError(f"{name} in {self.entries[name].file} changed while building {self._artifact}; "
                             "run the build again")
        return data


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    artifact: str
    values: MappingProxyType
    tensors: DeclaredTensors
    files: dict
    upstream: dict  # name -> Path of the verified upstream output
    scratch: Path   # an empty work directory, removed after the build (not an input)

    def file_bytes(self, name: str) -> bytes:
        declared = self.files[name]
        data = declared.path.read_bytes()
        if _digest(data) != declared.digest:
            raise BuildError(f"{declared.path} changed while building {self.artifact}; run the build again")
        return data


def frozen(value):
    """A read-only view of declared JSON data (dicts become mappingproxies, lists tuples)."""
    if isinstance(value, dict):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    return value


def _digest(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()
