"""Fit (or take from LUT_DIR / OMNIQ_DIR) the quantization packs of one layer or of the
embedding/head (where they live: quant/layout.py)."""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import BuildError
from .blockwise import BlockwisePack, fit_blockwise
from .layout import EMBED_PACKS, embed_pack_names, layer_pack_dir  # noqa: F401 (re-exported)
from .lut import fit_grouped_lut
from .packfile import load_pack, save_pack

log = logging.getLogger(__name__)

def make_layer_packs(tensors, allocation: dict, group_size: int | Mapping, layer: int, out_dir: Path,
                     external: dict[str, Path] | None = None) -> dict:
    """Write <kind>.npz for every quantized projection of `layer` into out_dir; returns stats.

    tensors: a tensor source (name -> fp32 array, `.shape(name)`, `.dtype(name)`);
    allocation: kind -> bits (None = fp16, no pack); group_size: LUT rows per group, one
    for every kind or kind -> size (the plan's per-matrix sizes); external: kind -> a pack
    file made elsewhere (LUT_DIR), validated and used instead of fitting."""
    from ..checkpoint.tensors import layer_tensor_name
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for kind, bits in allocation.items():
        if not bits:
            continue
        size = group_size[kind] if isinstance(group_size, Mapping) else group_size
        name = layer_tensor_name(layer, kind)
        shape = tensors.shape(name)
        started = time.perf_counter()
        weight = tensors.tensor(name)
        if external:
            source = external[kind]
            try:
                pack = load_pack(source, shape, expect_bits=bits)
            except ValueError as error:
                raise BuildError(f"LUT_DIR: {error}") from None
            if pack.group_size != size:
                raise BuildError(f"LUT_DIR: {source}: group_size {pack.group_size} but the recipe uses "
                                 f"{size} for {kind}; refit the pack or change the recipe")
            shutil.copyfile(source, out_dir / f"{kind}.npz")
            origin = "LUT_DIR"
        else:
            try:
                pack = fit_grouped_lut(weight, bits, size)
            except ValueError as error:
                raise BuildError(f"{name}: {error}") from None
            save_pack(out_dir / f"{kind}.npz", pack)
            origin = "fitted"
        error = float(np.mean((pack.dequantize() - weight) ** 2))
        log.info("%s %s --> lut%d/g%d (%s), shape = %s, mse = %.3g, %.1fs", name, tensors.dtype(name),
                 pack.bits, pack.group_size, origin, list(shape), error, time.perf_counter() - started)
        stats[kind] = {"bits": pack.bits, "mse": error}
    return stats


def make_embed_packs(tensors, bits: int, block_size: int, tied: bool, out_dir: Path,
                     external: dict[str, Path] | None = None) -> dict:
    """Write embed_tokens.npz (and lm_head.npz when untied); external: pack name -> a
    pack file made elsewhere (OMNIQ_DIR), validated and used instead of fitting."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for pack_name in embed_pack_names(tied):
        tensor = EMBED_PACKS[pack_name]
        shape = tensors.shape(tensor)
        weight = tensors.tensor(tensor)
        if external:
            source = external[pack_name]
            try:
                pack = load_pack(source, shape, expect_bits=bits)
            except ValueError as error:
                raise BuildError(f"OMNIQ_DIR: {error}") from None
            if not isinstance(pack, BlockwisePack):
                raise BuildError(f"OMNIQ_DIR: {source}: a {type(pack).__name__} pack; embedding/head packs are blockwise")
            shutil.copyfile(source, out_dir / f"{pack_name}.npz")
        else:
            if shape[1] % block_size:
                raise BuildError(f"{tensor}: hidden size {shape[1]} is not a multiple of the block size {block_size}")
            pack = fit_blockwise(weight, bits=bits, block_size=block_size)
            save_pack(out_dir / f"{pack_name}.npz", pack)
        error = pack.mse(weight)
        del weight
        log.info("%s --> int%d blockwise/b%d, shape = %s, mse = %.3g", tensor, pack.bits, pack.block_size, list(shape), error)
        stats[pack_name] = {"bits": pack.bits, "mse": error}
    return stats
