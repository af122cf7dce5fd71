"""On-disk format for quantized packs: one uncompressed .npz per tensor.

Packs made elsewhere (LUT_DIR for grouped-LUT projections, OMNIQ_DIR for blockwise
embedding / head) are read through `load_pack`, which validates everything it can and
fails with one line naming the file, the problem and what to do. Fields (see
docs/quantization.md):

    format      int   FORMAT_VERSION
    kind        str   "lut" or "blockwise"
    bits        int
    shape       int64 [2]   dense weight shape [rows, cols]
    kind "lut":       group_size int; indices uint8 [rows, cols]; lut float16
                      [rows // group_size, 2**bits]; row_scale float16 [rows] (optional)
    kind "blockwise": block_size int; data int8 [rows, cols]; scale float16
                      [rows, cols // block_size]
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .blockwise import ALLOWED_BITS as BLOCKWISE_BITS
from .blockwise import BlockwisePack, check_blockwise_pack
from .lut import ALLOWED_BITS as LUT_BITS
from .lut import LutPack, check_lut_pack

FORMAT_VERSION = 1
_FIELDS = {
    "lut": ("group_size", "indices", "lut"),
    "blockwise": ("block_size", "data", "scale"),
}
_COMMON_FIELDS = ("format", "kind", "bits", "shape")
_REMEDY = "re-create it with qwen3build.quant.packfile.save_pack (or delete it to refit)"


def save_pack(path: str | os.PathLike, pack: LutPack | BlockwisePack) -> None:
    """Write `pack` to `path` (.npz) atomically: a reader never sees a half-written file."""
    path = Path(path)
    common = {"format": np.int64(FORMAT_VERSION), "bits": np.int64(pack.bits)}
    common["shape"] = np.asarray(pack.shape, np.int64)
    if isinstance(pack, LutPack):
        fields = dict(
            common,
            kind=np.str_("lut"),
            group_size=np.int64(pack.group_size),
            indices=pack.indices,
            lut=pack.lut,
        )
        if pack.row_scale is not None:
            fields["row_scale"] = pack.row_scale
    elif isinstance(pack, BlockwisePack):
        fields = dict(
            common,
            kind=np.str_("blockwise"),
            block_size=np.int64(pack.block_size),
            data=pack.data,
            scale=pack.scale,
        )
    else:
        raise TypeError(f"save_pack: expected LutPack or BlockwisePack, got {type(pack).__name__}")
    tmp = path.with_name(path.name + ".tmp")
    _write_npz(tmp, fields)
    os.replace(tmp, path)


# np.savez stamps each member with the current time: two saves of the same pack would
# differ. Members are written here in sorted order with a fixed timestamp instead.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _write_npz(path: Path, fields: dict) -> None:
    """An uncompressed .npz (np.load reads it) whose bytes depend on `fields` only."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(fields):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(fields[name]), allow_pickle=False)


def load_pack(
    path: str | os.PathLike, expect_shape: tuple[int, int], expect_bits: int | None = None
) -> LutPack | BlockwisePack:
    """Read and validate a pack; raise ValueError "<path>: <problem>; <what to do>" if unusable."""
    path = Path(path)

    def fail(problem: str):
        raise ValueError(f"{path}: {problem}; {_REMEDY}")

    if not path.is_file():
        raise ValueError(f"{path}: no such pack file; check the pack directory or refit it")
    try:
        with np.load(path, allow_pickle=False) as npz:
            fields = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        fail(f"not a readable .npz pack ({type(err).__name__}: {err})")

    missing = [name for name in _COMMON_FIELDS if name not in fields]
    if missing:
        fail(f"missing field(s) {missing}")
    if int(fields["format"]) != FORMAT_VERSION:
        fail(f"format {int(fields['format'])} is not the supported {FORMAT_VERSION}")
    kind = str(fields["kind"])
    if kind not in _FIELDS:
        fail(f"kind {kind!r} is not one of {sorted(_FIELDS)}")
    missing = [name for name in _FIELDS[kind] if name not in fields]
    if missing:
        fail(f"{kind} pack is missing field(s) {missing}")

    shape = tuple(int(n) for n in np.asarray(fields["shape"]).reshape(-1))
    if shape != tuple(expect_shape):
        fail(f"pack is for shape {list(shape)} but the model tensor is {list(expect_shape)}")
    bits = int(fields["bits"])
    allowed = LUT_BITS if kind == "lut" else BLOCKWISE_BITS
    if bits not in allowed:
        fail(f"bits={bits} is not one of {allowed} for a {kind} pack")
    if expect_bits is not None and bits != expect_bits:
        fail(f"pack has {bits} bits but the config asks for {expect_bits}")

    if kind == "lut":
        dense_name = "indices"
        values = dict(
            indices=fields["indices"],
            lut=fields["lut"],
            row_scale=fields.get("row_scale"),
            bits=bits,
            group_size=int(fields["group_size"]),
        )
        check, pack_class = check_lut_pack, LutPack
    else:
        dense_name = "data"
        values = dict(
            data=fields["data"], scale=fields["scale"], bits=bits, block_size=int(fields["block_size"])
        )
        check, pack_class = check_blockwise_pack, BlockwisePack
    if values[dense_name].shape != shape:
        fail(f"{dense_name} shape {list(values[dense_name].shape)} != shape field {list(shape)}")
    # Validate the plain fields first, so the message names the file rather than the class.
    try:
        check(SimpleNamespace(**values), where=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; {_REMEDY}") from None
    return pack_class(**values)
