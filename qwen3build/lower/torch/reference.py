"""The re-authored graph run eagerly in fp32 torch: the project's reference.

Same graph/decoder.py math (including the KV_WRITE mode's ring write), same layout, ring
KV states, tables and SLaNC scales as the packages, and the same constants as packed
(fp16-rounded, or dequantized from quantization packs), computed in fp32. verify
compares it with the HF oracle (does the re-authoring hold?) and with the packages (does
the emitted fp16 program hold?); `run` uses it as a fast backend.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ...checkpoint.tensors import layer_tensor_name
from ...graph import decoder as graph
from ...graph.tables import fp16_array, shard_tables
from ...settings.layout import ShardSpec
from ...settings.model_config import NORMS, PROJECTIONS
from .ops import TorchOps


class ReferenceStack:
    """tensors: the norms' source (tensor_fp16(name)); weights: quant.provider.PackedWeights."""

    def __init__(self, tensors, weights, config, layout: tuple[ShardSpec, ...], scales: np.ndarray, seq_len: int,
                 kv_write: str = "slice", prefill_len: int = 0):
        """kv_write: the KV_WRITE mode whose ring write the reference runs (the packages'
        mode; both give the same values in fp32). prefill_len: tokens per prefill block
        (the packages' PREFILL_LEN; 0: no prefill, `prefill` refuses)."""
        if kv_write not in graph.KV_WRITERS:
            raise ValueError(f"kv_write={kv_write!r} is not one of {sorted(graph.KV_WRITERS)}")
        if not 0 <= prefill_len <= seq_len:
            raise ValueError(f"prefill_len={prefill_len} must be in [0, seq_len={seq_len}]")
        self.config, self.layout, self.seq_len, self.scales = config, layout, seq_len, scales
        self.kv_write, self.prefill_len = kv_write, prefill_len
        self.ops = ops = TorchOps()
        as_packed = lambda value, what: ops.tensor(fp16_array(value, what).astype(np.float32))  # noqa: E731
        tables = shard_tables(seq_len, config.head_dim, config.rope_theta, kv_write)
        self.tables = {field.name: as_packed(getattr(tables, field.name), field.name)
                       for field in dataclasses.fields(tables) if getattr(tables, field.name) is not None}
        self.layer_weights = {}
        for layer in range(config.num_hidden_layers):
            for kind in NORMS:
                self.layer_weights[layer, kind] = ops.tensor(tensors.tensor_fp16(layer_tensor_name(layer, kind)))
            for kind in PROJECTIONS:
                self.layer_weights[layer, kind] = ops.tensor(weights.projection_array(layer, kind))
        self.final_norm = ops.tensor(tensors.tensor_fp16("model.norm.weight"))
        self.embed_table = ops.tensor(weights.table_array(head=False))
        self.head = self.embed_table if config.tie_word_embeddings else ops.tensor(weights.table_array(head=True))
        self.reset()

    def reset(self) -> None:
        c = self.config
        self.states = [torch.zeros(2 * len(s.layers), c.num_key_value_heads, self.seq_len, c.head_dim)
                       for s in self.layout]

    @torch.no_grad()
    def step(self, token: int, position: int) -> np.ndarray:
        """Feed one token at `position`; returns the next-token logits (V,) float32."""
        if not 0 <= position < self.seq_len:
            raise ValueError(f"position {position} is outside the context capacity 0..{self.seq_len - 1}")
        ops, c = self.ops, self.config
        hidden = graph.embed(ops, self.embed_table, torch.tensor([[token]], dtype=torch.int32), c.hidden_size)
        pos = torch.tensor([position], dtype=torch.int32)
        for index, spec in enumerate(self.layout):  # each shard updates its state in place
            hidden = graph.decoder_shard(
                ops, hidden, pos, self.states[index], lambda layer, kind: self.layer_weights[layer, kind],
                self.tables, spec.layers, spec.is_exit, c, self.scales, self.seq_len, self.kv_write,
                final_norm=self.final_norm)
        return graph.lm_head(ops, hidden, self.head, c.hidden_size, c.vocab_size)[0].numpy()

    @torch.no_grad()
    def prefill(self, tokens, position: int) -> np.ndarray:
        """Feed up to prefill_len tokens at positions position.. through the prefill block
        graph (padded to prefill_len with graph.PREFILL_PAD_ID); returns the next-token
        logits of every given position, (n, V) float32. The padded block must fit the
        ring: position + prefill_len <= seq_len."""
        ops, c, block = self.ops, self.config, self.prefill_len
        count = len(tokens)
        if not block:
            raise ValueError("this reference has no prefill block (prefill_len=0)")
        if not 1 <= count <= block:
            raise ValueError(f"a prefill block takes 1..{block} tokens, got {count}")
        if not 0 <= position <= self.seq_len - block:
            raise ValueError(f"a prefill block of {block} at position {position} does not fit the context capacity "
                             f"0..{self.seq_len - 1}")
        ids = list(tokens) + [graph.PREFILL_PAD_ID] * (block - count)
        hidden = graph.embed_block(ops, self.embed_table, torch.tensor([ids], dtype=torch.int32), c.hidden_size,
                                   block)                                      # (1, H, 1, T)
        pos = torch.tensor([position], dtype=torch.int32)
        for index, spec in enumerate(self.layout):
            hidden = graph.decoder_block(
                ops, hidden, pos, self.states[index], lambda layer, kind: self.layer_weights[layer, kind],
                self.tables, spec.layers, spec.is_exit, c, self.scales, self.seq_len, block,
                final_norm=self.final_norm)
        logits = graph.lm_head_block(ops, hidden, self.head, c.hidden_size, c.vocab_size, block)  # (1, T, V)
        return logits[0, :count].numpy()
