"""Quantization recipes: bits per matrix kind and per layer, read from qwen3build.toml.

A recipe resolves, for one model depth, to the bits of every projection of every layer
(None = fp16) and the embedding/head scheme. Artifacts key on their resolved slice only,
so changing a recipe requantizes exactly the layers whose bits changed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import BuildError
from ..paths import DEFAULTS_FILE
from .defaults import read_defaults, read_toml
from .model_config import PROJECTIONS
from ..quant.blockwise import ALLOWED_BITS as EMBED_BITS
from ..quant.lut import ALLOWED_BITS as LUT_BITS, DEFAULT_GROUP_SIZE

EMBED_BLOCK_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    projections: dict          # kind -> bits (absent: fp16)
    layer_bits: dict           # layer index (may be negative) -> bits for every projection
    embed_bits: int | None     # None: fp16 embedding/head
    group_size: int = DEFAULT_GROUP_SIZE
    embed_block_size: int = EMBED_BLOCK_SIZE

    def layer_allocation(self, layer: int, num_layers: int) -> dict[str, int | None]:
        """Bits of each projection kind in `layer` (None = fp16)."""
        override = None
        for index, bits in self.layer_bits.items():
            if (index if index >= 0 else num_layers + index) == layer:
                override = bits
        return {kind: override if override is not None else self.projections.get(kind) for kind in PROJECTIONS}

    def quantizes(self, num_layers: int) -> bool:
        return any(bits for layer in range(num_layers) for bits in self.layer_allocation(layer, num_layers).values())


def load_recipe(name: str, defaults_file: Path = DEFAULTS_FILE) -> Recipe:
    recipes = (read_defaults(defaults_file).recipes if defaults_file == DEFAULTS_FILE
               else read_toml(defaults_file, "RECIPE_FILE").get("recipes", {}))
    if name not in recipes:
        raise BuildError(f"RECIPE={name} is not defined; recipes in {defaults_file.name}: {', '.join(recipes)}")
    raw = recipes[name]
    where = f"{defaults_file.name} [recipes.{name}]"
    unknown = set(raw) - {"description", "projections", "layer_bits", "embed_bits", "group_size"}
    if unknown:
        raise BuildError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    projections = dict(raw.get("projections", {}))
    for kind, bits in projections.items():
        if kind not in PROJECTIONS:
            raise BuildError(f"{where}: projection {kind!r} is not one of {', '.join(PROJECTIONS)}")
        if bits not in LUT_BITS:
            raise BuildError(f"{where}: {kind} = {bits} bits; LUT bits must be one of {LUT_BITS}")
    layer_bits = {}
    for index, bits in raw.get("layer_bits", {}).items():
        try:
            layer_bits[int(index)] = bits
        except ValueError:
            raise BuildError(f"{where}: layer_bits key {index!r} is not a layer index like \"0\" or \"-1\"") from None
        if bits not in LUT_BITS:
            raise BuildError(f"{where}: layer_bits {index} = {bits}; LUT bits must be one of {LUT_BITS}")
    embed_bits = raw.get("embed_bits")
    if embed_bits is not None and embed_bits not in EMBED_BITS:
        raise BuildError(f"{where}: embed_bits = {embed_bits}; blockwise bits must be one of {EMBED_BITS}")
    group_size = raw.get("group_size", DEFAULT_GROUP_SIZE)
    return Recipe(name, raw.get("description", ""), projections, layer_bits, embed_bits, group_size)
