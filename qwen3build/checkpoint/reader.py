"""Lazy access to a Qwen3 safetensors checkpoint.

Tensors are located from the safetensors headers (no weight bytes read), cross-checked
against model.safetensors.index.json and against the shapes config.json implies, and
read one at a time with positioned reads (not memory maps: mapped pages of multi-GB
files stay resident and count against the build's memory).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import struct
from pathlib import Path

import numpy as np

from ..errors import BuildError
from ..settings.model_config import ModelConfig
from .tensors import expected_tensors, layer_tensor_name

log = logging.getLogger(__name__)

_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, struct.error) as exc:
        raise BuildError(f"{path}: not a readable safetensors file ({exc})") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(Path(path), info["dtype"], tuple(info["shape"]), base + begin, base + end)
    return entries


def resolve_weight_files(config_path: Path, weights: Path | None, index: Path | None, pattern: str) -> tuple[list[Path], Path | None]:
    """The safetensors files to read and the index that lists them (if any)."""
    if weights is not None:
        if not weights.is_file():
            raise BuildError(f"WEIGHTS={weights} does not exist; point it at a .safetensors file")
        return [weights], None
    if index is None and not pattern:
        candidate = config_path.with_name("model.safetensors.index.json")
        if candidate.is_file():
            index = candidate
        elif config_path.with_name("model.safetensors").is_file():
            return [config_path.with_name("model.safetensors")], None
        else:
            pattern = str(config_path.with_name("*.safetensors"))
    if index is not None:
        if not index.is_file():
            raise BuildError(f"WEIGHTS_INDEX={index} does not exist")
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({index.parent / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise BuildError(f"{index.name} names missing shard file(s): {', '.join(missing)}")
        return files, index
    files = sorted(Path(p) for p in globlib.glob(pattern))
    if not files:
        raise BuildError(f"no safetensors files match {pattern!r}; set WEIGHTS, WEIGHTS_INDEX or WEIGHTS_GLOB")
    return files, None


class TensorSource:
    """Decoding shared by every source of tensors: `entries` (name -> TensorEntry) and
    `raw_bytes(name)` come from the subclass."""

    entries: dict[str, TensorEntry]

    def raw_bytes(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor as a fresh array (bf16 widened exactly to fp32). Non-finite values are
        refused, naming the tensor."""
        entry = self.entries[name]
        storage, _ = _DTYPES[entry.dtype]
        raw = np.frombuffer(self.raw_bytes(name), dtype=storage).reshape(entry.shape)
        out = _widen(raw, entry.dtype).astype(dtype, copy=False)
        if not np.all(np.isfinite(out)):
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            raise BuildError(f"{name}: {bad} non-finite value(s) (NaN or inf) in {entry.file.name}; "
                             "the checkpoint is damaged: re-download or re-export it")
        return out

    def tensor_fp16(self, name: str, rows_per_block: int = 8192) -> np.ndarray:
        """One tensor as fp16, converted in row blocks (no full-size fp32 copy).

        Raises BuildError naming the tensor if a value is non-finite or beyond fp16's range."""
        entry = self.entries[name]
        storage, _ = _DTYPES[entry.dtype]
        raw = np.frombuffer(self.raw_bytes(name), dtype=storage).reshape(entry.shape)
        out = np.empty(entry.shape, dtype=np.float16)
        flat_raw, flat_out = raw.reshape(raw.shape[0], -1), out.reshape(out.shape[0], -1)
        for start in range(0, flat_raw.shape[0], rows_per_block):
            block = _widen(flat_raw[start:start + rows_per_block], entry.dtype)
            if not np.all(np.isfinite(block)):
                raise BuildError(f"{name}: non-finite value(s) (NaN or inf) in {entry.file.name}; "
                                 "the checkpoint is damaged: re-download or re-export it")
            flat_out[start:start + rows_per_block] = block
        if not np.all(np.isfinite(out)):
            raise BuildError(f"{name}: values beyond fp16 range (|x| > 65504); this checkpoint cannot be lowered to fp16")
        return out


class Checkpoint(TensorSource):
    """Lazy, validated view of a Qwen3 checkpoint's tensors."""

    def __init__(self, config: ModelConfig, files: list[Path], index: Path | None = None):
        self.config = config
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            for name, entry in read_safetensors_header(path).items():
                if name in self.entries:
                    raise BuildError(f"tensor {name} appears in both {self.entries[name].file.name} and {path.name}")
                self.entries[name] = entry
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            wrong = [n for n, f in weight_map.items() if n in self.entries and self.entries[n].file.name != Path(f).name]
            if wrong:
                raise BuildError(f"{index.name} places {wrong[0]} in {weight_map[wrong[0]]} but it is in {self.entries[wrong[0]].file.name}")
        expected = expected_tensors(config)
        missing = [n for n in expected if n not in self.entries]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise BuildError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}")
        for name, shape in expected.items():
            entry = self.entries[name]
            if entry.shape != shape:
                raise BuildError(f"{name}: shape {entry.shape} in {entry.file.name}, but config.json implies {shape}")
            if entry.dtype not in _DTYPES:
                raise BuildError(f"{name}: dtype {entry.dtype} is not supported; use BF16, F16 or F32 weights")

    @property
    def head_name(self) -> str:
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def raw_bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes, read with a positioned read (not a memory map: mapped pages
        of multi-GB files would stay resident and count against the build's memory)."""
        entry = self.entries[name]
        try:
            data = np.fromfile(entry.file, dtype=np.uint8, count=entry.end - entry.begin, offset=entry.begin)
        except OSError as exc:
            raise BuildError(f"{entry.file}: cannot read tensor {name} ({exc})") from None
        if data.size != entry.end - entry.begin:
            raise BuildError(f"{entry.file}: ends inside tensor {name}; the file is truncated: re-download it")
        return data

    def layer(self, layer: int, kind: str, dtype=np.float32) -> np.ndarray:
        return self.tensor(layer_tensor_name(layer, kind), dtype)


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as numbers: bf16 is the top half of an fp32, widened exactly by a shift."""
    return (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw
