"""Declarations: for each artifact of a plan, exactly what it reads (declared.Declared).

Artifact ids: "slanc", "quant:layerNN", "quant:embed", "io_model", "shard:<name>",
"sampler_model", and the Core AI twins "aimodel:io_model", "aimodel:shard:<name>",
"aimodel:sampler_model". Each declaration names its build module (build/artifacts/), its
outputs and where they are published, its slice of the settings and model config, the
checkpoint tensors it reads (with their digests from the weights manifest), external
files and upstream outputs (with their content digests). Its key is the digest of that.

Which settings key which artifacts (docs/build.md has the table):
- SEQ_LEN, PALETTIZE_MASKS, KV_WRITE, SHARDS (a shard's own range and role): shards only.
- PREFILL_LEN: the shards and io_model (each holds a `prefill` function of that length).
- RECIPE: through the bits it resolves to: a layer's packs and the shards holding
  that layer; embed_bits: quant:embed and io_model. The recipe's name keys nothing.
- CONFIG / weights: through the tensors each artifact reads and its model-config slice.
- SCALES, LUT_DIR, OMNIQ_DIR: through the digests of the files read.
- FORMATS, COREAI_COMPUTE_UNIT: nothing (which tasks run; how a runner runs).

A Core AI twin is declared from its Core ML twin's declaration: the same values (less
the Core-ML-only ones, COREML_ONLY_VALUES), tensors, files and upstream outputs, plus the
format marker, with its own build module (whose code closure is the coreai lowering) and
tools. So a Core-ML-only change (PALETTIZE_MASKS, coremltools, lower/mil) never moves an
aimodel's key, and a Core-AI-only change (coreai-core, lower/coreai) never a Core ML one.
"""
from __future__ import annotations

import dataclasses
import json


from ..checkpoint.tensors import layer_tensor_name
from ..errors import BuildError
from ..quant.layout import embed_pack_names
from ..settings.model_config import NORMS, PROJECTIONS
from ..stack import COMPUTE_UNITS
from .cache import ActionCache
from .declared import COREAI_TOOLS, COREML_TOOLS, NUMPY_TOOLS, Declared, ExternalFile, Upstream
from .keys import digest_bytes
from .plan import AIMODEL, IO_MODEL, SAMPLER, Plan, external_embed_packs, external_layer_packs

ARTIFACTS = "qwen3build.build.artifacts"
# The model-config fields each kind's bytes depend on.
SLANC_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
SHARD_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps")
IO_FIELDS = ("vocab_size", "hidden_size", "tie_word_embeddings")
# Values of a Core ML package that no Core AI package reads: its (2S,) ramps stay dense.
COREML_ONLY_VALUES = ("PALETTIZE_MASKS",)
COREAI_FORMAT = "coreai"  # build/artifacts/aimodel.FORMAT (not imported: it imports coreai)
COREAI_FOLDER = "coreai"  # the generation folder the .aimodel packages are published in
SLANC_KINDS = ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj", "post_norm", "gate_proj", "up_proj", "down_proj")


class Declarations:
    """Declarations of one plan's artifacts. Upstream digests are read from the cache, so
    declare an artifact only once its upstream artifacts are built (doit's task order)."""

    def __init__(self, plan: Plan, cache: ActionCache, manifest: dict):
        self.plan, self.cache, self.manifest = plan, cache, manifest
        self._declared: dict[str, Declared] = {}

    def declare(self, artifact: str) -> Declared:
        if artifact not in self._declared:
            kind, _, name = artifact.partition(":")
            makers = {"slanc": self._slanc, "quant": self._quant, "shard": self._shard,
                      IO_MODEL: self._io_model, SAMPLER: self._sampler, AIMODEL: self._aimodel}
            if kind not in makers:
                raise KeyError(artifact)
            self._declared[artifact] = makers[kind](name)
        return self._declared[artifact]

    # -- helpers ---------------------------------------------------------------
    def _digests(self, names) -> dict:
        tensors = self.manifest["tensors"]
        return {name: tensors[name] for name in sorted(names)}

    def _upstream(self, artifact: str, output: str) -> Upstream:
        declared = self.declare(artifact)
        meta = self.cache.read_meta(declared.key)
        if meta is None:
            raise LookupError(f"{artifact} is not built yet")
        return Upstream(artifact, declared.key, output, meta["digests"][output])

    def upstream_output(self, artifact: str, output: str):
        """Path of a built upstream output, verified (None when it is not in the cache)."""
        key = self.declare(artifact).key
        if self.cache.open(key, artifact) is None:
            return None
        return self.cache.output_path(key, output)

    @staticmethod
    def _file(path) -> ExternalFile:
        try:
            return ExternalFile(path, digest_bytes(path.read_bytes()))
        except OSError as exc:
            raise BuildError(f"{path}: cannot read ({exc})") from None

    def _make(self, artifact, kind, module, outputs, publish, values, tensors=(), files=None,
                  upstream=None, tools=COREML_TOOLS) -> Declared:
        return Declared(artifact=artifact, kind=kind, module=f"{ARTIFACTS}.{module}", outputs=tuple(outputs),
                        publish=tuple(publish), values=json.loads(json.dumps(values)),
                        tensors=self._digests(tensors), files=files or {}, upstream=upstream or {}, tools=tools)

    # -- kinds -------------------------------------------------------------------
    def _slanc(self, _name) -> Declared:
        plan = self.plan
        depth = plan.config.num_hidden_layers
        values = {"model": plan.config.subset(SLANC_FIELDS)}
        if plan.settings.SCALES is not None:
            return self._make("slanc", "slanc", "slanc", ["slanc_scales.npy"], ["numerics"], values,
                                  files={"scales": self._file(plan.settings.SCALES)}, tools=NUMPY_TOOLS)
        names = ["model.embed_tokens.weight"] + [layer_tensor_name(l, k) for l in range(depth) for k in SLANC_KINDS]
        return self._make("slanc", "slanc", "slanc", ["slanc_scales.npy"], ["numerics"], values,
                              tensors=names, tools=NUMPY_TOOLS)

    def _quant(self, name) -> Declared:
        plan = self.plan
        recipe = plan.recipe
        if name == "embed":
            names = [f"{n}.npz" for n in embed_pack_names(plan.config.tie_word_embeddings)]
            tensors = ["model.embed_tokens.weight"] + ([] if plan.config.tie_word_embeddings else ["lm_head.weight"])
            files = ({pack: self._file(path) for pack, path in external_embed_packs(plan).items()}
                     if plan.settings.OMNIQ_DIR else {})
            values = {"bits": recipe.embed_bits, "block_size": recipe.embed_block_size,
                      "tied": plan.config.tie_word_embeddings, "packs": names}
            return self._make("quant:embed", "quant-embed", "quant", ["embed"], ["quant"], values,
                                  tensors=tensors, files=files, tools=NUMPY_TOOLS)
        layer = int(name.removeprefix("layer"))
        allocation = plan.allocation(layer)
        kinds = [kind for kind, bits in allocation.items() if bits]
        files = ({kind: self._file(path) for kind, path in external_layer_packs(plan, layer).items()}
                 if plan.settings.LUT_DIR else {})
        values = {"layer": layer, "bits": allocation, "group_size": plan.group_sizes(layer)}  # kind -> LUT rows
        return self._make(f"quant:{name}", "quant-layer", "quant", [name], ["quant"], values,
                              tensors=[layer_tensor_name(layer, k) for k in kinds], files=files, tools=NUMPY_TOOLS)

    def _shard(self, name) -> Declared:
        plan = self.plan
        spec = plan.shard(name)
        settings = plan.settings
        scales_path = self.upstream_output("slanc", "slanc_scales.npy")
        if scales_path is None:
            raise LookupError("slanc is not built yet")
        import numpy as np
        scales = np.load(scales_path)
        rows = {str(layer): scales[layer].tolist() for layer in spec.layers}
        if spec.is_exit:
            rows[str(plan.config.num_hidden_layers)] = scales[-1].tolist()
        bits = {str(layer): plan.allocation(layer) for layer in spec.layers}
        group_sizes = {str(layer): plan.group_sizes(layer) for layer in plan.quantized_layers(spec.layers)}
        tensors = [layer_tensor_name(layer, kind) for layer in spec.layers for kind in NORMS]
        tensors += [layer_tensor_name(layer, kind) for layer in spec.layers for kind in PROJECTIONS
                    if not plan.allocation(layer)[kind]]
        if spec.is_exit:
            tensors.append("model.norm.weight")
        upstream = {f"layer{layer:02d}": self._upstream(f"quant:layer{layer:02d}", f"layer{layer:02d}")
                    for layer in plan.quantized_layers(spec.layers)}
        package = spec.package_name
        metadata = {"package": package, "role": spec.role, "layers": f"{spec.first}-{spec.last}",
                    "seq_len": settings.SEQ_LEN, "prefill_len": settings.PREFILL_LEN,
                    "compute_units": COMPUTE_UNITS["shard"],
                    "quantization": _bits_summary(bits)}
        values = {"model": plan.config.subset(SHARD_FIELDS), "shard": dataclasses.asdict(spec),
                  "SEQ_LEN": settings.SEQ_LEN, "PALETTIZE_MASKS": settings.PALETTIZE_MASKS,
                  "KV_WRITE": settings.KV_WRITE, "PREFILL_LEN": settings.PREFILL_LEN,
                  "scales": rows, "bits": bits, "group_sizes": group_sizes,
                  "metadata": {k: str(v) for k, v in metadata.items()}}
        return self._make(f"shard:{name}", "shard", "shard", [f"{package}.mlpackage", f"{package}.mil"],
                              ["packages", "mil"], values, tensors=tensors, upstream=upstream)

    def _io_model(self, _name) -> Declared:
        plan = self.plan
        config, recipe = plan.config, plan.recipe
        tied = config.tie_word_embeddings
        if recipe.embed_bits:
            tensors, upstream = [], {"embed": self._upstream("quant:embed", "embed")}
            quantization = f"int{recipe.embed_bits} blockwise, blocks of {recipe.embed_block_size}"
        else:
            tensors, upstream = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]), {}
            quantization = "fp16"
        metadata = {"package": IO_MODEL, "compute_units": COMPUTE_UNITS["io_model"], "tied": tied,
                    "quantization": quantization, "prefill_len": plan.settings.PREFILL_LEN}
        values = {"model": config.subset(IO_FIELDS), "PREFILL_LEN": plan.settings.PREFILL_LEN,
                  "metadata": {k: str(v) for k, v in metadata.items()}}
        return self._make(IO_MODEL, "io_model", "io_model", [f"{IO_MODEL}.mlpackage", f"{IO_MODEL}.mil"],
                              ["packages", "mil"], values, tensors=tensors, upstream=upstream)

    def _sampler(self, _name) -> Declared:
        from ..graph.sampler import DEFAULT_WINDOW
        values = {"vocab_size": self.plan.config.vocab_size, "window": DEFAULT_WINDOW,
                  "compute_units": COMPUTE_UNITS["sampler"]}
        return self._make(SAMPLER, "sampler", "sampler", [f"{SAMPLER}.mlpackage", f"{SAMPLER}.mil"],
                              ["packages", "mil"], values)

    def _aimodel(self, twin: str) -> Declared:
        """The Core AI twin of a Core ML package (build/artifacts/aimodel.py's docstring)."""
        if twin not in self.plan.package_ids():
            raise KeyError(f"{AIMODEL}:{twin}")
        base = self.declare(twin)
        package = base.outputs[0].removesuffix(".mlpackage")
        values = {k: v for k, v in base.values.items() if k not in COREML_ONLY_VALUES}
        return dataclasses.replace(base, artifact=f"{AIMODEL}:{twin}", kind=AIMODEL, module=f"{ARTIFACTS}.aimodel",
                                   outputs=(f"{package}.aimodel", f"{package}.mlir"),
                                   publish=(COREAI_FOLDER, COREAI_FOLDER),
                                   values={**values, "format": COREAI_FORMAT}, tools=COREAI_TOOLS)


def _bits_summary(bits: dict) -> str:
    """'fp16', or 'lut8: q_proj,k_proj; lut6: ...' over the shard's projections."""
    by_bits: dict = {}
    for allocation in bits.values():
        for kind, width in allocation.items():
            by_bits.setdefault(width, set()).add(kind)
    if set(by_bits) == {None}:
        return "fp16"
    order = {kind: i for i, kind in enumerate(PROJECTIONS)}
    return "; ".join(f"{'fp16' if width is None else f'lut{width}'}: {','.join(sorted(kinds, key=order.get))}"
                     for width, kinds in sorted(by_bits.items(), key=lambda item: -(item[0] or 16)))
