"""What each artifact reads, how its key is made, and how it is built.

dodo.py wires these into doit tasks; this module does the work. Every keyed artifact
goes through ActionCache.run: restored from cache/ when its key was built before,
otherwise built aside, stored, and published atomically.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import RUN_ID_ENV, ActionCache, remove_path, replace_atomically, tree_size
from .config import ANE_MAX_PACKAGE_BYTES
from .hashing import action_key, digest_bytes
from .plan import IO_MODEL, SAMPLER, Plan
from .recipes import embed_pack_names, layer_pack_dir
from .weights import DigestStore, LAYER_TENSORS, layer_tensor_name, stat_signature

log = logging.getLogger(__name__)

# The model-config fields a decoder shard's bytes depend on (not vocab, not the head).
SHARD_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps")


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    outputs: list[Path]
    key: Callable[[], str]
    build: Callable[[list[Path]], dict | None]


def weights_provider(plan: Plan):
    """The weights as the packages hold them: fp16, or the recipe's quantization packs.

    Both the MIL lowering and the torch reference take their weights from here, so the
    reference always computes with exactly the packed values."""
    from .quantize import RecipeWeights
    return RecipeWeights(plan.checkpoint, plan.recipe, plan.quant_dir)


class Artifacts:
    def __init__(self, plan: Plan):
        self.plan = plan
        s = plan.settings
        self.cache = ActionCache(s.CACHE_DIR, s.TMP_DIR, plan.state_dir)
        self._manifest = None
        self._keys: dict[str, str] = {}

    # ------------------------------------------------------------ weights
    def weights_uptodate(self) -> bool:
        try:
            manifest = self.manifest()
        except (OSError, ValueError):
            return False
        return manifest.get("stat") == stat_signature(self.plan.stat_inputs)

    def weights_action(self) -> None:
        """Per-tensor digests of the checkpoint (hashing only files whose stat changed)."""
        started = time.perf_counter()
        plan = self.plan
        checkpoint = plan.checkpoint  # validates names, shapes and dtypes against config.json
        store = DigestStore(plan.settings.CACHE_DIR / "stat.sqlite3")
        try:
            digests = {}
            for path in plan.weight_files:
                digests.update(store.file_digests(checkpoint, path))
        finally:
            store.close()
        manifest = {"stat": stat_signature(plan.stat_inputs), "config": plan.config.to_dict(),
                    "tensors": dict(sorted(digests.items()))}
        _write_json_if_changed(plan.manifest_path, manifest)
        self._manifest = manifest
        self._keys.clear()  # keys read the manifest
        self.cache.write_state("weights", {"status": "rebuilt", "bytes_hashed": store.bytes_hashed,
                                            "seconds": round(time.perf_counter() - started, 3),
                                            "run_id": os.environ.get(RUN_ID_ENV, ""), "key": ""})
        log.info("weights: %d tensors, %.1f MB hashed", len(digests), store.bytes_hashed / 1e6)

    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads(self.plan.manifest_path.read_text())
        return self._manifest

    def tensor_digests(self, names) -> dict:
        tensors = self.manifest()["tensors"]
        return {name: tensors[name] for name in names}

    # ------------------------------------------------------------ keyed artifacts
    def spec(self, artifact_id: str) -> ArtifactSpec:
        kind, _, name = artifact_id.partition(":")
        if kind == "slanc":
            return self._slanc()
        if kind == "quant":
            return self._quant(name)
        if kind == "shard":
            return self._shard(name)
        if kind == IO_MODEL:
            return self._io_model()
        if kind == SAMPLER:
            return self._sampler()
        raise KeyError(artifact_id)

    def key(self, artifact_id: str) -> str:
        """The artifact's key, computed once per process. Only call it once the artifact's
        upstream tasks have run (doit evaluates uptodate after task_dep)."""
        if artifact_id not in self._keys:
            self._keys[artifact_id] = self.spec(artifact_id).key()
        return self._keys[artifact_id]

    def uptodate(self, artifact_id: str) -> bool:
        spec = self.spec(artifact_id)
        try:
            key = self.key(artifact_id)
        except (OSError, KeyError, ValueError):  # an input is not built yet (e.g. `doit info` first)
            return False
        return self.cache.is_current(artifact_id, key, spec.outputs)

    def run(self, artifact_id: str) -> dict:
        spec = self.spec(artifact_id)
        key = self.key(artifact_id)
        if self.cache.is_current(artifact_id, key, spec.outputs):
            return self.cache.read_state(artifact_id)
        return self.cache.run(artifact_id, key, spec.outputs, spec.build)

    def _current_key(self, artifact_id: str) -> str:
        """The key an upstream artifact has now (its outputs are what we read)."""
        return self.key(artifact_id)

    # -- quantization packs: quant:layerNN (projections) and quant:embed
    def _quant(self, name: str) -> ArtifactSpec:
        plan = self.plan
        recipe = plan.recipe
        if name == "embed":
            external = plan.settings.OMNIQ_DIR
            out = plan.quant_dir / "embed"
            names = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in self.manifest()["tensors"]]

            def key():
                files = {f: digest_bytes((external / f"{f}.npz").read_bytes()) if external else None
                         for f in embed_pack_names(plan.config.tie_word_embeddings)}
                return action_key("quant-embed", code=("qwen3build.quantize",),
                                  settings={"bits": recipe.embed_bits, "block": recipe.embed_block_size},
                                  tensors={} if external else self.tensor_digests(names), inputs={"external": files})

            def build(outputs):
                from .quantize import make_embed_packs
                return {"packs": make_embed_packs(plan.checkpoint, recipe, outputs[0], external)}
            return ArtifactSpec([out], key, build)

        layer = int(name.removeprefix("layer"))
        external = plan.settings.LUT_DIR
        allocation = recipe.layer_allocation(layer, plan.config.num_hidden_layers)
        kinds = [kind for kind, bits in allocation.items() if bits]

        def key():
            files = {k: digest_bytes((layer_pack_dir(external, layer) / f"{k}.npz").read_bytes()) if external else None
                     for k in kinds}
            return action_key("quant-layer", code=("qwen3build.quantize",),
                              settings={"bits": allocation, "group_size": recipe.group_size},
                              tensors={} if external else self.tensor_digests([layer_tensor_name(layer, k) for k in kinds]),
                              inputs={"external": files})

        def build(outputs):
            from .quantize import make_layer_packs
            return {"packs": make_layer_packs(plan.checkpoint, recipe, layer, outputs[0], external)}
        return ArtifactSpec([layer_pack_dir(plan.quant_dir, layer)], key, build)

    # -- SLaNC scales
    def _slanc(self) -> ArtifactSpec:
        plan = self.plan
        external = plan.settings.SCALES

        def key():
            inputs = {"external": digest_bytes(external.read_bytes()) if external else None}
            tensors = {} if external else self.manifest()["tensors"]
            return action_key("slanc", code=("qwen3build.numerics.slanc",), settings={"layers": plan.config.num_hidden_layers},
                              tensors=tensors, inputs=inputs)

        def build(outputs):
            from .numerics.slanc import compute_slanc_scales, validate_scales
            if external:
                try:
                    scales = np.load(external)
                except (OSError, ValueError) as exc:
                    from .errors import BuildError
                    raise BuildError(f"SCALES={external}: cannot read ({exc}); give a .npy of shape (layers + 1, 4)") from None
                scales = validate_scales(scales, plan.config.num_hidden_layers, f"SCALES={external}")
            else:
                depth = plan.config.num_hidden_layers
                scales, _estimates = compute_slanc_scales(
                    plan.checkpoint, progress=lambda layer: log.info("  slanc: layer %d/%d", layer + 1, depth))
            with open(outputs[0], "wb") as handle:
                np.save(handle, scales)
            return {"scales_min": float(scales.min())}

        return ArtifactSpec([plan.scales_path], key, build)

    def scales(self) -> np.ndarray:
        return np.load(self.plan.scales_path)

    # -- decoder shards
    def _shard(self, name: str) -> ArtifactSpec:
        plan = self.plan
        spec = plan.shard(name)
        package = spec.package_name
        settings = plan.settings

        def key():
            names = [layer_tensor_name(layer, kind) for layer in spec.layers for kind in LAYER_TENSORS]
            if spec.is_exit:
                names.append("model.norm.weight")
            scales = self.scales()
            rows = scales[list(spec.layers)].tolist() + ([scales[-1].tolist()] if spec.is_exit else [])
            model = {f: getattr(plan.config, f) for f in SHARD_CONFIG_FIELDS}
            depth = plan.config.num_hidden_layers
            bits = {layer: plan.recipe.layer_allocation(layer, depth) for layer in spec.layers}
            packs = {layer: self._current_key(f"quant:layer{layer:02d}") for layer in plan.quantized_layers(spec.layers)}
            return action_key("shard", code=("qwen3build.lower.programs", "qwen3build.lower.save", "qwen3build.quantize"),
                              settings={"SEQ_LEN": settings.SEQ_LEN, "PALETTIZE_MASKS": settings.PALETTIZE_MASKS,
                                        "bits": bits, "group_size": plan.recipe.group_size,
                                        "shard": dataclasses.asdict(spec), "model": model},
                              tensors=self.tensor_digests(names), inputs={"scales": rows, "packs": packs})

        def build(outputs):
            from .lower import programs, save
            started = time.perf_counter()
            log.info("%s: layers %d-%d (%s), SEQ_LEN %d", package, spec.first, spec.last, spec.role, settings.SEQ_LEN)
            weights = weights_provider(plan)
            savings: dict = {}
            program = programs.shard_program(plan.checkpoint, weights, spec, self.scales(), settings.SEQ_LEN,
                                             settings.PALETTIZE_MASKS, savings)
            log.info("  %s: converting and saving", package)
            model = save.convert(program, {"package": package, "role": spec.role, "layers": f"{spec.first}-{spec.last}",
                                           "seq_len": settings.SEQ_LEN, "compute_units": "CPU_AND_NE",
                                           "recipe": settings.RECIPE})
            save.save_package(model, outputs[0])
            outputs[1].write_text(save.mil_text(model))
            bpw = weights.projection_bits(spec.layers)
            size = tree_size(outputs[0])
            if size > ANE_MAX_PACKAGE_BYTES:
                log.warning("%s is %.2f GB: packages above ~1 GB have been seen to fall back off the ANE on iOS; "
                            "use more shards or a quantized RECIPE", package, size / 1e9)
            if savings:
                log.info("%s: palettized tables saved %.1f MB (%s)", package, sum(savings.values()) / 1e6,
                         ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in savings.items()))
            log.info("%s: built in %.1fs, %.2f bits per projection weight", package, time.perf_counter() - started, bpw)
            return {"layers": len(spec.layers), "role": spec.role, "bpw": round(bpw, 3),
                    "table_bytes_saved": sum(savings.values())}

        return ArtifactSpec([plan.package_path(package), plan.mil_path(package)], key, build)

    # -- io_model: embedding + LM head, one package with two functions
    def _io_model(self) -> ArtifactSpec:
        plan = self.plan
        config = plan.config

        def key():
            names = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
            packs = self._current_key("quant:embed") if plan.recipe.embed_bits else None
            return action_key("io_model", code=("qwen3build.lower.programs", "qwen3build.lower.save", "qwen3build.quantize"),
                              settings={"embed_bits": plan.recipe.embed_bits, "vocab_size": config.vocab_size,
                                        "hidden_size": config.hidden_size, "tied": config.tie_word_embeddings},
                              tensors=self.tensor_digests(names), inputs={"packs": packs})

        def build(outputs):
            from .lower import programs, save
            weights = weights_provider(plan)
            tied = config.tie_word_embeddings
            meta = {"package": IO_MODEL, "compute_units": "CPU_AND_GPU", "recipe": plan.settings.RECIPE,
                    "tied": tied}
            parts = {}
            texts = []
            scratch = outputs[0].parent
            for function, program in (("embed", programs.embed_program(weights, config)),
                                      ("lm_head", programs.head_program(weights, config))):
                model = save.convert(program, meta)
                parts[function] = scratch / f"{function}.part.mlpackage"
                save.save_package(model, parts[function])
                texts.append(f"// function {function}\n{save.mil_text(model)}")
            save.save_multifunction(parts, "embed", outputs[0])
            for part in parts.values():
                remove_path(part)
            outputs[1].write_text("\n".join(texts))
            return {"functions": list(parts), "bpw": round(weights.table_bits(), 3)}

        return ArtifactSpec([plan.package_path(IO_MODEL), plan.mil_path(IO_MODEL)], key, build)

    # -- sampler
    def _sampler(self) -> ArtifactSpec:
        plan = self.plan
        vocab = plan.config.vocab_size

        from .sampling import DEFAULT_WINDOW as window

        def key():
            return action_key("sampler", code=("qwen3build.lower.sampler", "qwen3build.sampling", "qwen3build.lower.save"),
                              settings={"vocab_size": vocab, "window": window}, tensors={})

        def build(outputs):
            from .lower import sampler, save
            model = sampler.convert(sampler.sampler_program(vocab, window), sampler.sampler_metadata(vocab, window))
            save.save_package(model, outputs[0])
            outputs[1].write_text(save.mil_text(model))
            return {"mode": "sample", "window": window}

        return ArtifactSpec([plan.package_path(SAMPLER), plan.mil_path(SAMPLER)], key, build)


def _write_json_if_changed(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    replace_atomically(tmp, path)


STACK_FILE = "stack.json"


def finalize_stack(artifacts: Artifacts) -> dict:
    """Write OUT_DIR/stack.json (what run/verify load) and prune shards of old layouts.

    Pruned packages stay in cache/, so going back to that layout is still a restore.
    """
    plan = artifacts.plan
    out_dir = plan.settings.OUT_DIR
    current = {spec.package_name for spec in plan.layout}
    for stale in sorted(out_dir.glob("decoder_shard_*.mlpackage")):
        name = stale.name[: -len(".mlpackage")]
        if name not in current:
            remove_path(stale)
            remove_path(plan.mil_path(name))
            log.info("removed %s: not in the current SHARDS layout (still restorable from cache/)", stale.name)
    tokenizer = plan.settings.CONFIG.with_name("tokenizer.json")
    keys = {pid: (artifacts.cache.read_state(pid) or {}).get("key")
            for pid in [IO_MODEL, SAMPLER] + [f"shard:{s.name}" for s in plan.layout]}
    stack = {
        "format": 1,
        "model": plan.config.to_dict(),
        "checkpoint": str(plan.settings.CONFIG.parent),
        "tokenizer": str(tokenizer) if tokenizer.is_file() else None,
        "seq_len": plan.settings.SEQ_LEN,
        "recipe": plan.settings.RECIPE,
        "palettize_masks": plan.settings.PALETTIZE_MASKS,
        "io_model": f"{IO_MODEL}.mlpackage",
        "sampler": f"{SAMPLER}.mlpackage",
        "shards": [{"name": s.name, "package": f"{s.package_name}.mlpackage", "first": s.first,
                    "last": s.last, "role": s.role} for s in plan.layout],
        "scales": str(plan.scales_path),
        "keys": keys,
        # What a runner needs to rebuild this plan (e.g. the torch backend).
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan.settings).items()},
    }
    _write_json_if_changed(out_dir / STACK_FILE, stack)
    return stack
