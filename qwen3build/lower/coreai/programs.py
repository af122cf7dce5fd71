"""The Core AI packages of a stack as torch modules: decoder shard, io_model, sampler.

Each module's forward calls graph/decoder.py (or the sampler rules) with CoreAIOps; the
functions below return the package's entrypoints (convert.Function) with the same names,
inputs, outputs and state as the Core ML packages (lower/mil/programs.py), so one host
loop serves both formats (T = PREFILL_LEN; the prefill functions only when T > 0):

    shard       decode(hidden_states (1, 1, H) fp16, position (1,) int32)
                    -> output_hidden_states (1, 1, H) fp16
                prefill(hidden_states (1, H, 1, T) fp16, position (1,) int32)
                    -> output_hidden_states (1, H, 1, T) fp16
                both with the state kv_cache (2L, KVH, S, D) fp16
    io_model    embed(input_ids (1, 1) int32) -> hidden_states (1, 1, H) fp16
                lm_head(hidden_states (1, 1, H) fp16) -> logits (1, V) fp16
                embed_prefill(input_ids (1, T) int32) -> hidden_states (1, H, 1, T) fp16
                lm_head_prefill(hidden_states (1, H, 1, T) fp16) -> logits (1, T, V) fp16
    sampler     main(logits, recent_tokens, temperature, min_p, repetition_penalty, coherence, noise)
                    -> token (1,) int32, effective_temperature (1,) fp32   (sampler.py)

A package's functions are modules over the same weight modules (and, in a shard, the
same state buffer), exported one by one: the package stores each weight once and its
functions share the state by name. The prefill functions lower graph.decoder_block /
embed_block / lm_head_block (the channels-first T-token path).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ...checkpoint.tensors import layer_tensor_name
from ...errors import BuildError
from ...graph import decoder as graph
from ...graph.tables import fp16_array, shard_tables
from ...settings.layout import ShardSpec
from ...settings.model_config import NORMS, PROJECTIONS, ModelConfig
from .convert import Function
from .ops import COMPUTE_DTYPE, CoreAIOps
from .weights import projection_module, table_module

STATE_NAME = "kv_cache"
SHARD_INPUTS = ("hidden_states", "position")
SHARD_OUTPUTS = ("output_hidden_states",)
# Function names: the graph's (and so the Core ML packages').
DECODE, PREFILL = graph.DECODE, graph.PREFILL
EMBED, LM_HEAD, EMBED_PREFILL, LM_HEAD_PREFILL = graph.EMBED, graph.LM_HEAD, graph.EMBED_PREFILL, graph.LM_HEAD_PREFILL


def _constant(value: np.ndarray, what: str, dtype: torch.dtype) -> torch.Tensor:
    """A constant rounded to fp16 as packed (refusing values beyond fp16), held in `dtype`."""
    return torch.from_numpy(fp16_array(value, what)).to(dtype)


def kv_state_shape(spec: ShardSpec, config: ModelConfig, seq_len: int) -> tuple[int, ...]:
    return (2 * len(spec.layers), config.num_key_value_heads, seq_len, config.head_dim)


class ShardModule(torch.nn.Module):
    """A contiguous run of layers (graph.decoder_shard) with its KV state as a buffer.

    tensors: the norms' source (tensor_fp16(name)); weights: quant.provider.PackedWeights;
    scales: SLaNC rows indexed by layer; the `position` input must be in [0, seq_len).
    dtype: COMPUTE_DTYPE (fp16) for packages; fp32 computes with the same fp16 constants
    (the tests' exact check of the lowering against the fp32 reference)."""

    def __init__(self, tensors, weights, config: ModelConfig, spec: ShardSpec, scales: np.ndarray, seq_len: int,
                 kv_write: str, dtype: torch.dtype = COMPUTE_DTYPE):
        super().__init__()
        if kv_write not in graph.KV_WRITERS:
            raise BuildError(f"KV_WRITE={kv_write!r} is unknown; allowed: {', '.join(graph.KV_WRITERS)}")
        self.config, self.spec, self.scales, self.seq_len, self.kv_write = config, spec, scales, seq_len, kv_write
        self.dtype = dtype
        self.ops = CoreAIOps(dtype)
        tables = shard_tables(seq_len, config.head_dim, config.rope_theta, kv_write)
        self.table_names = [field.name for field in dataclasses.fields(tables) if getattr(tables, field.name) is not None]
        for name in self.table_names:
            self.register_buffer(f"table_{name}", _constant(getattr(tables, name), name, dtype))
        self.projections = torch.nn.ModuleDict()
        for layer in spec.layers:
            for kind in NORMS:
                name = layer_tensor_name(layer, kind)
                self.register_buffer(f"norm_layer{layer:02d}_{kind}", _constant(tensors.tensor_fp16(name), name, dtype))
            for kind in PROJECTIONS:
                self.projections[f"layer{layer:02d}_{kind}"] = projection_module(weights.projection(layer, kind), dtype)
        self.register_buffer("final_norm", _constant(tensors.tensor_fp16("model.norm.weight"), "model.norm.weight", dtype)
                             if spec.is_exit else None)  # the exit shard's final norm
        self.register_buffer(STATE_NAME, torch.zeros(kv_state_shape(spec, config, seq_len), dtype=dtype))

    def weight(self, layer: int, kind: str):
        if kind in NORMS:
            return getattr(self, f"norm_layer{layer:02d}_{kind}")
        return self.projections[f"layer{layer:02d}_{kind}"]()

    def forward(self, hidden_states, position):
        tables = {name: getattr(self, f"table_{name}") for name in self.table_names}
        return graph.decoder_shard(self.ops, hidden_states, position, getattr(self, STATE_NAME), self.weight, tables,
                                   self.spec.layers, self.spec.is_exit, self.config, self.scales, self.seq_len,
                                   self.kv_write, final_norm=self.final_norm)


class ShardBlock(torch.nn.Module):
    """A shard's prefill: graph.decoder_block over the ShardModule's weights and state,
    `tokens` positions per call."""

    def __init__(self, shard: ShardModule, tokens: int):
        super().__init__()
        self.shard, self.tokens = shard, tokens

    def forward(self, hidden_states, position):
        shard = self.shard
        tables = {name: getattr(shard, f"table_{name}") for name in shard.table_names}
        return graph.decoder_block(shard.ops, hidden_states, position, getattr(shard, STATE_NAME), shard.weight,
                                   tables, shard.spec.layers, shard.spec.is_exit, shard.config, shard.scales,
                                   shard.seq_len, self.tokens, final_norm=shard.final_norm)


def shard_functions(module: ShardModule, prefill_len: int = 0) -> list[Function]:
    """decode (the default), and prefill of `prefill_len` tokens when > 0, on `module`."""
    hidden, dtype = module.config.hidden_size, module.dtype
    position = lambda: torch.zeros(1, dtype=torch.int32)  # noqa: E731  one tensor per example input
    functions = [Function(DECODE, module, (torch.zeros(1, 1, hidden, dtype=dtype), position()),
                          SHARD_INPUTS, SHARD_OUTPUTS, (STATE_NAME,))]
    if prefill_len:
        functions.append(Function(PREFILL, ShardBlock(module, prefill_len),
                                  (torch.zeros(1, hidden, 1, prefill_len, dtype=dtype), position()),
                                  SHARD_INPUTS, SHARD_OUTPUTS, (STATE_NAME,)))
    return functions


class EmbedFunction(torch.nn.Module):
    def __init__(self, table: torch.nn.Module, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.table, self.hidden_size, self.ops = table, config.hidden_size, CoreAIOps(dtype)

    def forward(self, input_ids):
        return graph.embed(self.ops, self.table(), input_ids, self.hidden_size)          # (1, 1, H)


class HeadFunction(torch.nn.Module):
    def __init__(self, table: torch.nn.Module, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.table, self.config, self.ops = table, config, CoreAIOps(dtype)

    def forward(self, hidden_states):
        c = self.config
        return graph.lm_head(self.ops, hidden_states, self.table(), c.hidden_size, c.vocab_size)  # (1, V)


class EmbedBlock(EmbedFunction):
    def __init__(self, table: torch.nn.Module, config: ModelConfig, dtype: torch.dtype, tokens: int):
        super().__init__(table, config, dtype)
        self.tokens = tokens

    def forward(self, input_ids):
        return graph.embed_block(self.ops, self.table(), input_ids, self.hidden_size, self.tokens)  # (1, H, 1, T)


class HeadBlock(HeadFunction):
    def __init__(self, table: torch.nn.Module, config: ModelConfig, dtype: torch.dtype, tokens: int):
        super().__init__(table, config, dtype)
        self.tokens = tokens

    def forward(self, hidden_states):
        c = self.config
        return graph.lm_head_block(self.ops, hidden_states, self.table(), c.hidden_size, c.vocab_size,
                                   self.tokens)                                 # (1, T, V)


def io_functions(weights, config: ModelConfig, dtype: torch.dtype = COMPUTE_DTYPE,
                 prefill_len: int = 0) -> list[Function]:
    """`embed` (the default) and `lm_head` of the io_model, and their T-token twins when
    prefill_len > 0; a tied head is the embedding's own module, so the package stores the
    table once. dtype: as ShardModule's."""
    embedding = table_module(weights.table(head=False), dtype)
    head = embedding if config.tie_word_embeddings else table_module(weights.table(head=True), dtype)
    hidden = config.hidden_size
    functions = [
        Function(EMBED, EmbedFunction(embedding, config, dtype), (torch.zeros(1, 1, dtype=torch.int32),),
                 ("input_ids",), ("hidden_states",)),
        Function(LM_HEAD, HeadFunction(head, config, dtype), (torch.zeros(1, 1, hidden, dtype=dtype),),
                 ("hidden_states",), ("logits",)),
    ]
    if prefill_len:
        functions += [
            Function(EMBED_PREFILL, EmbedBlock(embedding, config, dtype, prefill_len),
                     (torch.zeros(1, prefill_len, dtype=torch.int32),), ("input_ids",), ("hidden_states",)),
            Function(LM_HEAD_PREFILL, HeadBlock(head, config, dtype, prefill_len),
                     (torch.zeros(1, hidden, 1, prefill_len, dtype=dtype),), ("hidden_states",), ("logits",)),
        ]
    return functions
