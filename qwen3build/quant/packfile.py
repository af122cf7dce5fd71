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


# Fields small enough to read whole when only the pack's layout is checked.
_SCALAR_FIELDS = ("format", "kind", "bits", "shape", "group_size", "block_size")
# Dense fields: dtype and shape each must have, given the pack's rows, cols, bits and group.
_DENSE_LAYOUT = {
    "lut": {"indices": (np.uint8, lambda r, c, b, g: (r, c)),
            "lut": (np.float16, lambda r, c, b, g: (r // g, 1 << b)),
            "row_scale": (np.float16, lambda r, c, b, g: (r,))},
    "blockwise": {"data": (np.int8, lambda r, c, b, g: (r, c)),
                  "scale": (np.float16, lambda r, c, b, g: (r, c // g))},
}


def _read_member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one .npy member, from its header only (no data read)."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(member)
    return tuple(shape), dtype


def _layout(path: Path, scalars: dict, dense: dict, expect_shape, expect_bits, expect_kind, fail) -> dict:
    """Check a pack's fields against each other and the model tensor; `dense` holds the
    (shape, dtype) of each array field. Returns kind, bits and group_size / block_size."""
    missing = [name for name in _COMMON_FIELDS if name not in scalars]
    if missing:
        fail(f"missing field(s) {missing}")

    def whole(name):
        value = np.asarray(scalars[name])
        if value.shape != () or not np.issubdtype(value.dtype, np.integer):
            fail(f"field {name} must be one integer, got {value.dtype} {list(value.shape)}")
        return int(value)

    if whole("format") != FORMAT_VERSION:
        fail(f"format {whole('format')} is not the supported {FORMAT_VERSION}")
    kind = str(scalars["kind"])
    if kind not in _FIELDS:
        fail(f"kind {kind!r} is not one of {sorted(_FIELDS)}")
    if expect_kind is not None and kind != expect_kind:
        fail(f"a {kind} pack, but this tensor needs a {expect_kind} pack")
    missing = [name for name in _FIELDS[kind] if name not in scalars and name not in dense]
    if missing:
        fail(f"{kind} pack is missing field(s) {missing}")
    shape_field = np.asarray(scalars["shape"])
    if shape_field.ndim != 1 or not np.issubdtype(shape_field.dtype, np.integer):
        fail(f"field shape must be integers [rows, cols], got {shape_field.dtype} {list(shape_field.shape)}")
    shape = tuple(int(n) for n in shape_field)
    if shape != tuple(expect_shape):
        fail(f"pack is for shape {list(shape)} but the model tensor is {list(expect_shape)}")
    bits = whole("bits")
    allowed = LUT_BITS if kind == "lut" else BLOCKWISE_BITS
    if bits not in allowed:
        fail(f"bits={bits} is not one of {allowed} for a {kind} pack")
    if expect_bits is not None and bits != expect_bits:
        fail(f"pack has {bits} bits but the config asks for {expect_bits}")
    group_name = "group_size" if kind == "lut" else "block_size"
    group = whole(group_name)
    rows, cols = shape
    if group < 1 or (rows if kind == "lut" else cols) % group:
        fail(f"{group_name}={group} does not divide the tensor's {'rows' if kind == 'lut' else 'columns'} "
             f"({rows if kind == 'lut' else cols})")
    for name, (dtype, expected_shape) in _DENSE_LAYOUT[kind].items():
        if name not in dense:
            continue  # optional (row_scale); required ones were checked above
        got_shape, got_dtype = dense[name]
        want = expected_shape(rows, cols, bits, group)
        if got_dtype != np.dtype(dtype) or got_shape != want:
            fail(f"{name} must be {np.dtype(dtype).name} {list(want)}, got {got_dtype} {list(got_shape)}")
    return {"kind": kind, "bits": bits, group_name: group}


def _open_npz(path: Path, fail) -> zipfile.ZipFile:
    if not path.is_file():
        raise ValueError(f"{path}: no such pack file; check the pack directory or refit it")
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        fail(f"not a readable .npz pack ({type(err).__name__}: {err})")


def inspect_pack(path: str | os.PathLike, expect_shape: tuple[int, int], expect_bits: int | None = None,
                 expect_kind: str | None = None) -> dict:
    """Check a pack's layout from its small fields and its arrays' headers (no weight
    data read): what can be known before any work. Returns kind, bits and the group /
    block size; raises ValueError "<path>: <problem>; <what to do>" like load_pack."""
    path = Path(path)

    def fail(problem: str):
        raise ValueError(f"{path}: {problem}; {_REMEDY}")

    scalars, dense = {}, {}
    try:
        with _open_npz(path, fail) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name in _SCALAR_FIELDS:
                    with archive.open(info) as member:
                        scalars[name] = np.lib.format.read_array(member, allow_pickle=False)
                else:
                    dense[name] = _read_member_header(archive, info)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if str(err).startswith(str(path)):
            raise
        fail(f"not a readable .npz pack ({type(err).__name__}: {err})")
    return _layout(path, scalars, dense, expect_shape, expect_bits, expect_kind, fail)


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
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        fail(f"not a readable .npz pack ({type(err).__name__}: {err})")
    scalars = {name: value for name, value in fields.items() if name in _SCALAR_FIELDS}
    dense = {name: (value.shape, value.dtype) for name, value in fields.items() if name not in _SCALAR_FIELDS}
    layout = _layout(path, scalars, dense, expect_shape, expect_bits, None, fail)
    kind, bits = layout["kind"], layout["bits"]
    if kind == "lut":
        values = dict(indices=fields["indices"], lut=fields["lut"], row_scale=fields.get("row_scale"),
                      bits=bits, group_size=layout["group_size"])
        check, pack_class = check_lut_pack, LutPack
    else:
        values = dict(data=fields["data"], scale=fields["scale"], bits=bits, block_size=layout["block_size"])
        check, pack_class = check_blockwise_pack, BlockwisePack
    # The values (finite LUT / scales, indices in range) are checked here, when read.
    try:
        check(SimpleNamespace(**values), where=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; {_REMEDY}") from None
    return pack_class(**values)
