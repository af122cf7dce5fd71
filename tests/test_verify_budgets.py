"""Verify's defaults scale with the model (verify/budgets.py): the default checkpoint keeps
every default, the 1.7B shape gets budgets that fit minutes, and given options win."""
import json
from types import SimpleNamespace

from qwen3build.settings.model_config import load_model_config
from qwen3build.verify.budgets import non_embedding_params, scaled_defaults
from qwen3build.verify.options import VerifyOptions, request_from_vars

from conftest import REPO

QWEN3_1P7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)


def config_1p7b(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **QWEN3_1P7B}))
    return load_model_config(path)


def plan_of(config, seq_len=4096):
    return SimpleNamespace(config=config, settings=SimpleNamespace(SEQ_LEN=seq_len, RECIPE="default"),
                           tree=SimpleNamespace(verify_dir=REPO / "artifacts" / "verify"))


def test_the_default_checkpoint_keeps_every_default():
    config = load_model_config(REPO / "assets" / "qwen3-tiny" / "config.json")
    assert non_embedding_params(config) == 6 * (256 * (2 * 384 + 2 * 128) + 3 * 256 * 768)
    assert scaled_defaults(config, 4096, VerifyOptions(), set()) == ({}, None)
    options = request_from_vars(plan_of(config), {}, environ={}).options
    assert options == VerifyOptions() and options.scaled is None


def test_the_1p7b_shape_gets_budgets_that_fit_minutes(tmp_path):
    config = config_1p7b(tmp_path)
    assert non_embedding_params(config) == 28 * (2048 * (2 * 2048 + 2 * 1024) + 3 * 2048 * 6144)
    options = request_from_vars(plan_of(config), {}, environ={}).options
    assert options.windows == (256, 1024) and options.max_windows == 1   # 1024 positions per rung
    assert options.rollouts == 2 and options.rollout_tokens == 32
    assert options.parity_tokens < 97   # no long parity prompt beyond T + T/2 + 1
    assert "1.41B decoder parameters" in options.scaled and "windows 256,1024 x1" in options.scaled


def test_given_options_are_used_as_given(tmp_path):
    config = config_1p7b(tmp_path)
    options = request_from_vars(plan_of(config), {"WINDOWS": "256,SEQ_LEN", "ROLLOUTS": "4", "PARITY_TOKENS": "500"},
                                environ={}).options
    assert options.windows == (256, "SEQ_LEN") and options.max_windows == 2
    assert options.rollouts == 4 and options.parity_tokens == 500
    assert options.scaled is None
    small = request_from_vars(plan_of(config), {"MAX_WINDOWS": "1"}, environ={}).options
    assert small.windows == VerifyOptions().windows and small.rollouts == 2  # the rest still scaled


def test_a_much_larger_model_keeps_one_short_window_and_one_rollout(tmp_path):
    config = config_1p7b(tmp_path)
    big = SimpleNamespace(**{**vars(config), "num_hidden_layers": 28 * 20})  # ~28B decoder parameters
    big.q_dim, big.kv_dim = config.q_dim, config.kv_dim
    overrides, note = scaled_defaults(big, 4096, VerifyOptions(), set())
    assert overrides["windows"] == (128,) and overrides["rollouts"] == 1 and note
