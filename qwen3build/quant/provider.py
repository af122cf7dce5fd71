"""The weights exactly as a recipe packs them: what every lowering takes its weights from.

`projection(layer, kind)` and `table(head)` give either a dense fp16 array or a pack
(LutPack / BlockwisePack). The MIL lowering emits a pack as constexpr ops; the torch
reference and the Core AI lowering take the same values. So the reference always
computes with exactly the packed values, and no lowering re-quantizes anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint.tensors import layer_tensor_name
from .blockwise import BlockwisePack
from .lut import LutPack
from .packfile import load_pack
from .layout import EMBED_PACKS, layer_pack_dir


class PackedWeights:
    """Projection and embedding/head weights of one build.

    tensors: a tensor source with tensor_fp16(name) and shape(name) (checkpoint or the
    declared inputs of an artifact); allocation(layer) -> {kind: bits or None};
    layer_packs: layer -> directory of its <kind>.npz packs; embed_packs: directory of
    the embedding/head packs, or None for fp16; tied: the head is the embedding."""

    def __init__(self, tensors, allocation, layer_packs: dict[int, Path], embed_packs: Path | None, tied: bool):
        self.tensors, self.allocation, self.tied = tensors, allocation, tied
        self.layer_packs, self.embed_packs = layer_packs, embed_packs
        self._packs: dict = {}

    @classmethod
    def dense(cls, tensors, tied: bool) -> "PackedWeights":
        """Every weight as fp16 (the fp16 recipe)."""
        return cls(tensors, lambda layer: {}, {}, None, tied)

    @classmethod
    def from_pack_root(cls, tensors, recipe, num_layers: int, root: Path, tied: bool) -> "PackedWeights":
        """Packs laid out as a build publishes them: root/layerNN/<kind>.npz, root/embed/."""
        allocation = lambda layer: recipe.layer_allocation(layer, num_layers)  # noqa: E731
        layers = {layer: layer_pack_dir(root, layer) for layer in range(num_layers)
                  if any(allocation(layer).values())}
        return cls(tensors, allocation, layers, root / "embed" if recipe.embed_bits else None, tied)

    # -- projections ------------------------------------------------------------
    def projection(self, layer: int, kind: str) -> np.ndarray | LutPack:
        """fp16 [out, in] array, or the LutPack when the recipe quantizes it."""
        name = layer_tensor_name(layer, kind)
        if not self.allocation(layer).get(kind):
            return self.tensors.tensor_fp16(name)
        key = (layer, kind)
        if key not in self._packs:
            self._packs[key] = load_pack(self.layer_packs[layer] / f"{kind}.npz", self.tensors.shape(name))
        return self._packs[key]

    def projection_array(self, layer: int, kind: str) -> np.ndarray:
        """fp32 values exactly as packed (fp16-rounded, or dequantized)."""
        return as_array(self.projection(layer, kind))

    # -- embedding / head -------------------------------------------------------
    def table(self, head: bool = False) -> np.ndarray | BlockwisePack:
        pack_name = "lm_head" if head and not self.tied else "embed_tokens"
        tensor = EMBED_PACKS[pack_name]
        if self.embed_packs is None:
            return self.tensors.tensor_fp16(tensor)
        if pack_name not in self._packs:
            self._packs[pack_name] = load_pack(self.embed_packs / f"{pack_name}.npz", self.tensors.shape(tensor))
        return self._packs[pack_name]

    def table_array(self, head: bool = False) -> np.ndarray:
        return as_array(self.table(head))

    # -- reports ----------------------------------------------------------------
    def projection_bits(self, layers) -> float:
        """Average bits per projection weight over `layers` (LUT and scale overhead included)."""
        total_bits = total_params = 0
        for layer in layers:
            for kind in self.allocation(layer):
                value = self.projection(layer, kind)
                params = int(np.prod(value.shape))
                total_params += params
                total_bits += pack_bits(value)
        return total_bits / max(total_params, 1)

    def table_bits(self) -> float:
        value = self.table(head=False)
        return pack_bits(value) / int(np.prod(value.shape))


def as_array(value) -> np.ndarray:
    """fp32 of a dense fp16 array or a pack's dequantized values."""
    if isinstance(value, (LutPack, BlockwisePack)):
        return value.dequantize()
    return np.asarray(value).astype(np.float32)


def pack_bits(value) -> int:
    """Bits the packages store for one weight (dense fp16, LUT + indices + scales, or blocks)."""
    if isinstance(value, LutPack):
        bits = value.bits * value.indices.size + 16 * value.lut.size
        return bits + 16 * (value.row_scale.size if value.row_scale is not None else 0)
    if isinstance(value, BlockwisePack):
        return value.bits * value.data.size + 16 * value.scale.size
    return 16 * int(np.prod(np.shape(value)))
