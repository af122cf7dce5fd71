"""Where quantization packs live under a pack root (ours, LUT_DIR or OMNIQ_DIR).

A layer's packs are one <kind>.npz per quantized projection under `layerNN/`; the
embedding/head packs are embed_tokens.npz (and lm_head.npz when the head is untied).
No numpy here: the plan reads this before any work.
"""
from __future__ import annotations

from pathlib import Path

# Embedding/head pack file names -> the checkpoint tensor each one quantizes.
EMBED_PACKS = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


def layer_pack_dir(root: Path, layer: int) -> Path:
    """Where layer `layer`'s <kind>.npz packs live under a pack root (ours or LUT_DIR)."""
    return root / f"layer{layer:02d}"


def embed_pack_names(tied: bool) -> list[str]:
    return ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
