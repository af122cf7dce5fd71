"""MIL programs for the decoder shards and the io_model (the sampler: lower/mil/sampler.py).

Pure functions from weights and settings to MIL programs; only the task actions write
files. The math comes from graph/decoder.py through MilOps. Each package is ONE program
with several functions (decode + prefill; embed, lm_head + their prefill twins) built in
one process: the functions emit their weights under the same names (quant.shared_const),
so each is stored once (lower/mil/save.py checks it after saving).
"""
from __future__ import annotations

import logging

import numpy as np
import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types

from ...checkpoint.tensors import layer_tensor_name
from ...errors import BuildError
from ...graph import decoder as graph
from ...graph.tables import fp16_array, shard_tables
from ...settings.layout import ShardSpec
from ...settings.model_config import NORMS, ModelConfig
from .ops import MilOps
from .quant import mil_weight, shared_const, stored_weight
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
    return shared_const(fp16_array(value, name), name)


def kv_state_shape(spec: ShardSpec, config: ModelConfig, seq_len: int) -> tuple[int, ...]:
    return (2 * len(spec.layers), config.num_key_value_heads, seq_len, config.head_dim)


def _multifunction(functions: dict) -> Program:
    """One ML Program holding `functions` (name -> mb.function), the first the default.
    Constants share blobs by weight_id (quant.shared_const): one process, one conversion,
    no coremltools save_multifunction (which reloads every function to deduplicate)."""
    program = Program()
    for name, function in functions.items():
        program.add_function(name, function)
    program.default_function_name = next(iter(functions))
    program.export_as_multifunction = True
    return program


def shard_program(tensors, weights, config: ModelConfig, spec: ShardSpec, scales: np.ndarray, seq_len: int,
                  palettize_tables: bool, table_savings: dict | None = None, *, kv_write: str, prefill_len: int = 0):
    """tensors: the norms' source (tensor(name)); weights: quant.provider.PackedWeights;
    scales: SLaNC rows indexed by layer (rows of layers outside the shard are not read);
    kv_write: KV_WRITE ("slice" or "blend", graph/decoder.py); prefill_len: PREFILL_LEN
    (0: decode only).

    Functions (graph.shard_functions): `decode` (the default: hidden_states (1, 1, H),
    position (1,) int32 in [0, seq_len)) and, with prefill_len, `prefill` (hidden_states
    (1, H, 1, T) channels-first, position (1,) int32 = the block's first position, with
    position + T <= seq_len); both -> output_hidden_states of their input's shape, and both
    read and write the one state kv_cache (2L, KVH, S, D). The weights and tables are
    emitted under the same names in both, so they are stored once."""
    if kv_write not in graph.KV_WRITERS:
        raise BuildError(f"KV_WRITE={kv_write!r} is unknown; allowed: {', '.join(graph.KV_WRITERS)}")
    if not 0 <= prefill_len <= seq_len:
        raise BuildError(f"PREFILL_LEN={prefill_len} exceeds SEQ_LEN={seq_len}: a prefill block must fit in the KV "
                         f"ring; choose PREFILL_LEN <= {seq_len} (or 0)")
    tables = shard_tables(seq_len, config.head_dim, config.rope_theta, kv_write)
    state_shape = kv_state_shape(spec, config, seq_len)
    hidden = config.hidden_size
    values: dict = {}  # weight name -> array or pack, read once for every function

    def value(name, read):
        if name not in values:
            values[name] = read()
        return values[name]

    def function(name: str, tokens: int | None):
        hidden_shape = (1, 1, hidden) if tokens is None else (1, hidden, 1, tokens)

        @mb.function(input_specs=[
            mb.TensorSpec(hidden_shape, dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
            mb.StateTensorSpec(state_shape, dtype=types.fp16),
        ], opset_version=OPSET)
        def body(hidden_states, position, kv_cache):
            ops = MilOps("" if tokens is None else f"{name}_")
            # The RoPE table takes many values; the ramps two each (palettized when asked).
            table_vars = {"rope": table_var(tables.rope, "rope_table", False),
                          "mask_ramp": table_var(tables.mask_ramp, "causal_mask_ramp", palettize_tables, table_savings)}
            if tables.write_ramp is not None and tokens is None:
                table_vars["write_ramp"] = table_var(tables.write_ramp, "kv_write_ramp", palettize_tables,
                                                     table_savings)

            def weight(layer, kind):
                weight_name = f"layer{layer:02d}_{kind}"
                if kind == "input_norm":  # first weight of each layer: one progress line per layer
                    log.info("  %s:%s layer %d (%d/%d)", spec.package_name, name, layer, layer - spec.first + 1,
                             len(spec.layers))
                if kind in NORMS:
                    return shared_const(value(weight_name, lambda: tensors.tensor_fp16(layer_tensor_name(layer, kind))),
                                        weight_name)
                return mil_weight(value(weight_name, lambda: stored_weight(weights.projection(layer, kind))),
                                  weight_name)

            final_norm = None
            if spec.is_exit:
                final_norm = shared_const(value("final_norm", lambda: tensors.tensor_fp16("model.norm.weight")),
                                          "final_norm")
            if tokens is None:
                out = graph.decoder_shard(ops, hidden_states, position, kv_cache, weight, table_vars, spec.layers,
                                          spec.is_exit, config, scales, seq_len, kv_write, final_norm=final_norm)
            else:
                out = graph.decoder_block(ops, hidden_states, position, kv_cache, weight, table_vars, spec.layers,
                                          spec.is_exit, config, scales, seq_len, tokens, final_norm=final_norm)
            return mb.identity(x=out, name="output_hidden_states")

        return body

    reset_op_names()
    functions = {graph.DECODE: function(graph.DECODE, None)}
    if prefill_len:
        functions[graph.PREFILL] = function(graph.PREFILL, prefill_len)
    return _multifunction(functions)


def io_program(weights, config: ModelConfig, prefill_len: int = 0):
    """The io_model: `embed` (input_ids (1, 1) int32 -> hidden_states (1, 1, H), the default)
    and `lm_head` (hidden_states (1, 1, H) -> logits (1, V)); with prefill_len T,
    `embed_prefill` (input_ids (1, T) -> hidden_states (1, H, 1, T), the shards' prefill
    layout) and `lm_head_prefill` (hidden_states (1, H, 1, T) -> logits (1, T, V), a row
    per position). weights: quant.provider.PackedWeights. A tied head is the embedding's
    own constants (same name: stored once for all four functions)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    tied = config.tie_word_embeddings
    table_value = stored_weight(weights.table(head=False))   # the stored arrays, made once for every function
    head_value = table_value if tied else stored_weight(weights.table(head=True))
    head_name = "embed_tokens" if tied else "lm_head"

    def embed_function(tokens: int | None):
        @mb.function(input_specs=[mb.TensorSpec((1, tokens or 1), dtype=types.int32)], opset_version=OPSET)
        def body(input_ids):
            ops = MilOps("" if tokens is None else "prefill_")
            table = mil_weight(table_value, "embed_tokens")
            if tokens is None:
                out = graph.embed(ops, table, input_ids, hidden)
            else:
                out = graph.embed_block(ops, table, input_ids, hidden, tokens)
            return mb.identity(x=out, name="hidden_states")
        return body

    def head_function(tokens: int | None):
        shape = (1, 1, hidden) if tokens is None else (1, hidden, 1, tokens)

        @mb.function(input_specs=[mb.TensorSpec(shape, dtype=types.fp16)], opset_version=OPSET)
        def body(hidden_states):
            ops = MilOps("" if tokens is None else "prefill_")
            weight = mil_weight(head_value, head_name)
            if tokens is None:
                logits = graph.lm_head(ops, hidden_states, weight, hidden, vocab)
            else:
                logits = graph.lm_head_block(ops, hidden_states, weight, hidden, vocab, tokens)
            return mb.identity(x=logits, name="logits")
        return body

    reset_op_names()
    functions = {graph.EMBED: embed_function(None), graph.LM_HEAD: head_function(None)}
    if prefill_len:
        functions[graph.EMBED_PREFILL] = embed_function(prefill_len)
        functions[graph.LM_HEAD_PREFILL] = head_function(prefill_len)
    return _multifunction(functions)
