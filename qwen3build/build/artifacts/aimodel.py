"""Core AI packages (<package>.aimodel) and their IR text (<package>.mlir): the third lowering
of graph/decoder.py (qwen3build/lower/coreai/, docs/coreai.md).

One build module for the three kinds of package; each is declared like its Core ML twin
(build/declare.py: _shard, _io_model, _sampler), with the same values, tensors and
upstream outputs, plus the format marker, except as noted:

  every kind   values["format"] = "coreai"
               outputs [f"{package}.aimodel", f"{package}.mlir"]
               tools: coreai-core, coreai-torch, torch, numpy (their versions shape the bytes)

  shard        (aimodel:shard:<name>)  values: model (SHARD_FIELDS), shard (ShardSpec as a
               dict), SEQ_LEN, KV_WRITE, PREFILL_LEN, scales {layer: SLaNC row, + the final
               row for the exit shard}, bits {layer: {kind: bits or None}}, group_sizes,
               metadata {package, role, layers, seq_len, prefill_len, compute_units,
               quantization}.
               NOT PALETTIZE_MASKS: the Core AI shard keeps its (2S,) ramps dense (16 KB at
               S=4096), so that setting does not change its bytes.
               tensors: the shard's norms, its fp16 projections, model.norm.weight (exit).
               upstream: "layerNN" -> quant:layerNN's "layerNN" pack folder, per quantized layer.
  io_model     (aimodel:io_model)  values: model (IO_FIELDS), PREFILL_LEN, metadata {package,
               compute_units, tied, quantization, prefill_len}. tensors: model.embed_tokens.weight (+
               lm_head.weight untied) when fp16; else upstream "embed" -> quant:embed's "embed".
  sampler      (aimodel:sampler_model)  values: vocab_size, window, compute_units.

The kind is told by the values: "shard" -> a decoder shard, "window" -> the sampler, else
the io_model. PREFILL_LEN > 0 adds the prefill functions (lower/coreai/programs.py), as
in the Core ML packages. Like every build body, this module imports only what makes the
bytes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ...lower.coreai import convert, programs, require_coreai
from ...lower.coreai import sampler as coreai_sampler
from ...quant.provider import PackedWeights
from ...settings.layout import ShardSpec
from ...settings.model_config import ModelConfig
from .shard_weights import shard_numerics

log = logging.getLogger(__name__)

FORMAT = "coreai"
IO_MODEL = "io_model"
SAMPLER = "sampler_model"
# Shown in the IR text: weights stay out of it (their names are their content digests).
IR_ELEMENTS_LIMIT = 16


def build(inputs, outputs) -> dict:
    values = inputs.values
    if values.get("format") != FORMAT:
        raise ValueError(f"{inputs.artifact}: declared format {values.get('format')!r}, expected {FORMAT!r}")
    require_coreai(f"{inputs.artifact} (FORMATS=coreai)")
    started = time.perf_counter()
    if "shard" in values:
        package, functions, facts = _shard(inputs)
    elif "window" in values:
        package, functions, facts = _sampler(values)
    else:
        package, functions, facts = _io_model(inputs)
    program = convert.convert(functions)
    path = outputs[f"{package}.aimodel"]
    convert.save_package(program, path, facts.pop("metadata"))
    outputs[f"{package}.mlir"].write_text(ir_text(path))
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    log.info("%s.aimodel: %s, %.2f MB, built in %.1fs", package, ", ".join(f.name for f in functions), size / 1e6,
             time.perf_counter() - started)
    return {"format": FORMAT, "functions": [f.name for f in functions], "bytes": size, **facts}


def _shard(inputs):
    values = inputs.values
    config = ModelConfig.partial(values["model"])
    spec = ShardSpec(**values["shard"])
    seq_len = values["SEQ_LEN"]
    log.info("%s.aimodel: layers %d-%d (%s), SEQ_LEN %d, KV_WRITE %s", spec.package_name, spec.first, spec.last,
             spec.role, seq_len, values["KV_WRITE"])
    scales, weights = shard_numerics(inputs, config.num_hidden_layers)
    module = programs.ShardModule(inputs.tensors, weights, config, spec, scales, seq_len, values["KV_WRITE"]).eval()
    state = getattr(module, programs.STATE_NAME)
    facts = {"layers": len(spec.layers), "role": spec.role, "bpw": round(weights.projection_bits(spec.layers), 3),
             "states": {programs.STATE_NAME: {"shape": list(state.shape), "dtype": str(state.dtype).removeprefix("torch.")}},
             "metadata": dict(values["metadata"])}
    return spec.package_name, programs.shard_functions(module, values["PREFILL_LEN"]), facts


def _io_model(inputs):
    values = inputs.values
    config = ModelConfig.partial(values["model"])
    weights = PackedWeights(inputs.tensors, lambda layer: {}, {}, inputs.upstream.get("embed"),
                            config.tie_word_embeddings)
    facts = {"bpw": round(weights.table_bits(), 3), "metadata": dict(values["metadata"])}
    return IO_MODEL, programs.io_functions(weights, config, prefill_len=values["PREFILL_LEN"]), facts


def _sampler(values):
    vocab, window = values["vocab_size"], values["window"]
    facts = {"mode": "sample", "window": window,
             "metadata": coreai_sampler.sampler_metadata(vocab, window, values["compute_units"])}
    return SAMPLER, coreai_sampler.sampler_functions(vocab, window), facts


def ir_text(path: Path) -> str:
    """The saved package's program as MLIR text, weights elided, then its summary."""
    from coreai.authoring import AIModelAsset

    asset = AIModelAsset.load(path)
    module = asset.program._module._mlir_module  # AIProgram keeps its MLIR module private; printing only
    text = module.operation.get_asm(large_elements_limit=IR_ELEMENTS_LIMIT, large_resource_limit=IR_ELEMENTS_LIMIT)
    summary = "\n".join(f"// {line}" for line in str(asset.summary(include_statistics=True)).splitlines())
    return f"{text}\n{summary}\n"
