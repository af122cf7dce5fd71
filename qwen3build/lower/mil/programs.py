"""MIL programs for the three kinds of package: decoder shard, io_model, sampler.

Pure functions from weights and settings to MIL programs; only the task actions write
files. The math comes from graph/decoder.py through MilOps.
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
                  palettize_tables: bool, table_savings: dict | None = None, *, kv_write: str):
    """tensors: the norms' source (tensor(name)); weights: quant.provider.PackedWeights;
    scales: SLaNC rows indexed by layer (rows of layers outside the shard are not read);
    kv_write: KV_WRITE ("slice" or "blend", graph/decoder.py). The program's `position`
    input must be in [0, seq_len)."""
    if kv_write not in graph.KV_WRITERS:
        raise BuildError(f"KV_WRITE={kv_write!r} is unknown; allowed: {', '.join(graph.KV_WRITERS)}")
    tables = shard_tables(seq_len, config.head_dim, config.rope_theta, kv_write)
    state_shape = kv_state_shape(spec, config, seq_len)
    reset_op_names()

    @mb.program(input_specs=[
        mb.TensorSpec((1, 1, config.hidden_size), dtype=types.fp16),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.StateTensorSpec(state_shape, dtype=types.fp16),
    ], opset_version=OPSET)
    def program(hidden_states, position, kv_cache):
        ops = MilOps()
        # The RoPE table takes many values; the ramps two each (palettized when asked).
        table_vars = {"rope": table_var(tables.rope, "rope_table", False),
                      "mask_ramp": table_var(tables.mask_ramp, "causal_mask_ramp", palettize_tables, table_savings)}
        if tables.write_ramp is not None:
            table_vars["write_ramp"] = table_var(tables.write_ramp, "kv_write_ramp", palettize_tables, table_savings)

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
        out = graph.decoder_shard(ops, hidden_states, position, kv_cache, weight, table_vars, spec.layers,
                                  spec.is_exit, config, scales, seq_len, kv_write, final_norm=final_norm)
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
