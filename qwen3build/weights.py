"""Lazy access to a Qwen3 safetensors checkpoint, and per-tensor content digests.

Tensors are located from the safetensors headers (no weight bytes read), cross-checked
against model.safetensors.index.json and against the shapes config.json implies, and
read one at a time through a memory map. Digests are xxh3_128 of each tensor's bytes,
remembered per file under its (inode, size, mtime_ns) so that a no-op build reads no
weight bytes and a `touch` costs one re-hash, never more.
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import sqlite3
import struct
from pathlib import Path

import numpy as np
import xxhash

from .errors import BuildError
from .model_config import ModelConfig

log = logging.getLogger(__name__)

# HF tensor name -> internal name, and the shape config.json implies. A table, not code.
LAYER_TENSORS = {
    "q_proj": ("self_attn.q_proj.weight", lambda c: (c.q_dim, c.hidden_size)),
    "k_proj": ("self_attn.k_proj.weight", lambda c: (c.kv_dim, c.hidden_size)),
    "v_proj": ("self_attn.v_proj.weight", lambda c: (c.kv_dim, c.hidden_size)),
    "o_proj": ("self_attn.o_proj.weight", lambda c: (c.hidden_size, c.q_dim)),
    "q_norm": ("self_attn.q_norm.weight", lambda c: (c.head_dim,)),
    "k_norm": ("self_attn.k_norm.weight", lambda c: (c.head_dim,)),
    "gate_proj": ("mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    "up_proj": ("mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    "down_proj": ("mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size)),
    "input_norm": ("input_layernorm.weight", lambda c: (c.hidden_size,)),
    "post_norm": ("post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "final_norm": ("model.norm.weight", lambda c: (c.hidden_size,)),
    "lm_head": ("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size)),
}
HASH_CHUNK_BYTES = 16 << 20  # hashing reads this much at a time
_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}


def layer_tensor_name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{LAYER_TENSORS[kind][0]}"


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the build needs, with its shape."""
    names = {}
    for layer in range(config.num_hidden_layers):
        for kind, (suffix, shape) in LAYER_TENSORS.items():
            names[f"model.layers.{layer}.{suffix}"] = shape(config)
    for kind, (name, shape) in GLOBAL_TENSORS.items():
        if kind == "lm_head" and config.tie_word_embeddings:
            continue
        names[name] = shape(config)
    return names


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


class Checkpoint:
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
        return np.fromfile(entry.file, dtype=np.uint8, count=entry.end - entry.begin, offset=entry.begin)

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor as a fresh array (bf16 widened exactly to fp32)."""
        entry = self.entries[name]
        storage, _ = _DTYPES[entry.dtype]
        raw = np.frombuffer(self.raw_bytes(name), dtype=storage).reshape(entry.shape)
        return _widen(raw, entry.dtype).astype(dtype, copy=False)

    def tensor_fp16(self, name: str, rows_per_block: int = 8192) -> np.ndarray:
        """One tensor as fp16, converted in row blocks (no full-size fp32 copy).

        Raises BuildError naming the tensor if a value is beyond fp16's range."""
        entry = self.entries[name]
        storage, _ = _DTYPES[entry.dtype]
        raw = np.frombuffer(self.raw_bytes(name), dtype=storage).reshape(entry.shape)
        out = np.empty(entry.shape, dtype=np.float16)
        flat_raw, flat_out = raw.reshape(raw.shape[0], -1), out.reshape(out.shape[0], -1)
        for start in range(0, flat_raw.shape[0], rows_per_block):
            flat_out[start:start + rows_per_block] = _widen(flat_raw[start:start + rows_per_block], entry.dtype)
        if not np.all(np.isfinite(out)):
            raise BuildError(f"{name}: values beyond fp16 range (|x| > 65504); this checkpoint cannot be lowered to fp16")
        return out

    def layer(self, layer: int, kind: str, dtype=np.float32) -> np.ndarray:
        return self.tensor(layer_tensor_name(layer, kind), dtype)


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as numbers: bf16 is the top half of an fp32, widened exactly by a shift."""
    return (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw


# ---------------------------------------------------------------- digests

class DigestStore:
    """Per-file tensor digests keyed on (path, inode, size, mtime_ns), in sqlite."""

    def __init__(self, db_path: Path):
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(db_path, timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, inode INTEGER, size INTEGER, mtime_ns INTEGER, digests TEXT)")
        self.bytes_hashed = 0

    def file_digests(self, checkpoint: Checkpoint, path: Path) -> dict[str, str]:
        st = path.stat()
        row = self.db.execute("SELECT inode, size, mtime_ns, digests FROM files WHERE path=?", (str(path),)).fetchone()
        if row and tuple(row[:3]) == (st.st_ino, st.st_size, st.st_mtime_ns):
            return json.loads(row[3])
        digests = {}
        buffer = bytearray(HASH_CHUNK_BYTES)
        with open(path, "rb", buffering=0) as handle:
            for name, entry in sorted(checkpoint.entries.items(), key=lambda item: item[1].begin):
                if entry.file != path:
                    continue
                hasher = xxhash.xxh3_128()
                hasher.update(f"{entry.dtype}{entry.shape}".encode())
                handle.seek(entry.begin)
                remaining = entry.end - entry.begin
                while remaining:
                    got = handle.readinto(memoryview(buffer)[:min(remaining, HASH_CHUNK_BYTES)])
                    if not got:
                        raise BuildError(f"{path}: ends inside tensor {name}; the file is truncated")
                    hasher.update(memoryview(buffer)[:got])
                    remaining -= got
                self.bytes_hashed += entry.end - entry.begin
                digests[name] = hasher.hexdigest()
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                            (str(path), st.st_ino, st.st_size, st.st_mtime_ns, json.dumps(digests)))
        log.info("hashed %s: %d tensors, %.1f MB", path.name, len(digests), sum(
            checkpoint.entries[n].end - checkpoint.entries[n].begin for n in digests) / 1e6)
        return digests

    def close(self):
        self.db.close()


def stat_signature(paths: list[Path]) -> list:
    out = []
    for path in paths:
        st = path.stat()
        out.append([str(path), st.st_ino, st.st_size, st.st_mtime_ns])
    return out
