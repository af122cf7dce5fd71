"""MIL programs for the three kinds of package: decoder shard, io_model, sampler.

Pure functions from weights and settings to MIL programs; only the task actions write
files. The math comes from graph.py through MilOps.
"""
from __future__ import annotations

import logging

import numpy as np
import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from .. import graph
from ..config import ShardSpec
from ..errors import BuildError
from ..model_config import ModelConfig
from ..numerics.tables import shard_tables
from ..weights import layer_tensor_name
from .mil_ops import MilOps
from .save import reset_op_names

log = logging.getLogger(__name__)
OPSET = ct.target.iOS18
STATE_NAME = "kv_cache"
NORM_KINDS = ("input_norm", "post_norm", "q_norm", "k_norm")


def fp16_array(value: np.ndarray, what: str) -> np.ndarray:
    """Cast to fp16, refusing values that do not fit (they would become inf on device)."""
    out = np.asarray(value, dtype=np.float32).astype(np.float16)
    if not np.all(np.isfinite(out)):
        raise BuildError(f"{what}: values beyond fp16 range (|x| > 65504); this checkpoint cannot be lowered to fp16")
    return out


class DenseWeights:
    """fp16 weights straight from the checkpoint (the fp16 recipe)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def projection_array(self, layer: int, kind: str) -> np.ndarray:
        """The weight exactly as packed (fp16-rounded), widened to fp32 for the reference."""
        return self.checkpoint.tensor_fp16(layer_tensor_name(layer, kind)).astype(np.float32)

    def projection_var(self, layer: int, kind: str, name: str):
        return mb.const(val=self.checkpoint.tensor_fp16(layer_tensor_name(layer, kind)), name=name)

    def embed_array(self) -> np.ndarray:
        return self.checkpoint.tensor_fp16("model.embed_tokens.weight").astype(np.float32)

    def head_array(self) -> np.ndarray:
        return self.checkpoint.tensor_fp16(self.checkpoint.head_name).astype(np.float32)


def table_var(value: np.ndarray, name: str, palettize: bool, savings: dict | None = None):
    """A static table: dense fp16, or palettized when it takes few values (bytes saved
    are recorded in `savings`)."""
    if palettize:
        from ..quant.mil_emit import palettized_table
        var, saved = palettized_table(fp16_array(value, name), name)
        if savings is not None:
            savings[name] = saved
        return var
    return mb.const(val=fp16_array(value, name), name=name)


def kv_state_shape(spec: ShardSpec, config: ModelConfig, seq_len: int) -> tuple[int, ...]:
    return (2 * len(spec.layers), config.num_key_value_heads, seq_len, config.head_dim)


def shard_program(checkpoint, weights, spec: ShardSpec, scales: np.ndarray, seq_len: int,
                  palettize_tables: bool, table_savings: dict | None = None):
    config: ModelConfig = checkpoint.config
    tables = shard_tables(seq_len, config.head_dim, config.rope_theta)
    state_shape = kv_state_shape(spec, config, seq_len)
    reset_op_names()

    @mb.program(input_specs=[
        mb.TensorSpec((1, 1, config.hidden_size), dtype=types.fp16),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.StateTensorSpec(state_shape, dtype=types.fp16),
    ], opset_version=OPSET)
    def program(hidden_states, position, kv_cache):
        ops = MilOps()
        table_vars = {
            "cos": table_var(tables.cos, "rope_cos", False),
            "sin_signed": table_var(tables.sin_signed, "rope_sin_signed", False),
            "write": table_var(tables.write, "kv_write_table", palettize_tables, table_savings),
            "mask": table_var(tables.mask, "causal_mask_table", palettize_tables, table_savings),
        }

        def weight(layer, kind):
            name = f"layer{layer:02d}_{kind}"
            if kind == "input_norm":  # first weight of each layer: one progress line per layer
                log.info("  %s layer %d (%d/%d)", spec.package_name, layer, layer - spec.first + 1, len(spec.layers))
            if kind in NORM_KINDS:
                return mb.const(val=fp16_array(checkpoint.layer(layer, kind), name), name=name)
            return weights.projection_var(layer, kind, name)

        final_norm = None
        if spec.is_exit:
            final_norm = mb.const(val=fp16_array(checkpoint.tensor("model.norm.weight"), "final_norm"),
                                  name="final_norm")
        state = mb.read_state(input=kv_cache, name="kv_read")  # read once; thread the value on
        out, new_state = graph.decoder_shard(ops, hidden_states, position, state, weight, table_vars,
                                             spec.layers, spec.is_exit, config, scales, seq_len,
                                             final_norm=final_norm)
        mb.coreml_update_state(state=kv_cache, value=new_state, name="kv_write")
        return mb.identity(x=out, name="output_hidden_states")

    return program


def embed_program(weights, config: ModelConfig):
    """weights: a provider with table_var(name, head=False) (see quantize.RecipeWeights)."""
    reset_op_names()

    @mb.program(input_specs=[mb.TensorSpec((1, 1), dtype=types.int32)], opset_version=OPSET)
    def program(input_ids):
        table = weights.table_var("embed_tokens", head=False)
        hidden = graph.embed(MilOps(), table, input_ids, config.hidden_size)
        return mb.identity(x=hidden, name="hidden_states")
    return program


def head_program(weights, config: ModelConfig):
    reset_op_names()

    @mb.program(input_specs=[mb.TensorSpec((1, 1, config.hidden_size), dtype=types.fp16)],
                opset_version=OPSET)
    def program(hidden_states):
        # Same name as the embedding when tied, so the merged package stores it once.
        tied = config.tie_word_embeddings
        weight = weights.table_var("embed_tokens" if tied else "lm_head", head=True)
        logits = graph.lm_head(MilOps(), hidden_states, weight, config.hidden_size, config.vocab_size)
        return mb.identity(x=logits, name="logits")
    return program
