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
import math
import os
import re
import struct
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where tensors are read: a no-op build reads headers only
    import numpy as np

from ..errors import BuildError
from ..settings.model_config import ModelConfig
from .tensors import expected_tensors, layer_tensor_name

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^model\.layers\.([0-9]+)\.")

_DTYPES = {"BF16": ("uint16", 2), "F16": ("float16", 2), "F32": ("float32", 4)}  # storage dtype, bytes
# Bytes per element of every safetensors dtype (the format's own list), to check a
# header's offsets even for tensors the build does not read.
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                           "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# The safetensors format's own bound on the JSON header (the reference reader refuses more).
MAX_HEADER_BYTES = 100_000_000
# Values per step of the non-finite check (a bool temporary of 4 MB, not one of the tensor's size).
FINITE_CHECK_STEP = 1 << 22
_REDOWNLOAD = "re-download or re-export the checkpoint"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _unique_keys(pairs):
    """json object_pairs_hook: a key given twice is an error, not "the last one wins"."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, from its header alone, each checked: a known
    dtype, a shape of whole numbers, data offsets inside the file's data, not overlapping,
    spanning exactly dtype size x elements. One-line BuildError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        raise BuildError(f"{path} is a directory, not a safetensors file; point WEIGHTS at a .safetensors file")

    def bad(problem: str):
        return BuildError(f"{path}: {problem}; {_REDOWNLOAD}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, too short for a safetensors header (truncated or not safetensors)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise bad(f"header length {header_len} runs past the end of the {size}-byte file "
                          "(truncated or not safetensors)")
            text = handle.read(header_len)
    except OSError as exc:
        raise BuildError(f"{path}: cannot read ({exc.strerror}); check the file and its permissions") from None
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON ({exc}), so this is not a (complete) safetensors file") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - header_len
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"header entry {name} is {info!r}, not an object with dtype, shape and data_offsets")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
        if missing:
            raise bad(f"header entry {name} has no {' / '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise bad(f"tensor {name} has dtype {dtype!r}, not a safetensors dtype")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise bad(f"tensor {name} has shape {shape!r}, not a list of whole numbers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"tensor {name} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        expected = SAFETENSORS_DTYPE_BYTES[dtype] * math.prod(shape)
        if end - begin != expected:
            raise bad(f"tensor {name}: data_offsets {offsets} span {end - begin} bytes but {dtype} {shape} "
                      f"needs {expected}")
        if end > data_bytes:
            raise bad(f"tensor {name} ends at byte {base + end} but the file has {size} (truncated)")
        entries[name] = TensorEntry(path, dtype, tuple(shape), base + begin, base + end)
    ordered = sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end))
    for (first, a), (second, b) in zip(ordered, ordered[1:]):
        if b.begin < a.end:
            raise bad(f"tensors {first} and {second} overlap (bytes {b.begin}-{min(a.end, b.end)})")
    return entries


def read_index(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor -> file name), validated: a JSON
    object whose weight_map maps names to files that stay inside the index's folder."""
    from ..settings.model_config import read_json_object
    remedy = "re-download it, or set WEIGHTS / WEIGHTS_GLOB instead of using the index"
    raw = read_json_object(index, "WEIGHTS_INDEX", remedy)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        shown = "no weight_map" if "weight_map" not in raw else f"weight_map={str(weight_map)[:60]!r}"
        raise BuildError(f"{index}: {shown}; a safetensors index maps each tensor name to its file; {remedy}")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.strip():
            raise BuildError(f"{index}: weight_map[{name!r}] = {file!r} is not a file name; {remedy}")
        relative = Path(file)
        if relative.is_absolute() or os.path.normpath(relative).split(os.sep)[0] == "..":
            raise BuildError(f"{index}: weight_map places {name} in {file}, outside the checkpoint folder "
                             f"{index.parent}; keep the shard files beside the index (names relative to it)")
    return weight_map


def resolve_weight_files(config_path: Path, weights: Path | None, index: Path | None, pattern: str) -> tuple[list[Path], Path | None]:
    """The safetensors files to read and the index that lists them (if any)."""
    if weights is not None:
        if weights.is_dir():
            raise BuildError(f"WEIGHTS={weights} is a directory; point WEIGHTS at a .safetensors file (or set "
                             f"WEIGHTS_GLOB to e.g. {weights}/*.safetensors)")
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
        if not index.exists():
            raise BuildError(f"WEIGHTS_INDEX={index} does not exist; point it at model.safetensors.index.json")
        weight_map = read_index(index)
        files = sorted({index.parent / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise BuildError(f"{index.name} names missing shard file(s): {', '.join(missing)}; download them "
                             "or fix the index")
        return files, index
    files = sorted(Path(p) for p in globlib.glob(pattern) if Path(p).is_file())
    if not files:
        raise BuildError(f"no safetensors files match {pattern!r}; set WEIGHTS, WEIGHTS_INDEX or WEIGHTS_GLOB")
    return files, None


class TensorSource:
    """Decoding shared by every source of tensors: `entries` (name -> TensorEntry) and
    `raw_bytes(name)` come from the subclass."""

    entries: dict[str, TensorEntry]

    def raw_bytes(self, name: str) -> "np.ndarray":
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def tensor(self, name: str, dtype="float32") -> "np.ndarray":
        """One tensor as a fresh array (bf16 widened exactly to fp32). Non-finite values are
        refused, naming the tensor."""
        import numpy as np
        entry = self.entries[name]
        storage, _ = _DTYPES[entry.dtype]
        raw = np.frombuffer(self.raw_bytes(name), dtype=storage).reshape(entry.shape)
        out = _widen(raw, entry.dtype).astype(dtype, copy=False)
        del raw
        flat = out.reshape(-1)
        if not all(np.isfinite(flat[i:i + FINITE_CHECK_STEP]).all() for i in range(0, flat.size, FINITE_CHECK_STEP)):
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            raise BuildError(f"{name}: {bad} non-finite value(s) (NaN or inf) in {entry.file.name}; "
                             "the checkpoint is damaged: re-download or re-export it")
        return out

    def tensor_fp16(self, name: str, rows_per_block: int = 8192) -> "np.ndarray":
        """One tensor as fp16, converted in row blocks (no full-size fp32 copy).

        Raises BuildError naming the tensor if a value is non-finite or beyond fp16's range."""
        import numpy as np
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
            raise BuildError(f"{name}: values beyond fp16 range (|x| > 65504) in {entry.file.name}; this checkpoint "
                             "cannot be lowered to fp16: use one whose weights fit fp16")
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
                    raise BuildError(f"tensor {name} appears in both {self.entries[name].file} and {path}; "
                                     "keep one copy (set WEIGHTS, WEIGHTS_INDEX or WEIGHTS_GLOB to choose the files)")
                self.entries[name] = entry
        if index is not None:
            for name, file in read_index(index).items():
                if name not in self.entries:
                    raise BuildError(f"{index.name} places {name} in {file} but that file has no such tensor; "
                                     "the index and the files disagree: re-download them together")
                if self.entries[name].file.name != Path(file).name:
                    raise BuildError(f"{index.name} places {name} in {file} but it is in "
                                     f"{self.entries[name].file.name}; re-download the index with the files")
        self._check_against_config(config)

    def _check_against_config(self, config: ModelConfig) -> None:
        """Every tensor config.json implies is present with its shape and a readable dtype,
        and no layer beyond num_hidden_layers exists (a config that says fewer layers than
        the checkpoint has would build a truncated model)."""
        depth = config.num_hidden_layers
        deepest = max((int(m.group(1)) for name in self.entries if (m := _LAYER_RE.match(name))), default=-1)
        if deepest >= depth:
            raise BuildError(f"config.json says num_hidden_layers={depth} but the checkpoint has layers 0-{deepest}; "
                             f"fix num_hidden_layers (to {deepest + 1}) or use the config that came with the weights")
        expected = expected_tensors(config)
        missing = [n for n in expected if n not in self.entries]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise BuildError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}; "
                             "check that config.json belongs to these weights and that every shard is present")
        for name, shape in expected.items():
            entry = self.entries[name]
            if entry.shape != shape:
                raise BuildError(f"{name}: shape {entry.shape} in {entry.file.name}, but config.json implies {shape}; "
                                 "check that config.json belongs to these weights")
            if entry.dtype not in _DTYPES:
                raise BuildError(f"{name}: dtype {entry.dtype} is not supported; use BF16, F16 or F32 weights "
                                 "(re-export the checkpoint in one of them)")

    @property
    def head_name(self) -> str:
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def raw_bytes(self, name: str) -> "np.ndarray":
        """The tensor's bytes, read with a positioned read (not a memory map: mapped pages
        of multi-GB files would stay resident and count against the build's memory)."""
        import numpy as np
        entry = self.entries[name]
        try:
            data = np.fromfile(entry.file, dtype=np.uint8, count=entry.end - entry.begin, offset=entry.begin)
        except OSError as exc:
            raise BuildError(f"{entry.file}: cannot read tensor {name} ({exc})") from None
        if data.size != entry.end - entry.begin:
            raise BuildError(f"{entry.file}: ends inside tensor {name}; the file is truncated: re-download it")
        return data

    def layer(self, layer: int, kind: str, dtype="float32") -> "np.ndarray":
        return self.tensor(layer_tensor_name(layer, kind), dtype)


def _widen(raw: "np.ndarray", dtype: str) -> "np.ndarray":
    """Stored values as numbers: bf16 is the top half of an fp32, widened exactly by a shift."""
    import numpy as np
    if dtype != "BF16":
        return raw
    wide = raw.astype(np.uint32)
    wide <<= 16  # in place: one fp32-sized array, not two
    return wide.view(np.float32)
