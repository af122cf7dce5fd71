"""A shard's declared numerics as both lowerings (Core ML and Core AI) read them: the
SLaNC scale rows and the weights as packed (fp16 tensors, or this shard's layer packs)."""
from __future__ import annotations

import numpy as np

from ...quant.provider import PackedWeights


def shard_numerics(inputs, num_layers: int) -> tuple[np.ndarray, PackedWeights]:
    """(scales (num_layers + 1, 4) fp32, weights) of a shard's declared inputs. Rows of
    other layers are NaN: a read outside the shard's declared rows would show."""
    values = inputs.values
    scales = np.full((num_layers + 1, 4), np.nan, np.float32)
    for layer, row in values["scales"].items():
        scales[int(layer)] = row
    bits = values["bits"]
    weights = PackedWeights(inputs.tensors, lambda layer: bits[str(layer)],
                            {int(name[5:]): path for name, path in inputs.upstream.items()}, None, False)
    return scales, weights
