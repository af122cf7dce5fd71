"""Quantization recipes: bits per matrix kind and per layer, read from qwen3build.toml.

A recipe resolves, for one model depth, to the bits of every projection of every layer
(None = fp16) and the embedding/head scheme. Artifacts key on their resolved slice only,
so changing a recipe requantizes exactly the layers whose bits changed.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import BuildError
from ..paths import DEFAULTS_FILE
from .defaults import read_defaults, read_toml
from .model_config import PROJECTIONS
from .settings import closest_name
from .limits import BLOCKWISE_BITS as EMBED_BITS, DEFAULT_GROUP_SIZE, LUT_BITS

EMBED_BLOCK_SIZE = 32


RECIPE_KEYS = ("description", "projections", "layer_bits", "embed_bits", "group_size")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    projections: dict          # kind -> bits (absent: fp16)
    layer_bits: dict           # layer index (may be negative) -> bits for every projection
    embed_bits: int | None     # None: fp16 embedding/head
    group_size: int = DEFAULT_GROUP_SIZE  # LUT rows per group, at most (see lut_group_size)
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

    def lut_group_size(self, rows: int) -> int:
        """LUT group size of a matrix with `rows` output channels: the recipe's group_size
        when it divides `rows`, else the largest divisor of `rows` below it (iOS18
        constexpr_lut_to_dense needs whole groups; a smaller group only adds LUTs)."""
        size = min(self.group_size, rows)
        while rows % size:
            size -= 1
        return size

    def check_depth(self, num_layers: int) -> None:
        """layer_bits indices name layers of a `num_layers`-deep model, each layer once."""
        where = f"[recipes.{self.name}] layer_bits"
        seen: dict[int, tuple[int, int]] = {}
        for index, bits in self.layer_bits.items():
            if not -num_layers <= index < num_layers:
                raise BuildError(f"{where}: layer \"{index}\" is outside the model's {num_layers} layers "
                                 f"(0..{num_layers - 1}, or -{num_layers}..-1 from the end); fix the recipe")
            layer = index % num_layers
            if layer in seen and seen[layer][1] != bits:
                raise BuildError(f"{where}: \"{seen[layer][0]}\" = {seen[layer][1]} and \"{index}\" = {bits} both "
                                 f"name layer {layer}; keep one")
            seen[layer] = (index, bits)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bits(value, allowed, where: str, what: str) -> int:
    """A bit width from the recipe: an integer (not true, 8.0 or "8") among `allowed`."""
    if not _is_int(value) or value not in allowed:
        kind = f" ({type(value).__name__})" if not _is_int(value) else ""
        raise BuildError(f"{where}: {what} = {value!r}{kind}; bits must be an integer, one of "
                         f"{', '.join(map(str, allowed))} (omit it to keep fp16)")
    return value


def load_recipe(name: str, defaults_file: Path = DEFAULTS_FILE) -> Recipe:
    """Read and validate [recipes.<name>] (types and ranges); one-line BuildError on any problem."""
    recipes = (read_defaults(defaults_file).recipes if defaults_file == DEFAULTS_FILE
               else read_toml(defaults_file, "RECIPE_FILE").get("recipes", {}))
    if not isinstance(recipes, dict) or name not in recipes:
        known = ", ".join(recipes) if isinstance(recipes, dict) else "none"
        raise BuildError(f"RECIPE={name} is not defined; recipes in {defaults_file.name}: {known}: choose one")
    raw = recipes[name]
    where = f"{defaults_file.name} [recipes.{name}]"
    if not isinstance(raw, dict):
        raise BuildError(f"{where}: is {type(raw).__name__} {raw!r}, not a table; write [recipes.{name}] with "
                         f"keys {', '.join(RECIPE_KEYS)}")
    for key in raw:
        if key not in RECIPE_KEYS:
            raise BuildError(f"{where}: unknown key {key!r}{closest_name(key, RECIPE_KEYS)}; "
                             f"use one of: {', '.join(RECIPE_KEYS)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise BuildError(f"{where}: description = {description!r} must be a string; quote it")
    projections = raw.get("projections", {})
    if not isinstance(projections, dict):
        raise BuildError(f"{where}: projections = {projections!r} must be a table; write it like "
                         "projections = { q_proj = 8, k_proj = 8 }")
    for kind, bits in projections.items():
        if kind not in PROJECTIONS:
            raise BuildError(f"{where}: projection {kind!r} is unknown{closest_name(kind, PROJECTIONS)}; "
                             f"use one of: {', '.join(PROJECTIONS)}")
        _bits(bits, LUT_BITS, where, f"projections.{kind}")
    layer_table = raw.get("layer_bits", {})
    if not isinstance(layer_table, dict):
        raise BuildError(f"{where}: layer_bits = {layer_table!r} must be a table; write it like "
                         f"layer_bits = {{ \"0\" = 8, \"-1\" = 8 }}")
    layer_bits = {}
    for index, bits in layer_table.items():
        if not re.fullmatch(r"-?[0-9]+", index):
            raise BuildError(f"{where}: layer_bits key {index!r} is not a layer index; write \"0\" for the first "
                             "layer, \"-1\" for the last")
        layer_bits[int(index)] = _bits(bits, LUT_BITS, where, f"layer_bits.\"{index}\"")
    embed_bits = raw.get("embed_bits")
    if embed_bits is not None:
        _bits(embed_bits, EMBED_BITS, where, "embed_bits")
    group_size = raw.get("group_size", DEFAULT_GROUP_SIZE)
    if not _is_int(group_size) or group_size < 1:
        raise BuildError(f"{where}: group_size = {group_size!r} must be a positive integer; write the rows per "
                         f"LUT group, e.g. group_size = {DEFAULT_GROUP_SIZE}")
    return Recipe(name, description, dict(projections), layer_bits, embed_bits, group_size)
