"""io_model.mlpackage: functions `embed` (token -> hidden) and `lm_head` (hidden -> logits)."""
from __future__ import annotations

from ...lower.mil import programs, save
from ...quant.provider import PackedWeights
from ...settings.model_config import ModelConfig

PACKAGE = "io_model"


def build(inputs, outputs) -> dict:
    values = inputs.values
    config = ModelConfig.partial(values["model"])
    weights = PackedWeights(inputs.tensors, lambda layer: {}, {}, inputs.upstream.get("embed"),
                            config.tie_word_embeddings)
    parts, texts = {}, []
    for function, program in (("embed", programs.embed_program(weights, config)),
                              ("lm_head", programs.head_program(weights, config))):
        model = save.convert(program, dict(values["metadata"]))
        parts[function] = inputs.scratch / f"{function}.part.mlpackage"
        save.save_package(model, parts[function])
        texts.append(f"// function {function}\n{save.mil_text(model)}")
    save.save_multifunction(parts, "embed", outputs[f"{PACKAGE}.mlpackage"])
    outputs[f"{PACKAGE}.mil"].write_text("\n".join(texts))
    return {"functions": list(parts), "bpw": round(weights.table_bits(), 3)}
