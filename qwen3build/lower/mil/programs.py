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

from ...checkpoint.tensors import layer_tensor_name
from ...errors import BuildError
from ...graph import decoder as graph
from ...graph.tables import fp16_array, shard_tables
from ...settings.layout import ShardSpec
from ...settings.model_config import NORMS, ModelConfig
from .ops import MilOps
from .quant import mil_weight
from .save import reset_op_names

log = logging.getLogger(__name__)
OPSET = ct.target.iOS18
STATE_NAME = "kv_cache"


def table_var(value: np.ndarray, name: str, palettize: bool, savings: dict | None = None):
    """A static table: dense fp16, or palettized when it takes few values (bytes saved
    are recorded in `savings`)."""
    if palettize:
        from .quant import palettized_table
        var, saved = palettized_table(fp16_array(value, name), name)
        if savings is not None:
            savings[name] = saved
        return var
    return mb.const(val=fp16_array(value, name), name=name)


def kv_state_shape(spec: ShardSpec, config: ModelConfig, seq_len: int) -> tuple[int, ...]:
    return (2 * len(spec.layers), config.num_key_value_heads, seq_len, config.head_dim)


def shard_program(tensors, weights, config: ModelConfig, spec: ShardSpec, scales: np.ndarray, seq_len: int,
                  palettize_tables: bool, table_savings: dict | None = None, kv_write: str = "blend"):
    """tensors: the norms' source (tensor(name)); weights: quant.provider.PackedWeights;
    scales: SLaNC rows indexed by layer (rows of layers outside the shard are not read)."""
    if kv_write != "blend":
        raise BuildError(f"KV_WRITE={kv_write} is not built yet; use KV_WRITE=blend")
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
            if kind in NORMS:
                return mb.const(val=tensors.tensor_fp16(layer_tensor_name(layer, kind)), name=name)
            return mil_weight(weights.projection(layer, kind), name)

        final_norm = None
        if spec.is_exit:
            final_norm = mb.const(val=tensors.tensor_fp16("model.norm.weight"),
                                  name="final_norm")
        state = mb.read_state(input=kv_cache, name="kv_read")  # read once; thread the value on
        out, new_state = graph.decoder_shard(ops, hidden_states, position, state, weight, table_vars,
                                             spec.layers, spec.is_exit, config, scales, seq_len,
                                             final_norm=final_norm)
        mb.coreml_update_state(state=kv_cache, value=new_state, name="kv_write")
        return mb.identity(x=out, name="output_hidden_states")

    return program


def embed_program(weights, config: ModelConfig):
    """weights: quant.provider.PackedWeights."""
    reset_op_names()

    @mb.program(input_specs=[mb.TensorSpec((1, 1), dtype=types.int32)], opset_version=OPSET)
    def program(input_ids):
        table = mil_weight(weights.table(head=False), "embed_tokens")
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
        weight = mil_weight(weights.table(head=True), "embed_tokens" if tied else "lm_head")
        logits = graph.lm_head(MilOps(), hidden_states, weight, config.hidden_size, config.vocab_size)
        return mb.identity(x=logits, name="logits")
    return program
