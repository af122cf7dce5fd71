"""Random-weight Qwen3 checkpoints of any shape, written the way Hugging Face lays them out.

``write_random_qwen3_checkpoint(out_dir, config)`` writes config.json,
generation_config.json and the weights (one model.safetensors, or
model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json), with the
real HF tensor names. It streams: each tensor is generated in row blocks and written
straight to its shard, so peak memory is one block, whatever the model size.

The weights are random at a realistic scale (what a builder's numerics see):
projections and embedding ~ N(0, 0.02^2); RMSNorm gains 1 + N(0, 0.02^2); a few
embedding rows scaled up as outliers, like the large-norm rows of real vocabularies.
Every tensor has its own generator seeded from (seed, tensor name), so a shallower
variant (fewer layers) holds exactly the same weights in the layers it keeps.

The safetensors files are written here directly (8-byte little-endian header length,
JSON header, raw little-endian data) rather than through safetensors.torch.save_file,
which needs every tensor of a shard in memory at once.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tinymodel.synth")

PROJECTION_STD = 0.02      # the initializer_range of the Qwen3 configs
NORM_GAIN_NOISE = 0.02     # RMSNorm gains: 1 + N(0, this^2)
OUTLIER_ROWS = 4           # embedding rows scaled up (large-norm tokens)
OUTLIER_SCALE = 8.0
BLOCK_ELEMENTS = 1 << 24   # rows generated per write: 16M values, 64 MB in fp32

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Keys a Qwen3 config.json must give; the rest get Qwen3 release defaults.
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim")

# Qwen3-1.7B's published config values (transformers-4 key schema).
QWEN3_1P7B_CONFIG = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def complete_config(config: dict, dtype: str) -> dict:
    """The config.json payload: the given keys over Qwen3 release defaults, in the
    transformers-4 schema (rope_theta, rope_scaling, torch_dtype) real checkpoints use."""
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)} (required: {', '.join(REQUIRED_CONFIG_KEYS)})")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    full = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "initializer_range": PROJECTION_STD,
        "max_position_embeddings": 4096,
        "max_window_layers": config["num_hidden_layers"],
        "model_type": "qwen3",
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
    }
    full.update(config)
    full["torch_dtype"] = dtype
    return dict(sorted(full.items()))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "embedding" | "projection" | "norm"

    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def qwen3_tensor_specs(config: dict) -> list[TensorSpec]:
    """Every stored tensor of a Qwen3ForCausalLM checkpoint, in model order."""
    hidden = config["hidden_size"]
    head_dim = config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim      # != hidden for e.g. Qwen3-0.6B
    kv_dim = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], hidden), "embedding")]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        specs += [
            TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,), "norm"),
            TensorSpec(f"{prefix}.self_attn.q_proj.weight", (q_dim, hidden), "projection"),
            TensorSpec(f"{prefix}.self_attn.k_proj.weight", (kv_dim, hidden), "projection"),
            TensorSpec(f"{prefix}.self_attn.v_proj.weight", (kv_dim, hidden), "projection"),
            TensorSpec(f"{prefix}.self_attn.q_norm.weight", (head_dim,), "norm"),
            TensorSpec(f"{prefix}.self_attn.k_norm.weight", (head_dim,), "norm"),
            TensorSpec(f"{prefix}.self_attn.o_proj.weight", (hidden, q_dim), "projection"),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), "norm"),
            TensorSpec(f"{prefix}.mlp.gate_proj.weight", (inter, hidden), "projection"),
            TensorSpec(f"{prefix}.mlp.up_proj.weight", (inter, hidden), "projection"),
            TensorSpec(f"{prefix}.mlp.down_proj.weight", (hidden, inter), "projection"),
        ]
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    if not config.get("tie_word_embeddings", True):
        specs.append(TensorSpec("lm_head.weight", (config["vocab_size"], hidden), "projection"))
    return specs


def plan_shards(specs: list[TensorSpec], dtype: str, max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Greedy packing in model order, like save_pretrained: a shard closes when the next
    tensor would push it past max_shard_bytes; a tensor larger than that stands alone."""
    if max_shard_bytes is None:
        return [list(specs)]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        size = spec.numel() * DTYPE_BYTES[dtype]
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def _tensor_blocks(spec: TensorSpec, dtype: str, seed: int):
    """Yield the tensor's values as contiguous row blocks in the target dtype."""
    import torch

    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))
    if spec.kind == "norm":
        yield (1.0 + NORM_GAIN_NOISE * torch.randn(spec.shape, generator=generator)).to(torch_dtype)
        return
    rows, cols = spec.shape
    outliers = set()
    if spec.kind == "embedding":
        outliers = set(torch.randperm(rows, generator=generator)[:OUTLIER_ROWS].tolist())
    block_rows = max(1, BLOCK_ELEMENTS // cols)
    for first in range(0, rows, block_rows):
        count = min(block_rows, rows - first)
        block = torch.randn((count, cols), generator=generator).mul_(PROJECTION_STD)
        for row in outliers:
            if first <= row < first + count:
                block[row - first] *= OUTLIER_SCALE
        yield block.to(torch_dtype).contiguous()


def _write_safetensors(path: Path, specs: list[TensorSpec], dtype: str, seed: int) -> int:
    """Write one safetensors file tensor by tensor; returns its data byte count."""
    import torch

    item_bytes = DTYPE_BYTES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = spec.numel() * item_bytes
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    raw_view = {2: torch.int16, 4: torch.int32}[item_bytes]  # bf16 has no numpy dtype
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for spec in specs:
            for block in _tensor_blocks(spec, dtype, seed):
                handle.write(block.view(raw_view).numpy().data)
    return offset


def write_random_qwen3_checkpoint(out_dir, config: dict, dtype: str = "bfloat16",
                                  max_shard_bytes: int | None = None, seed: int = 0) -> dict:
    """Write a random-weight Qwen3 checkpoint of the shape in ``config``.

    config: config.json keys (at least REQUIRED_CONFIG_KEYS; the rest default to Qwen3
    release values; tie_word_embeddings False adds lm_head.weight). dtype: "bfloat16",
    "float16" or "float32". max_shard_bytes: None writes one model.safetensors; a size
    shards like save_pretrained (model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json), falling back to one model.safetensors, as
    save_pretrained does, when everything fits in one shard.

    Returns the written config dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_config = complete_config(config, dtype)
    specs = qwen3_tensor_specs(full_config)
    shards = plan_shards(specs, dtype, max_shard_bytes)

    (out_dir / "config.json").write_text(json.dumps(full_config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": full_config["bos_token_id"], "eos_token_id": full_config["eos_token_id"],
                  "do_sample": False, "transformers_version": full_config["transformers_version"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    # Leave no stale weights of an earlier, differently sharded write behind.
    for stale in list(out_dir.glob("model-*-of-*.safetensors")) + [out_dir / "model.safetensors",
                                                                     out_dir / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()

    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        size = _write_safetensors(path, shards[0], dtype, seed)
        log.info("wrote %s: %d tensors, %.1f MB", path, len(shards[0]), size / 1e6)
        return full_config

    weight_map = {}
    total_size = 0
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        size = _write_safetensors(out_dir / name, shard, dtype, seed)
        total_size += size
        weight_map.update({spec.name: name for spec in shard})
        log.info("wrote %s: %d tensors, %.1f MB", out_dir / name, len(shard), size / 1e6)
    index_payload = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_payload, indent=2) + "\n",
                                                          encoding="utf-8")
    log.info("wrote %s: %d tensors in %d shards, %.2f GB", out_dir / "model.safetensors.index.json",
             len(weight_map), len(shards), total_size / 1e9)
    return full_config
