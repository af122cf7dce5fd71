"""The re-authored graph (ring KV in both KV_WRITE modes, position rows, SLaNC,
fp16-rounded constants) against the Hugging Face oracle, on shapes the default checkpoint
never uses."""
import numpy as np
import pytest
import torch
from transformers import Qwen3ForCausalLM

from qwen3build.settings.layout import parse_layout
from qwen3build.quant.provider import PackedWeights
from qwen3build.settings.model_config import load_model_config
from qwen3build.graph.slanc import compute_slanc_scales
from qwen3build.lower.torch.reference import ReferenceStack
from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files
from qwen3build.graph import tables

from conftest import make_checkpoint

# Constants are fp16-rounded as packed; compute is fp32. Relative to the largest logit:
MAX_REL_LOGIT_ERROR = 5e-3
MIN_LOGIT_COSINE = 0.9999
TOKENS = 48
KV_WRITE_MODES = ("slice", "blend")


def oracle_logits(config_path, tokens):
    model = Qwen3ForCausalLM.from_pretrained(config_path.parent, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def reference_logits(config_path, tokens, shards="preset", seq_len=64, kv_write="slice"):
    config = load_model_config(config_path)
    checkpoint = Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))
    scales, _ = compute_slanc_scales(checkpoint, config)
    stack = ReferenceStack(checkpoint, PackedWeights.dense(checkpoint, config.tie_word_embeddings), config,
                           parse_layout(shards, config.num_hidden_layers), scales, seq_len, kv_write)
    return np.stack([stack.step(int(t), i) for i, t in enumerate(tokens)])


@pytest.mark.parametrize("kv_write", KV_WRITE_MODES)
@pytest.mark.parametrize("shape", ["gqa", "untied_mha", "mqa6"])
def test_reference_matches_oracle(tmp_path, shape, kv_write):
    config_path = make_checkpoint(tmp_path, shape, seed=3)
    vocab = load_model_config(config_path).vocab_size
    tokens = np.random.RandomState(1).randint(0, vocab, TOKENS).tolist()
    oracle = oracle_logits(config_path, tokens)
    ours = reference_logits(config_path, tokens, kv_write=kv_write)
    rel = np.abs(ours - oracle).max() / np.abs(oracle).max()
    cosine = (ours * oracle).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(oracle, axis=-1)
    assert rel < MAX_REL_LOGIT_ERROR, f"{shape}: max relative logit error {rel:.2e}"
    assert cosine.min() > MIN_LOGIT_COSINE, f"{shape}: min cosine {cosine.min():.6f}"


def test_layout_and_kv_write_do_not_change_the_math(tmp_path):
    config_path = make_checkpoint(tmp_path, "mqa6", seed=5)
    tokens = np.random.RandomState(2).randint(0, 300, 20).tolist()
    one = reference_logits(config_path, tokens, "all:0-5")
    many = reference_logits(config_path, tokens, "a:0-0,b:1-3,c:4-4,d:5-5")
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-5)
    # In fp32 the masked blend writes exactly the row (x*1 + r*0, x*0 + r*1): same logits.
    np.testing.assert_array_equal(many, reference_logits(config_path, tokens, "a:0-0,b:1-3,c:4-4,d:5-5",
                                                         kv_write="blend"))


def test_every_kv_write_setting_has_one_writer_in_the_graph():
    from qwen3build.graph.decoder import KV_WRITERS
    from qwen3build.settings.settings import KV_WRITE_MODES as SETTING_MODES
    assert set(KV_WRITERS) == set(SETTING_MODES) == set(KV_WRITE_MODES)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64])
def test_position_rows_are_slices_of_linear_tables(seq_len):
    """Row p of the old S x S tables, from one slice of a (2S,) ramp: mask 0 exactly on the
    active suffix (slots >= S-1-p), the write one-hot exactly at slot S-1-p."""
    mask, write = tables.mask_ramp(seq_len), tables.write_ramp(seq_len)
    assert mask.shape == write.shape == (2 * seq_len,)
    slots = np.arange(seq_len)
    for position in range(seq_len):
        slot = tables.ring_slot(position, seq_len)
        assert slot == seq_len - 1 - position
        np.testing.assert_array_equal(mask[position:position + seq_len], np.where(slots >= slot, 0.0, tables.MASK_NEG))
        np.testing.assert_array_equal(write[position:position + seq_len], (slots == slot).astype(np.float32))
    with pytest.raises(ValueError, match="capacity"):
        tables.ring_slot(seq_len, seq_len)
    rope = tables.rope_table(seq_len, 8, 1e6)
    cos, sin_signed = tables.rope_tables(seq_len, 8, 1e6)
    np.testing.assert_array_equal(rope, np.concatenate([cos, sin_signed], axis=1))


def test_mask_value_keeps_fp16_scores_finite_and_masked_weights_zero():
    """score + MASK_NEG stays finite in fp16 (the old -65504 overflowed to -inf for any
    negative score) and a masked slot still gets exactly zero weight after softmax."""
    neg = np.float16(tables.MASK_NEG)
    assert float(neg) == tables.MASK_NEG                       # exact in fp16
    scores = np.float16([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with np.errstate(over="ignore"):
        assert np.isfinite(scores + neg).all()
        assert np.isinf(scores[:2] + np.float16(-65504.0)).all()
    masked = (scores + neg).astype(np.float32)
    row = np.concatenate([masked, [0.0]])                         # the current slot: never masked
    weights = np.exp(np.float16(row - row.max()).astype(np.float32))
    assert (weights[:-1] == 0).all() and weights[-1] == 1


def test_ring_fills_to_capacity_then_refuses(tmp_path):
    config_path = make_checkpoint(tmp_path, "gqa", seed=7)
    tokens = np.random.RandomState(3).randint(0, 320, 16).tolist()
    oracle = oracle_logits(config_path, tokens)
    ours = reference_logits(config_path, tokens, seq_len=16)  # every slot of the ring used
    assert np.abs(ours - oracle).max() / np.abs(oracle).max() < MAX_REL_LOGIT_ERROR
    config = load_model_config(config_path)
    checkpoint = Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))
    stack = ReferenceStack(checkpoint, PackedWeights.dense(checkpoint, True), config, parse_layout("preset", 4),
                           compute_slanc_scales(checkpoint, config)[0], 16)
    with pytest.raises(ValueError, match="context capacity"):
        stack.step(1, 16)
