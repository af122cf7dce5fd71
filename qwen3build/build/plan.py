"""The build plan: settings + model config + layout + recipe + checkpoint files, validated
up front.

Making a plan reads config.json and the safetensors headers, never weight bytes, so
every input error surfaces before any work, and dodo.py stays fast.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

from ..checkpoint.reader import Checkpoint, resolve_weight_files
from ..checkpoint.tensors import layer_tensor_name
from ..errors import BuildError
from ..paths import BuildTree
from ..quant.packs import embed_pack_names, layer_pack_dir
from ..settings.layout import ShardSpec, parse_layout
from ..settings.limits import ANE_MAX_LAYERS_PER_SHARD
from ..settings.model_config import ModelConfig, load_model_config
from ..settings.recipes import Recipe, load_recipe
from ..settings.settings import Settings, load_settings

log = logging.getLogger(__name__)

IO_MODEL = "io_model"
SAMPLER = "sampler_model"


@dataclasses.dataclass(frozen=True)
class Plan:
    settings: Settings
    config: ModelConfig
    layout: tuple[ShardSpec, ...]
    weight_files: tuple[Path, ...]
    weight_index: Path | None
    recipe: Recipe

    @property
    def tree(self) -> BuildTree:
        return self.settings.tree

    def quantized_layers(self, layers=None) -> list[int]:
        """Layers with at least one quantized projection under the recipe."""
        depth = self.config.num_hidden_layers
        layers = range(depth) if layers is None else layers
        return [l for l in layers if any(self.recipe.layer_allocation(l, depth).values())]

    def allocation(self, layer: int) -> dict:
        return self.recipe.layer_allocation(layer, self.config.num_hidden_layers)

    def shard(self, name: str) -> ShardSpec:
        for spec in self.layout:
            if spec.name == name:
                return spec
        raise BuildError(f"no shard named {name!r}; the layout has {', '.join(s.name for s in self.layout)}")

    @property
    def packages(self) -> list[str]:
        return [IO_MODEL] + [s.package_name for s in self.layout] + [SAMPLER]

    # -- the artifacts of the plan (ids; build/declare.py says what each reads) ------
    def quant_ids(self) -> list[str]:
        ids = [f"quant:layer{layer:02d}" for layer in self.quantized_layers()]
        return ids + (["quant:embed"] if self.recipe.embed_bits else [])

    def package_ids(self) -> list[str]:
        return [IO_MODEL] + [f"shard:{spec.name}" for spec in self.layout] + [SAMPLER]

    def artifact_ids(self) -> list[str]:
        return ["slanc", *self.quant_ids(), *self.package_ids()]

    def upstream_ids(self, artifact: str) -> list[str]:
        """The artifacts whose outputs `artifact` reads (its doit task_dep)."""
        kind, _, name = artifact.partition(":")
        if kind == "shard":
            spec = self.shard(name)
            return ["slanc"] + [f"quant:layer{layer:02d}" for layer in self.quantized_layers(spec.layers)]
        if kind == IO_MODEL and self.recipe.embed_bits:
            return ["quant:embed"]
        return []

    @functools.cached_property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.config, list(self.weight_files), self.weight_index)

    @property
    def stat_inputs(self) -> list[Path]:
        """Files whose (inode, size, mtime) guard the weights manifest."""
        extra = [self.settings.CONFIG]
        gen = self.settings.CONFIG.with_name("generation_config.json")
        if gen.is_file():
            extra.append(gen)
        if self.weight_index:
            extra.append(self.weight_index)
        return list(self.weight_files) + extra


def make_plan(overrides: dict | None = None, environ: dict | None = None) -> Plan:
    settings = load_settings(overrides, environ)
    config = load_model_config(settings.CONFIG)
    layout = parse_layout(settings.SHARDS, config.num_hidden_layers)
    if settings.SEQ_LEN > config.max_position_embeddings:
        raise BuildError(f"SEQ_LEN={settings.SEQ_LEN} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; choose SEQ_LEN <= {config.max_position_embeddings}")
    recipe = load_recipe(settings.RECIPE, settings.RECIPE_FILE)
    files, index = resolve_weight_files(settings.CONFIG, settings.WEIGHTS, settings.WEIGHTS_INDEX, settings.WEIGHTS_GLOB)
    for spec in layout:
        if len(spec.layers) > ANE_MAX_LAYERS_PER_SHARD:
            log.warning("shard %s has %d layers: above ~%d layers per chunk the ANE compiler has been seen to fail",
                        spec.name, len(spec.layers), ANE_MAX_LAYERS_PER_SHARD)
    if settings.LUT_DIR is not None and not settings.LUT_DIR.is_dir():
        raise BuildError(f"LUT_DIR={settings.LUT_DIR} is not a directory of layerNN/<kind>.npz packs (docs/quantization.md)")
    if settings.OMNIQ_DIR is not None and not settings.OMNIQ_DIR.is_dir():
        raise BuildError(f"OMNIQ_DIR={settings.OMNIQ_DIR} is not a directory of embed_tokens.npz / lm_head.npz packs")
    if settings.SCALES is not None and not settings.SCALES.is_file():
        raise BuildError(f"SCALES={settings.SCALES} does not exist; give a .npy of shape (layers + 1, 4) or leave SCALES empty")
    plan = Plan(settings, config, layout, tuple(files), index, recipe)
    _check_recipe_fits(plan)
    _check_external_packs(plan)
    return plan


def _check_recipe_fits(plan: Plan) -> None:
    """Every quantized matrix splits into whole LUT groups / blockwise blocks."""
    from ..checkpoint.tensors import LAYER_TENSORS
    recipe, config = plan.recipe, plan.config
    for layer in plan.quantized_layers():
        for kind, bits in plan.allocation(layer).items():
            rows = LAYER_TENSORS[kind][1](config)[0]
            if bits and rows % recipe.group_size:
                raise BuildError(f"RECIPE={recipe.name}: {kind} has {rows} output channels, not a multiple of the LUT "
                                 f"group_size {recipe.group_size}; use RECIPE=fp16 or a recipe with a group_size dividing it")
    if recipe.embed_bits and config.hidden_size % recipe.embed_block_size:
        raise BuildError(f"RECIPE={recipe.name}: hidden size {config.hidden_size} is not a multiple of the embedding "
                         f"block size {recipe.embed_block_size}; use a recipe without embed_bits")


def external_layer_packs(plan: Plan, layer: int) -> dict[str, Path]:
    """kind -> LUT_DIR pack file of every quantized projection of `layer` (LUT_DIR given)."""
    root = plan.settings.LUT_DIR
    return {kind: layer_pack_dir(root, layer) / f"{kind}.npz" for kind, bits in plan.allocation(layer).items() if bits}


def external_embed_packs(plan: Plan) -> dict[str, Path]:
    root = plan.settings.OMNIQ_DIR
    return {name: root / f"{name}.npz" for name in embed_pack_names(plan.config.tie_word_embeddings)}


def _check_external_packs(plan: Plan) -> None:
    """Every pack LUT_DIR / OMNIQ_DIR must supply exists (contents are validated when used)."""
    settings = plan.settings
    if settings.LUT_DIR is not None:
        missing = [str(path.relative_to(settings.LUT_DIR)) for layer in plan.quantized_layers()
                   for path in external_layer_packs(plan, layer).values() if not path.is_file()]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BuildError(f"LUT_DIR={settings.LUT_DIR} lacks {', '.join(missing[:3])}{more} "
                             f"needed by RECIPE={plan.recipe.name}; see docs/quantization.md for the layout")
    if settings.OMNIQ_DIR is not None and plan.recipe.embed_bits:
        missing = [path.name for path in external_embed_packs(plan).values() if not path.is_file()]
        if missing:
            raise BuildError(f"OMNIQ_DIR={settings.OMNIQ_DIR} lacks {', '.join(missing)} needed by RECIPE={plan.recipe.name}")


def tensors_of_layer(layer: int, kinds) -> list[str]:
    return [layer_tensor_name(layer, kind) for kind in kinds]
