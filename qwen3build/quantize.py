"""Quantization packs for a build, and the weights provider that serves them.

`quant:layerNN` makes one pack file per quantized projection of layer NN
(artifacts/quant/layerNN/<kind>.npz), fitted here (GS128 grouped LUT, exact k-means) or
taken from LUT_DIR (validated). `quant:embed` makes the blockwise embedding/head packs
(or takes them from OMNIQ_DIR). RecipeWeights hands the same packed values to the MIL
lowering (constexpr ops, no dense weights) and to the torch reference (dequantized).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import BuildError
from .lower.programs import DenseWeights
from .quant.blockwise import BlockwisePack, fit_blockwise
from .quant.lut import LutPack, fit_grouped_lut
from .quant.packfile import load_pack, save_pack
from .recipes import EMBED_PACKS, Recipe, embed_pack_names, layer_pack_dir as layer_dir
from .weights import layer_tensor_name

log = logging.getLogger(__name__)

def _check_group(recipe: Recipe, name: str, shape) -> None:
    if shape[0] % recipe.group_size:
        raise BuildError(f"{name}: {shape[0]} output channels are not a multiple of the recipe's group_size "
                         f"{recipe.group_size}; set group_size in [recipes.{recipe.name}] to a divisor")


def make_layer_packs(checkpoint, recipe: Recipe, layer: int, out_dir: Path, external_dir: Path | None) -> dict:
    """Write <kind>.npz for every quantized projection of `layer`; returns stats."""
    config = checkpoint.config
    allocation = recipe.layer_allocation(layer, config.num_hidden_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for kind, bits in allocation.items():
        if not bits:
            continue
        name = layer_tensor_name(layer, kind)
        shape = checkpoint.entries[name].shape
        started = time.perf_counter()
        if external_dir is not None:
            source = layer_dir(external_dir, layer) / f"{kind}.npz"
            try:
                pack = load_pack(source, shape)
            except ValueError as error:
                raise BuildError(f"LUT_DIR: {error}") from None
            if pack.group_size != recipe.group_size:
                raise BuildError(f"LUT_DIR: {source}: group_size {pack.group_size} but the recipe uses "
                                 f"{recipe.group_size}; refit the pack or change the recipe")
            shutil.copyfile(source, out_dir / f"{kind}.npz")
            origin = "LUT_DIR"
        else:
            _check_group(recipe, name, shape)
            weight = checkpoint.tensor(name)
            pack = fit_grouped_lut(weight, bits, recipe.group_size)
            save_pack(out_dir / f"{kind}.npz", pack)
            origin = "fitted"
        error = float(np.mean((pack.dequantize() - checkpoint.tensor(name)) ** 2))
        log.info("%s %s --> lut%d/g%d (%s), shape = %s, mse = %.3g, %.1fs", name, checkpoint.entries[name].dtype,
                 pack.bits, pack.group_size, origin, list(shape), error, time.perf_counter() - started)
        stats[kind] = {"bits": pack.bits, "mse": error}
    return stats


def make_embed_packs(checkpoint, recipe: Recipe, out_dir: Path, external_dir: Path | None) -> dict:
    config = checkpoint.config
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for pack_name in embed_pack_names(config.tie_word_embeddings):
        tensor = EMBED_PACKS[pack_name]
        shape = checkpoint.entries[tensor].shape
        if external_dir is not None:
            source = external_dir / f"{pack_name}.npz"
            try:
                pack = load_pack(source, shape)
            except ValueError as error:
                raise BuildError(f"OMNIQ_DIR: {error}") from None
            if not isinstance(pack, BlockwisePack):
                raise BuildError(f"OMNIQ_DIR: {source}: a {type(pack).__name__} pack; embedding/head packs are blockwise")
            shutil.copyfile(source, out_dir / f"{pack_name}.npz")
        else:
            if shape[1] % recipe.embed_block_size:
                raise BuildError(f"{tensor}: hidden size {shape[1]} is not a multiple of the block size {recipe.embed_block_size}")
            pack = fit_blockwise(checkpoint.tensor(tensor), bits=recipe.embed_bits, block_size=recipe.embed_block_size)
            save_pack(out_dir / f"{pack_name}.npz", pack)
        error = float(np.mean((pack.dequantize() - checkpoint.tensor(tensor)) ** 2))
        log.info("%s --> int%d blockwise/b%d, shape = %s, mse = %.3g", tensor, pack.bits, pack.block_size, list(shape), error)
        stats[pack_name] = {"bits": pack.bits, "mse": error}
    return stats


class RecipeWeights:
    """Projection and embedding weights as a recipe packs them (dense fp16 where it doesn't)."""

    def __init__(self, checkpoint, recipe: Recipe, quant_root: Path):
        self.checkpoint, self.recipe, self.quant_root = checkpoint, recipe, quant_root
        self.dense = DenseWeights(checkpoint)
        self._packs: dict = {}

    def _layer_pack(self, layer: int, kind: str) -> LutPack | None:
        bits = self.recipe.layer_allocation(layer, self.checkpoint.config.num_hidden_layers)[kind]
        if not bits:
            return None
        key = (layer, kind)
        if key not in self._packs:
            shape = self.checkpoint.entries[layer_tensor_name(layer, kind)].shape
            self._packs[key] = load_pack(layer_dir(self.quant_root, layer) / f"{kind}.npz", shape)
        return self._packs[key]

    def _embed_pack(self, pack_name: str) -> BlockwisePack | None:
        if not self.recipe.embed_bits:
            return None
        if pack_name not in self._packs:
            shape = self.checkpoint.entries[EMBED_PACKS[pack_name]].shape
            self._packs[pack_name] = load_pack(self.quant_root / "embed" / f"{pack_name}.npz", shape)
        return self._packs[pack_name]

    # -- the provider interface (see lower/programs.DenseWeights)
    def projection_array(self, layer: int, kind: str) -> np.ndarray:
        pack = self._layer_pack(layer, kind)
        return self.dense.projection_array(layer, kind) if pack is None else pack.dequantize()

    def projection_var(self, layer: int, kind: str, name: str):
        pack = self._layer_pack(layer, kind)
        if pack is None:
            return self.dense.projection_var(layer, kind, name)
        from .quant.mil_emit import lut_weight
        return lut_weight(pack, name)

    def _table_pack(self, head: bool) -> str:
        return "lm_head" if head and not self.checkpoint.config.tie_word_embeddings else "embed_tokens"

    def table_array(self, head: bool = False) -> np.ndarray:
        pack = self._embed_pack(self._table_pack(head))
        if pack is not None:
            return pack.dequantize()
        return self.dense.head_array() if head else self.dense.embed_array()

    def table_var(self, name: str, head: bool = False):
        pack = self._embed_pack(self._table_pack(head))
        if pack is None:
            tensor = self.checkpoint.head_name if head else "model.embed_tokens.weight"
            from coremltools.converters.mil import Builder as mb
            return mb.const(val=self.checkpoint.tensor_fp16(tensor), name=name)
        from .quant.mil_emit import blockwise_weight
        return blockwise_weight(pack, name)

    def embed_array(self) -> np.ndarray:
        return self.table_array(head=False)

    def head_array(self) -> np.ndarray:
        return self.table_array(head=True)

    def projection_bits(self, layers) -> float:
        """Average bits per projection weight over `layers` (LUT and scale overhead included)."""
        total_bits = total_params = 0
        for layer in layers:
            for kind in self.recipe.layer_allocation(layer, self.checkpoint.config.num_hidden_layers):
                pack = self._layer_pack(layer, kind)
                params = int(np.prod(self.checkpoint.entries[layer_tensor_name(layer, kind)].shape))
                total_params += params
                if pack is None:
                    total_bits += 16 * params
                else:
                    total_bits += pack.bits * params + 16 * pack.lut.size
                    total_bits += 16 * (pack.row_scale.size if pack.row_scale is not None else 0)
        return total_bits / max(total_params, 1)

    def table_bits(self) -> float:
        pack = self._embed_pack("embed_tokens")
        if pack is None:
            return 16.0
        return (pack.bits * pack.data.size + 16 * pack.scale.size) / pack.data.size
