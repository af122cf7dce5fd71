"""The Qwen3 architecture parameters, read from a Hugging Face config.json.

Everything shape-related comes from here; nothing in the project hard-codes one size.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import BuildError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
# The seven projection matrices of a Qwen3 layer, and its four norm weights.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_norm", "post_norm", "q_norm", "k_norm")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_dim(self) -> int:
        # Qwen3-0.6B: 16 heads x 128 = 2048 != hidden 1024, so never assume hidden.
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def subset(self, fields) -> dict:
        """The named fields as JSON data (what an artifact declares it reads)."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in fields}

    @classmethod
    def partial(cls, fields) -> "ModelConfig":
        """A config holding only `fields` (a mapping); every other field is None, so code
        that reads an undeclared field fails instead of silently using it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise KeyError(f"not ModelConfig fields: {sorted(unknown)}")
        values = {name: None for name in known}
        values.update({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()})
        return cls(**values)


def _rope_theta(raw: dict, where: str) -> float:
    if raw.get("rope_theta") is not None:
        return float(raw["rope_theta"])
    params = raw.get("rope_parameters") or {}  # transformers >= 5 spelling
    if params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    raise BuildError(f"{where}: no rope_theta (nor rope_parameters.rope_theta); a Qwen3 config must give it")


def load_model_config(path: Path) -> ModelConfig:
    where = str(path)
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BuildError(f"{where}: cannot read config.json ({exc}); point CONFIG at a Hugging Face config.json") from None
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "qwen3" and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise BuildError(f"{where}: model_type={raw.get('model_type')!r}, architectures={archs}; only Qwen3 (Qwen3ForCausalLM) is supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(raw.get(key), int) or raw[key] <= 0:
            raise BuildError(f"{where}: {key}={raw.get(key)!r} must be a positive integer")
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters") or {}
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise BuildError(f"{where}: rope scaling {rope_type!r} is not supported yet; only plain RoPE (rope_scaling null)")
    if raw.get("attention_bias"):
        raise BuildError(f"{where}: attention_bias=true is not Qwen3; this builder supports bias-free projections only")
    if raw.get("hidden_act", "silu") != "silu":
        raise BuildError(f"{where}: hidden_act={raw.get('hidden_act')!r}; Qwen3 uses silu")
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if heads % kv_heads:
        raise BuildError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if head_dim % 2:
        raise BuildError(f"{where}: head_dim={head_dim} must be even for rotary embeddings")
    eos = raw.get("eos_token_id")
    gen_path = Path(path).with_name("generation_config.json")
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(raw, where),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
    )
