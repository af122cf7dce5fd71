"""A decoder shard package (decoder_shard_<name>.mlpackage) and its MIL dump."""
from __future__ import annotations

import logging
import time

import numpy as np

from ...lower.mil import programs, save
from ...quant.provider import PackedWeights
from ...settings.layout import ShardSpec
from ...settings.limits import ANE_MAX_PACKAGE_BYTES
from ...settings.model_config import ModelConfig

log = logging.getLogger(__name__)


def build(inputs, outputs) -> dict:
    values = inputs.values
    config = ModelConfig.partial(values["model"])
    spec = ShardSpec(**values["shard"])
    package = spec.package_name
    seq_len = values["SEQ_LEN"]
    started = time.perf_counter()
    log.info("%s: layers %d-%d (%s), SEQ_LEN %d, KV_WRITE %s", package, spec.first, spec.last, spec.role, seq_len,
             values["KV_WRITE"])
    # Rows of other layers are NaN: a read outside the shard's declared rows would show.
    scales = np.full((config.num_hidden_layers + 1, 4), np.nan, np.float32)
    for layer, row in values["scales"].items():
        scales[int(layer)] = row
    bits = values["bits"]
    weights = PackedWeights(inputs.tensors, lambda layer: bits[str(layer)],
                            {int(name[5:]): path for name, path in inputs.upstream.items()}, None, False)
    savings: dict = {}
    program = programs.shard_program(inputs.tensors, weights, config, spec, scales, seq_len,
                                     values["PALETTIZE_MASKS"], savings, kv_write=values["KV_WRITE"])
    log.info("  %s: converting and saving", package)
    model = save.convert(program, dict(values["metadata"]))
    package_path = outputs[f"{package}.mlpackage"]
    save.save_package(model, package_path)
    outputs[f"{package}.mil"].write_text(save.mil_text(model))
    bpw = weights.projection_bits(spec.layers)
    size = sum(p.stat().st_size for p in package_path.rglob("*") if p.is_file())
    if size > ANE_MAX_PACKAGE_BYTES:
        log.warning("%s is %.2f GB: packages above ~1 GB have been seen to fall back off the ANE on iOS; "
                    "use more shards or a quantized RECIPE", package, size / 1e9)
    if savings:
        log.info("%s: palettized tables saved %.1f MB (%s)", package, sum(savings.values()) / 1e6,
                 ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in savings.items()))
    log.info("%s: built in %.1fs, %.2f bits per projection weight", package, time.perf_counter() - started, bpw)
    return {"layers": len(spec.layers), "role": spec.role, "bpw": round(bpw, 3),
            "table_bytes_saved": sum(savings.values())}
