"""The re-authored graph (ring KV, static tables, SLaNC, fp16-rounded constants) against
the Hugging Face oracle, on shapes the default checkpoint never uses."""
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

from conftest import make_checkpoint

# Constants are fp16-rounded as packed; compute is fp32. Relative to the largest logit:
MAX_REL_LOGIT_ERROR = 5e-3
MIN_LOGIT_COSINE = 0.9999
TOKENS = 48


def oracle_logits(config_path, tokens):
    model = Qwen3ForCausalLM.from_pretrained(config_path.parent, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def reference_logits(config_path, tokens, shards="preset", seq_len=64):
    config = load_model_config(config_path)
    checkpoint = Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))
    scales, _ = compute_slanc_scales(checkpoint, config)
    stack = ReferenceStack(checkpoint, PackedWeights.dense(checkpoint, config.tie_word_embeddings), config,
                           parse_layout(shards, config.num_hidden_layers), scales, seq_len)
    return np.stack([stack.step(int(t), i) for i, t in enumerate(tokens)])


@pytest.mark.parametrize("shape", ["gqa", "untied_mha", "mqa6"])
def test_reference_matches_oracle(tmp_path, shape):
    config_path = make_checkpoint(tmp_path, shape, seed=3)
    vocab = load_model_config(config_path).vocab_size
    tokens = np.random.RandomState(1).randint(0, vocab, TOKENS).tolist()
    oracle = oracle_logits(config_path, tokens)
    ours = reference_logits(config_path, tokens)
    rel = np.abs(ours - oracle).max() / np.abs(oracle).max()
    cosine = (ours * oracle).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(oracle, axis=-1)
    assert rel < MAX_REL_LOGIT_ERROR, f"{shape}: max relative logit error {rel:.2e}"
    assert cosine.min() > MIN_LOGIT_COSINE, f"{shape}: min cosine {cosine.min():.6f}"


def test_layout_does_not_change_the_math(tmp_path):
    config_path = make_checkpoint(tmp_path, "mqa6", seed=5)
    tokens = np.random.RandomState(2).randint(0, 300, 20).tolist()
    one = reference_logits(config_path, tokens, "all:0-5")
    many = reference_logits(config_path, tokens, "a:0-0,b:1-3,c:4-4,d:5-5")
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-5)


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
