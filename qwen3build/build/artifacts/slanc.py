"""SLaNC fp16 pre-scales for every RMSNorm: slanc_scales.npy, (layers + 1, 4) float32."""
from __future__ import annotations

import io
import logging

import numpy as np

from ...errors import BuildError
from ...graph.slanc import compute_slanc_scales, validate_scales
from ...settings.model_config import ModelConfig

log = logging.getLogger(__name__)


def build(inputs, outputs) -> dict:
    config = ModelConfig.partial(inputs.values["model"])
    depth = config.num_hidden_layers
    if "scales" in inputs.files:
        where = f"SCALES={inputs.files['scales'].path}"
        try:
            scales = np.load(io.BytesIO(inputs.file_bytes("scales")), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BuildError(f"{where}: cannot read ({exc}); give a .npy of shape (layers + 1, 4)") from None
        scales = validate_scales(scales, depth, where)
    else:
        scales, _estimates = compute_slanc_scales(
            inputs.tensors, config, progress=lambda layer: log.info("  slanc: layer %d/%d", layer + 1, depth))
    with open(outputs["slanc_scales.npy"], "wb") as handle:
        np.save(handle, scales.astype(np.float32), allow_pickle=False)
    return {"scales_min": float(scales.min())}
