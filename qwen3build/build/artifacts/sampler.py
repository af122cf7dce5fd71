"""sampler_model.mlpackage: next token from logits, recent tokens, settings and host noise."""
from __future__ import annotations

from ...lower.mil import sampler, save

PACKAGE = "sampler_model"


def build(inputs, outputs) -> dict:
    vocab, window = inputs.values["vocab_size"], inputs.values["window"]
    metadata = sampler.sampler_metadata(vocab, window, inputs.values["compute_units"])
    model = sampler.convert(sampler.sampler_program(vocab, window), metadata)
    save.save_package(model, outputs[f"{PACKAGE}.mlpackage"])
    outputs[f"{PACKAGE}.mil"].write_text(save.mil_text(model))
    return {"mode": "sample", "window": window}
