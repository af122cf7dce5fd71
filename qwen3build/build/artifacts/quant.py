"""Quantization packs: quant:layerNN (GS128 LUT per projection) and quant:embed (blockwise)."""
from __future__ import annotations

from ...quant.packs import make_embed_packs, make_layer_packs


def _external(inputs) -> dict:
    """Declared external pack files (LUT_DIR / OMNIQ_DIR), each checked against its digest."""
    for name in inputs.files:
        inputs.file_bytes(name)  # raises if the file changed since the key was computed
    return {name: declared.path for name, declared in inputs.files.items()}


def build(inputs, outputs) -> dict:
    values = inputs.values
    if "embed" in outputs:
        stats = make_embed_packs(inputs.tensors, values["bits"], values["block_size"], values["tied"],
                                 outputs["embed"], _external(inputs))
    else:
        stats = make_layer_packs(inputs.tensors, dict(values["bits"]), values["group_size"], values["layer"],
                                 outputs[f"layer{values['layer']:02d}"], _external(inputs))
    return {"packs": stats}
