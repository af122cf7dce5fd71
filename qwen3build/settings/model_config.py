"""The Qwen3 architecture parameters, read from a Hugging Face config.json.

Everything shape-related comes from here; nothing in the project hard-codes one size.
"""
from __future__ import annotations

import dataclasses
import json
import math
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


# Defaults for keys a Qwen3 config.json may leave out (those of transformers' Qwen3Config,
# except max_position_embeddings: the context a checkpoint that does not say was trained for
# is unknown, and 4096 is the builder's own SEQ_LEN default).
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_MAX_POSITION_EMBEDDINGS = 4096
# rms_norm_eps above this is not a regularizer any more but a change of the model.
MAX_RMS_NORM_EPS = 0.1
# Keys that must be positive whole numbers (a JSON bool or "2" is not).
REQUIRED_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_FIX = "fix config.json (the checkpoint's published config has it right)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _count(raw: dict, key: str, where: str, required: bool) -> int | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise BuildError(f"{where}: no {key}; a Qwen3 config.json gives it as a positive whole number; {_FIX}")
    if not _is_int(value) or value <= 0:
        kind = " (a string)" if isinstance(value, str) else " (a boolean)" if isinstance(value, bool) else ""
        raise BuildError(f"{where}: {key}={value!r}{kind} must be a positive whole number (a JSON integer, "
                         f"e.g. 8); {_FIX}")
    return value


def _flag(raw: dict, key: str, where: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BuildError(f"{where}: {key}={value!r} must be true or false (a JSON boolean); {_FIX}")
    return value


def _table(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BuildError(f"{where}: {key}={value!r} must be a JSON object or null; {_FIX}")
    return value


def _positive_number(value, key: str, where: str, example: str, upper: float | None = None) -> float:
    if not _is_number(value) or value <= 0 or (upper is not None and value > upper):
        limit = f" at most {upper}" if upper is not None else ""
        raise BuildError(f"{where}: {key}={value!r} must be a positive finite number{limit} (e.g. {example}); {_FIX}")
    return float(value)


def _rope_theta(raw: dict, where: str) -> float:
    params = _table(raw, "rope_parameters", where)  # transformers >= 5 spelling
    if raw.get("rope_theta") is not None:
        return _positive_number(raw["rope_theta"], "rope_theta", where, "1000000.0")
    if params.get("rope_theta") is not None:
        return _positive_number(params["rope_theta"], "rope_parameters.rope_theta", where, "1000000.0")
    raise BuildError(f"{where}: no rope_theta (nor rope_parameters.rope_theta); a Qwen3 config must give it, e.g. "
                     "\"rope_theta\": 1000000.0")


def _token_ids(value, key: str, where: str, vocab_size: int) -> tuple[int, ...]:
    """eos_token_id: null, one id or a list of ids, each a token of the vocabulary."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for token in ids:
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise BuildError(f"{where}: {key}={value!r}: each id must be a whole number in 0..{vocab_size - 1} "
                             f"(vocab_size={vocab_size}); fix it or remove the key")
    return tuple(ids)


def read_json_object(path: Path, what: str, remedy: str) -> dict:
    """A JSON file that must hold one object, or a one-line BuildError naming it."""
    path = Path(path)
    if path.is_dir():
        raise BuildError(f"{what}={path} is a directory; {remedy}")
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BuildError(f"{what}={path} does not exist; {remedy}") from None
    except OSError as exc:
        raise BuildError(f"{path}: cannot read {what} ({exc.strerror}); {remedy}") from None
    except UnicodeDecodeError:
        raise BuildError(f"{path}: not a text file, so not {what}; {remedy}") from None
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         f"{remedy}") from None
    if not isinstance(raw, dict):
        raise BuildError(f"{path}: holds a JSON {type(raw).__name__}, not an object; {remedy}")
    return raw


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate config.json (types and ranges); one-line BuildError on any problem."""
    where = str(path)
    raw = read_json_object(path, "config.json", "point CONFIG at a Hugging Face Qwen3 config.json")
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise BuildError(f"{where}: architectures={archs!r} must be a list of class names like "
                         f"[\"Qwen3ForCausalLM\"]; {_FIX}")
    if model_type != "qwen3" and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise BuildError(f"{where}: model_type={model_type!r}, architectures={archs}; only Qwen3 "
                         "(model_type \"qwen3\", Qwen3ForCausalLM) is supported: point CONFIG at a Qwen3 checkpoint")
    counts = {key: _count(raw, key, where, required=True) for key in REQUIRED_COUNTS}
    counts.update({key: _count(raw, key, where, required=False) for key in OPTIONAL_COUNTS})
    scaling, params = _table(raw, "rope_scaling", where), _table(raw, "rope_parameters", where)
    rope_type = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if rope_type != "default":
        raise BuildError(f"{where}: rope scaling {rope_type!r} is not supported yet; only plain RoPE "
                         "(rope_scaling null): use a checkpoint without rope scaling")
    if _flag(raw, "attention_bias", where, False):
        raise BuildError(f"{where}: attention_bias=true is not Qwen3 (bias-free projections only); use a Qwen3 "
                         "checkpoint")
    if _flag(raw, "use_sliding_window", where, False):
        raise BuildError(f"{where}: use_sliding_window=true is not supported (every layer attends to the whole "
                         "context); set it to false, as Qwen3's published configs do")
    layer_types = raw.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list)
                                    or any(kind != "full_attention" for kind in layer_types)):
        raise BuildError(f"{where}: layer_types={layer_types!r}: only \"full_attention\" layers are supported; "
                         "use a checkpoint without sliding-window layers")
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise BuildError(f"{where}: hidden_act={activation!r}; Qwen3 uses \"silu\" and only that is supported: "
                         "use a Qwen3 checkpoint")
    hidden, heads = counts["hidden_size"], counts["num_attention_heads"]
    kv_heads = counts["num_key_value_heads"] or heads
    head_dim = counts["head_dim"]
    if head_dim is None:
        if hidden % heads:
            raise BuildError(f"{where}: no head_dim, and hidden_size={hidden} is not a multiple of "
                             f"num_attention_heads={heads}; give head_dim")
        head_dim = hidden // heads
    if kv_heads > heads or heads % kv_heads:
        raise BuildError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; "
                         f"{_FIX}")
    if head_dim % 2:
        raise BuildError(f"{where}: head_dim={head_dim} must be even for rotary embeddings; {_FIX}")
    max_positions = counts["max_position_embeddings"] or DEFAULT_MAX_POSITION_EMBEDDINGS
    if max_positions < 2:
        raise BuildError(f"{where}: max_position_embeddings={max_positions} leaves no context (at least 2); {_FIX}")
    eps = raw.get("rms_norm_eps")
    eps = DEFAULT_RMS_NORM_EPS if eps is None else _positive_number(eps, "rms_norm_eps", where, "1e-06",
                                                                    MAX_RMS_NORM_EPS)
    vocab = counts["vocab_size"]
    eos_ids = _token_ids(raw.get("eos_token_id"), "eos_token_id", where, vocab)
    gen_path = Path(path).with_name("generation_config.json")
    if gen_path.exists():
        generation = read_json_object(gen_path, "generation_config.json",
                                      "fix it (a JSON object like {\"eos_token_id\": 2}) or remove it")
        if "eos_token_id" in generation:
            eos_ids = _token_ids(generation["eos_token_id"], "eos_token_id", str(gen_path), vocab)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=counts["intermediate_size"],
        num_hidden_layers=counts["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(raw, where),
        rms_norm_eps=eps,
        max_position_embeddings=max_positions,
        tie_word_embeddings=_flag(raw, "tie_word_embeddings", where, False),
        eos_token_ids=eos_ids,
    )
