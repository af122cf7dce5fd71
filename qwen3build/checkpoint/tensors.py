"""The Qwen3 checkpoint's tensors: Hugging Face names, internal names and the shapes
config.json implies. A table, not code (STYLE: the name map is data)."""
from __future__ import annotations

from ..settings.model_config import NORMS, PROJECTIONS, ModelConfig  # noqa: F401 (re-exported)

# HF tensor name -> internal name, and the shape config.json implies. A table, not code.
LAYER_TENSORS = {
    "q_proj": ("self_attn.q_proj.weight", lambda c: (c.q_dim, c.hidden_size)),
    "k_proj": ("self_attn.k_proj.weight", lambda c: (c.kv_dim, c.hidden_size)),
    "v_proj": ("self_attn.v_proj.weight", lambda c: (c.kv_dim, c.hidden_size)),
    "o_proj": ("self_attn.o_proj.weight", lambda c: (c.hidden_size, c.q_dim)),
    "q_norm": ("self_attn.q_norm.weight", lambda c: (c.head_dim,)),
    "k_norm": ("self_attn.k_norm.weight", lambda c: (c.head_dim,)),
    "gate_proj": ("mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    "up_proj": ("mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size)),
    "down_proj": ("mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size)),
    "input_norm": ("input_layernorm.weight", lambda c: (c.hidden_size,)),
    "post_norm": ("post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
}
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "final_norm": ("model.norm.weight", lambda c: (c.hidden_size,)),
    "lm_head": ("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size)),
}


def layer_tensor_name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{LAYER_TENSORS[kind][0]}"


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the build needs, with its shape."""
    names = {}
    for layer in range(config.num_hidden_layers):
        for kind, (suffix, shape) in LAYER_TENSORS.items():
            names[f"model.layers.{layer}.{suffix}"] = shape(config)
    for kind, (name, shape) in GLOBAL_TENSORS.items():
        if kind == "lm_head" and config.tie_word_embeddings:
            continue
        names[name] = shape(config)
    return names
