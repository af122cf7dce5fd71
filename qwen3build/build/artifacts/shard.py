"""A decoder shard package (decoder_shard_<name>.mlpackage: `decode`, and with PREFILL_LEN
`prefill`, one program sharing the weights and the KV state) and its MIL dump."""
from __future__ import annotations

import logging
import time

from ...graph import decoder as graph
from ...lower.mil import programs, save
from ...settings.layout import ShardSpec
from ...settings.limits import ANE_MAX_PACKAGE_BYTES
from ...settings.model_config import ModelConfig
from .shard_weights import shard_numerics

log = logging.getLogger(__name__)


def build(inputs, outputs) -> dict:
    values = inputs.values
    config = ModelConfig.partial(values["model"])
    spec = ShardSpec(**values["shard"])
    package = spec.package_name
    seq_len, prefill_len = values["SEQ_LEN"], values["PREFILL_LEN"]
    started = time.perf_counter()
    log.info("%s: layers %d-%d (%s), SEQ_LEN %d, KV_WRITE %s, PREFILL_LEN %d", package, spec.first, spec.last,
             spec.role, seq_len, values["KV_WRITE"], prefill_len)
    scales, weights = shard_numerics(inputs, config.num_hidden_layers)
    savings: dict = {}
    program = programs.shard_program(inputs.tensors, weights, config, spec, scales, seq_len,
                                     values["PALETTIZE_MASKS"], savings, kv_write=values["KV_WRITE"],
                                     prefill_len=prefill_len)
    log.info("  %s: converting and saving", package)
    model = save.convert(program, dict(values["metadata"]))
    package_path = outputs[f"{package}.mlpackage"]
    save.save_package(model, package_path)
    outputs[f"{package}.mil"].write_text(save.mil_text(model))
    functions = graph.shard_functions(prefill_len)
    stored = save.check_shared_weights(package_path, functions[:1], functions[1:])
    bpw = weights.projection_bits(spec.layers)
    size = sum(p.stat().st_size for p in package_path.rglob("*") if p.is_file())
    if size > ANE_MAX_PACKAGE_BYTES:
        log.warning("%s is %.2f GB: packages above ~1 GB have been seen to fall back off the ANE on iOS; "
                    "use more shards or a quantized RECIPE", package, size / 1e9)
    if savings:
        log.info("%s: palettized tables saved %.1f MB (%s)", package, sum(savings.values()) / 1e6,
                 ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in savings.items()))
    log.info("%s: built in %.1fs, %.2f bits per projection weight; functions %s, %.1f KB stored only for prefill",
             package, time.perf_counter() - started, bpw, ", ".join(functions), stored["added_bytes"] / 1e3)
    return {"layers": len(spec.layers), "role": spec.role, "bpw": round(bpw, 3),
            "table_bytes_saved": sum(savings.values()), "functions": list(functions), "prefill_len": prefill_len,
            "prefill_only_bytes": stored["added_bytes"]}
