"""io_model.mlpackage: `embed` (token -> hidden) and `lm_head` (hidden -> logits), and with
PREFILL_LEN their prefill twins `embed_prefill` / `lm_head_prefill` (PREFILL_LEN tokens per
call), one program sharing the table."""
from __future__ import annotations

import logging

from ...graph import decoder as graph
from ...lower.mil import programs, save
from ...quant.provider import PackedWeights
from ...settings.model_config import ModelConfig

log = logging.getLogger(__name__)
PACKAGE = "io_model"


def build(inputs, outputs) -> dict:
    values = inputs.values
    config = ModelConfig.partial(values["model"])
    prefill_len = values["PREFILL_LEN"]
    weights = PackedWeights(inputs.tensors, lambda layer: {}, {}, inputs.upstream.get("embed"),
                            config.tie_word_embeddings)
    model = save.convert(programs.io_program(weights, config, prefill_len), dict(values["metadata"]))
    package_path = outputs[f"{PACKAGE}.mlpackage"]
    save.save_package(model, package_path)
    outputs[f"{PACKAGE}.mil"].write_text(save.mil_text(model))
    functions = graph.io_functions(prefill_len)
    stored = save.check_shared_weights(package_path, functions[:2], functions[2:])
    log.info("%s: functions %s; %d weight blob(s) shared, %.1f KB only for the prefill functions", PACKAGE,
             ", ".join(functions), stored["shared"], stored["added_bytes"] / 1e3)
    return {"functions": list(functions), "bpw": round(weights.table_bits(), 3), "prefill_len": prefill_len,
            "prefill_only_bytes": stored["added_bytes"]}
