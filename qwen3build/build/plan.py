"""The build plan: settings + model config + layout + recipe + checkpoint files, validated
up front.

Making a plan reads config.json, the safetensors headers and index, the recipe, SCALES and
the headers of external packs, never weight bytes, and writes nothing: every input error
that can be known without the weights' values surfaces before any work (docs/checks.md),
and dodo.py stays fast.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

from ..checkpoint.reader import Checkpoint, resolve_weight_files
from ..checkpoint.tensors import LAYER_TENSORS, layer_tensor_name
from ..errors import BuildError
from ..paths import BuildTree
from ..quant.layout import EMBED_PACKS, embed_pack_names, layer_pack_dir
from ..settings.layout import ShardSpec, parse_layout
from ..settings.limits import ANE_MAX_LAYERS_PER_SHARD
from ..settings.model_config import PROJECTIONS, ModelConfig, load_model_config
from ..settings.recipes import Recipe, load_recipe
from ..settings.settings import Settings, load_settings, parse_prefill_len, parse_seq_len

log = logging.getLogger(__name__)

IO_MODEL = "io_model"
SAMPLER = "sampler_model"
AIMODEL = "aimodel"  # prefix of the Core AI twins' ids: aimodel:shard:mid


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

    def group_sizes(self, layer: int) -> dict[str, int]:
        """LUT rows per group of each quantized projection of `layer`: the recipe's
        group_size, or the largest divisor of the matrix's output channels below it."""
        return {kind: self.recipe.lut_group_size(LAYER_TENSORS[kind][1](self.config)[0])
                for kind, bits in self.allocation(layer).items() if bits}

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
        """The Core ML packages (whatever FORMATS says: `doit shard:mid` can build one)."""
        return [IO_MODEL] + [f"shard:{spec.name}" for spec in self.layout] + [SAMPLER]

    def aimodel_ids(self) -> list[str]:
        """The Core AI twins of the Core ML packages: aimodel:io_model, aimodel:shard:<name>, ..."""
        return [f"{AIMODEL}:{artifact}" for artifact in self.package_ids()]

    def format_ids(self) -> list[str]:
        """The packages of the formats FORMATS requests (what `doit build` makes and publishes)."""
        formats = self.settings.FORMATS
        return (self.package_ids() if "coreml" in formats else []) + (self.aimodel_ids() if "coreai" in formats else [])

    def artifact_ids(self) -> list[str]:
        return ["slanc", *self.quant_ids(), *self.format_ids()]

    def upstream_ids(self, artifact: str) -> list[str]:
        """The artifacts whose outputs `artifact` reads (its doit task_dep); an aimodel
        reads what its Core ML twin reads."""
        kind, _, name = artifact.partition(":")
        if kind == AIMODEL:
            return self.upstream_ids(name)
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
    """Settings, config.json, layout, recipe, the safetensors headers and index, external
    packs and scales, and the output locations, all checked: a bad input is refused here,
    in one line, before any task runs. Notes (defaults fitted to the model) are logged
    once every check has passed."""
    notes: list[tuple[int, str]] = []
    settings = load_settings(overrides, environ)
    config = load_model_config(settings.CONFIG)
    settings = _fit_seq_len(settings, config, notes)
    layout = parse_layout(settings.SHARDS, config.num_hidden_layers)
    if "coreai" in settings.FORMATS:
        from ..lower.coreai import check_coreai_installed
        check_coreai_installed(f"FORMATS={','.join(settings.FORMATS)}")
    recipe = load_recipe(settings.RECIPE, settings.RECIPE_FILE)
    recipe.check_depth(config.num_hidden_layers)
    files, index = resolve_weight_files(settings.CONFIG, settings.WEIGHTS, settings.WEIGHTS_INDEX, settings.WEIGHTS_GLOB)
    for spec in layout:
        if len(spec.layers) > ANE_MAX_LAYERS_PER_SHARD:
            notes.append((logging.WARNING, f"shard {spec.name} has {len(spec.layers)} layers: above "
                          f"~{ANE_MAX_LAYERS_PER_SHARD} layers per chunk the ANE compiler has been seen to fail"))
    for key in ("LUT_DIR", "OMNIQ_DIR"):
        path = getattr(settings, key)
        if path is not None and not path.is_dir():
            state = "does not exist" if not path.exists() else "is not a directory"
            raise BuildError(f"{key}={path} {state}; point it at a directory of packs laid out as "
                             "docs/quantization.md says, or leave it empty")
    plan = Plan(settings, config, layout, tuple(files), index, recipe)
    plan.checkpoint  # every safetensors header and the index, against config.json (no weight bytes read)
    _check_recipe_fits(plan, notes)
    _check_external_packs(plan)
    _check_scales(plan)
    _check_output_locations(settings)
    for level, note in notes:
        log.log(level, "%s", note)
    return plan


def _fit_seq_len(settings: Settings, config: ModelConfig, notes: list) -> Settings:
    """SEQ_LEN beyond the model's max_position_embeddings: a given value is refused, the
    default is lowered to the model's maximum (with a note)."""
    limit = config.max_position_embeddings
    if settings.SEQ_LEN <= limit:
        return settings
    if "SEQ_LEN" in settings.given:
        raise BuildError(f"SEQ_LEN={settings.SEQ_LEN} exceeds the model's max_position_embeddings={limit}; "
                         f"choose SEQ_LEN <= {limit}")
    notes.append((logging.INFO, f"SEQ_LEN: the default {settings.SEQ_LEN} exceeds the model's "
                  f"max_position_embeddings={limit}; using SEQ_LEN={limit} (set SEQ_LEN to choose)"))
    seq_len = parse_seq_len(limit)
    prefill_len = parse_prefill_len(settings.PREFILL_LEN, seq_len, "PREFILL_LEN" in settings.given)
    return dataclasses.replace(settings, SEQ_LEN=seq_len, PREFILL_LEN=prefill_len)


def _check_recipe_fits(plan: Plan, notes: list) -> None:
    """Every quantized matrix splits into whole LUT groups (a smaller group where the
    recipe's does not divide it: one note per matrix kind) and the embedding/head into
    whole blockwise blocks."""
    recipe, config = plan.recipe, plan.config
    kinds: dict[str, int] = {}  # quantized kind -> its widest bits
    for layer in plan.quantized_layers():
        for kind, bits in plan.allocation(layer).items():
            if bits:
                kinds[kind] = max(bits, kinds.get(kind, 0))
    for kind in (k for k in PROJECTIONS if k in kinds):
        rows, cols = LAYER_TENSORS[kind][1](config)
        size = recipe.lut_group_size(rows)
        if size == recipe.group_size:
            continue
        note = (f"RECIPE={recipe.name}: {kind} has {rows} output channels, not a multiple of group_size "
                f"{recipe.group_size}: its LUT groups are {size} rows")
        lut_bits_per_weight = 16 * (1 << kinds[kind]) / (size * cols)
        if kinds[kind] + lut_bits_per_weight >= 16:
            note += f" (with its LUTs, no smaller than fp16: consider leaving {kind} out of the recipe)"
        notes.append((logging.INFO, note))
    if recipe.embed_bits and config.hidden_size % recipe.embed_block_size:
        raise BuildError(f"RECIPE={recipe.name}: hidden size {config.hidden_size} is not a multiple of the embedding "
                         f"block size {recipe.embed_block_size}; use a recipe without embed_bits")


def _check_scales(plan: Plan) -> None:
    """SCALES: a .npy of (layers + 1, 4) finite pre-scales fp16 can hold (a few bytes: read now)."""
    path = plan.settings.SCALES
    if path is None:
        return
    import numpy as np  # only when SCALES is given: a no-op build does not import numpy

    from ..graph.slanc import validate_scales
    remedy = "give a .npy of shape (layers + 1, 4) or leave SCALES empty"
    if path.is_dir():
        raise BuildError(f"SCALES={path} is a directory; {remedy}")
    if not path.is_file():
        raise BuildError(f"SCALES={path} does not exist; {remedy}")
    try:
        scales = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BuildError(f"SCALES={path}: not a readable .npy array ({type(exc).__name__}); {remedy}") from None
    try:
        validate_scales(scales, plan.config.num_hidden_layers, f"SCALES={path}")
    finally:
        if hasattr(scales, "close"):  # an .npz archive
            scales.close()


# Output settings, and whether the setting is a published link (swapped in its folder).
OUTPUT_LOCATIONS = {"OUT_DIR": True, "MIL_DIR": True, "TMP_DIR": False, "CACHE_DIR": False}


def _check_output_locations(settings: Settings) -> None:
    """Each output location is, or can be made as, a directory this process can write: its
    nearest existing folder is a writable directory (not a file, not read-only). A full
    disk shows only when written to (build/actions.py names the path then)."""
    places = [(key, getattr(settings, key), linked) for key, linked in OUTPUT_LOCATIONS.items()]
    places.append(("OUT_DIR", settings.tree.artifacts, False))  # its state, lock and generations
    for key, path, linked in places:
        if path.exists() and not path.is_dir():
            raise BuildError(f"{key}={getattr(settings, key)}: {path} is a file, not a directory; "
                             f"point {key} at a directory")
        place = path.parent if linked else path
        while not place.exists() and place != place.parent:
            place = place.parent
        if not place.is_dir():
            raise BuildError(f"{key}={getattr(settings, key)}: {place} is a file, not a directory; "
                             f"point {key} at a directory")
        if not os.access(place, os.W_OK | os.X_OK):
            raise BuildError(f"{key}={getattr(settings, key)}: {place} is not writable; make it writable "
                             f"or point {key} elsewhere")


def external_layer_packs(plan: Plan, layer: int) -> dict[str, Path]:
    """kind -> LUT_DIR pack file of every quantized projection of `layer` (LUT_DIR given)."""
    root = plan.settings.LUT_DIR
    return {kind: layer_pack_dir(root, layer) / f"{kind}.npz" for kind, bits in plan.allocation(layer).items() if bits}


def external_embed_packs(plan: Plan) -> dict[str, Path]:
    root = plan.settings.OMNIQ_DIR
    return {name: root / f"{name}.npz" for name in embed_pack_names(plan.config.tie_word_embeddings)}


def _check_external_packs(plan: Plan) -> None:
    """Every pack LUT_DIR / OMNIQ_DIR must supply exists, and its layout (kind, bits, shape,
    group size, array shapes and dtypes) fits its tensor, read from the packs' headers;
    the values themselves (finite LUTs, indices in range) are checked when used."""
    settings = plan.settings
    if settings.LUT_DIR is None and settings.OMNIQ_DIR is None:
        return
    from ..quant.packfile import inspect_pack  # numpy: only when external packs are given
    if settings.LUT_DIR is not None:
        missing = [str(path.relative_to(settings.LUT_DIR)) for layer in plan.quantized_layers()
                   for path in external_layer_packs(plan, layer).values() if not path.is_file()]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BuildError(f"LUT_DIR={settings.LUT_DIR} lacks {', '.join(missing[:3])}{more} "
                             f"needed by RECIPE={plan.recipe.name}; make them (docs/quantization.md has the layout) "
                             "or leave LUT_DIR empty")
        for layer in plan.quantized_layers():
            allocation, sizes = plan.allocation(layer), plan.group_sizes(layer)
            for kind, path in external_layer_packs(plan, layer).items():
                shape = plan.checkpoint.shape(layer_tensor_name(layer, kind))
                try:
                    layout = inspect_pack(path, shape, expect_bits=allocation[kind], expect_kind="lut")
                except ValueError as error:
                    raise BuildError(f"LUT_DIR: {error}") from None
                if layout["group_size"] != sizes[kind]:
                    raise BuildError(f"LUT_DIR: {path}: group_size {layout['group_size']} but the recipe uses "
                                     f"{sizes[kind]} for {kind}; refit the pack or change the recipe")
    if settings.OMNIQ_DIR is not None and plan.recipe.embed_bits:
        missing = [path.name for path in external_embed_packs(plan).values() if not path.is_file()]
        if missing:
            raise BuildError(f"OMNIQ_DIR={settings.OMNIQ_DIR} lacks {', '.join(missing)} needed by "
                             f"RECIPE={plan.recipe.name}; make them (docs/quantization.md) or leave OMNIQ_DIR empty")
        for name, path in external_embed_packs(plan).items():
            shape = plan.checkpoint.shape(EMBED_PACKS[name])
            try:
                inspect_pack(path, shape, expect_bits=plan.recipe.embed_bits, expect_kind="blockwise")
            except ValueError as error:
                raise BuildError(f"OMNIQ_DIR: {error}") from None


def tensors_of_layer(layer: int, kinds) -> list[str]:
    return [layer_tensor_name(layer, kind) for kind in kinds]
