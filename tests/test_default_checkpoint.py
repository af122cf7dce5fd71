"""The embedded default checkpoint (assets/qwen3-tiny) and the random-checkpoint writer.

transformers' Qwen3ForCausalLM is the independent loader here: if it reads our files
with no missing or unexpected tensors and the values match the files, the layout is a
real Hugging Face Qwen3 layout.
"""

import json
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from qwen3build.paths import DEFAULT_CHECKPOINT_DIR, HELDOUT_TEXT_PATH  # noqa: E402
from tinymodel import synth, train  # noqa: E402

# Thresholds, each with its reason.
MAX_CHECKPOINT_BYTES = 25 * 1000 ** 2   # the repo carries it: keep clones cheap
MIN_LAYERS = 6                          # enough layers to split into left/mid/right shards
MIN_HELDOUT_TOKENS = 5000               # the parity gate needs long contexts
MIN_FRACTION_PEAKED = 0.85              # positions with top-2 margin >= 0.1 (shipped 0.88, untrained ~0.45)
MAX_HELDOUT_LOSS = 4.5                  # nats/token (shipped 3.98, untrained ~7.6)
MIN_MEDIAN_TOP1 = 0.12                  # shipped 0.17; a 3-step model is at ~0.002
# The margin fraction alone does not tell trained from untrained: a near-unigram model
# after 3 steps already has ~0.86 of positions at margin >= 0.1 (the same two tokens
# lead everywhere). Loss and median top-1 probability are what show it was trained.
PEAKED_WINDOW = 512                     # the training context

# The config.json keys of a real (transformers-4 era) Qwen3 release.
RELEASE_CONFIG_KEYS = {
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
    "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "torch_dtype",
    "vocab_size", "bos_token_id", "eos_token_id", "hidden_act", "attention_bias",
    "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers",
}

TINY_SHAPE = dict(vocab_size=384, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=32)  # q dim 96 != 48


@pytest.fixture(scope="module")
def shipped_config():
    return json.loads((DEFAULT_CHECKPOINT_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return Tokenizer.from_file(str(DEFAULT_CHECKPOINT_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def shipped_model():
    model, info = transformers.Qwen3ForCausalLM.from_pretrained(
        str(DEFAULT_CHECKPOINT_DIR), dtype=torch.float32, local_files_only=True,
        output_loading_info=True)
    model.eval()
    return model, info


def load_checkpoint_tensors(directory):
    """name -> tensor from model.safetensors or the shards named by the index."""
    index_path = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
             if index_path.exists() else ["model.safetensors"])
    tensors = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():
                assert key not in tensors, f"{key} stored twice"
                tensors[key] = handle.get_tensor(key)
    return tensors


def assert_transformers_reads_exactly(model, info, tensors):
    """No tensor missing or left over, and every parameter equals the file's value."""
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    state = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), f"{name} differs from the file"


# --------------------------------------------------------------------- shipped files


def test_config_is_release_style_qwen3(shipped_config):
    assert RELEASE_CONFIG_KEYS <= shipped_config.keys(), RELEASE_CONFIG_KEYS - shipped_config.keys()
    assert "rope_parameters" not in shipped_config  # the transformers-5 key, not in releases
    assert shipped_config["architectures"] == ["Qwen3ForCausalLM"]
    assert shipped_config["model_type"] == "qwen3"
    assert shipped_config["torch_dtype"] == "bfloat16"
    assert shipped_config["rope_scaling"] is None
    assert shipped_config["tie_word_embeddings"] is True


def test_config_shape_invariants(shipped_config):
    heads = shipped_config["num_attention_heads"]
    assert shipped_config["num_hidden_layers"] >= MIN_LAYERS
    assert shipped_config["head_dim"] * heads != shipped_config["hidden_size"]
    assert shipped_config["num_key_value_heads"] < heads  # GQA
    assert heads % shipped_config["num_key_value_heads"] == 0


def test_checkpoint_size():
    total = sum(path.stat().st_size for path in DEFAULT_CHECKPOINT_DIR.iterdir() if path.is_file())
    assert total <= MAX_CHECKPOINT_BYTES, f"{total / 1e6:.1f} MB"


def test_weights_are_bf16_with_hf_names(shipped_config):
    expected = {spec.name: spec.shape for spec in synth.qwen3_tensor_specs(shipped_config)}
    with safe_open(str(DEFAULT_CHECKPOINT_DIR / "model.safetensors"), framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert stored == expected
    assert "lm_head.weight" not in stored  # tied
    assert dtypes == {"BF16"}


def test_transformers_loads_the_shipped_files(shipped_model, shipped_config):
    model, info = shipped_model
    assert_transformers_reads_exactly(model, info, load_checkpoint_tensors(DEFAULT_CHECKPOINT_DIR))
    # transformers 5 maps the release keys onto its own: rope_theta -> rope_parameters.
    assert model.config.rope_parameters["rope_theta"] == shipped_config["rope_theta"]
    assert model.config.head_dim == shipped_config["head_dim"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_round_trips_python(shipped_tokenizer, shipped_config):
    assert shipped_tokenizer.get_vocab_size() == shipped_config["vocab_size"]
    for index, token in enumerate(train.SPECIAL_TOKENS):
        assert shipped_tokenizer.token_to_id(token) == index
    assert shipped_tokenizer.token_to_id(train.EOS_TOKEN) == shipped_config["eos_token_id"]
    samples = [
        HELDOUT_TEXT_PATH.read_text(encoding="utf-8"),
        "def f(x):\n\treturn {'é': x ** 2}  # naïve ✓\r\n",
        "    \n\n  trailing spaces   ",
    ]
    for text in samples:
        ids = shipped_tokenizer.encode(text).ids
        assert shipped_tokenizer.decode(ids) == text
    special = "<|im_start|>x = 1<|im_end|><|endoftext|>"
    ids = shipped_tokenizer.encode(special).ids
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert shipped_tokenizer.decode(ids, skip_special_tokens=False) == special


def test_auto_tokenizer_agrees_with_tokenizer_json(shipped_tokenizer):
    auto = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT_DIR), local_files_only=True)
    text = HELDOUT_TEXT_PATH.read_text(encoding="utf-8")[:4000]
    assert auto(text)["input_ids"] == shipped_tokenizer.encode(text).ids
    assert auto.eos_token == train.EOS_TOKEN


def test_model_is_peaked_on_heldout_text(shipped_model, shipped_tokenizer):
    model, _ = shipped_model
    ids = shipped_tokenizer.encode(HELDOUT_TEXT_PATH.read_text(encoding="utf-8")).ids
    assert len(ids) >= MIN_HELDOUT_TOKENS
    stats = train.peakedness(model, ids, PEAKED_WINDOW)
    assert stats["fraction_margin_ge_0p1"] >= MIN_FRACTION_PEAKED, stats
    assert stats["heldout_loss"] <= MAX_HELDOUT_LOSS, stats
    assert stats["median_top1_prob"] >= MIN_MEDIAN_TOP1, stats


def test_tokenizer_only_run_reproduces_shipped_tokenizer(tmp_path):
    """Re-running the tokenizer step on the same stdlib gives the shipped bytes."""
    record = json.loads((DEFAULT_CHECKPOINT_DIR / train.RECORD_NAME).read_text())
    root = train.stdlib_dir()
    files = train.corpus_files(root)
    if train.corpus_digest(root, files, train.read_corpus(files)) != record["corpus_sha256"]:
        pytest.skip(f"this interpreter's stdlib is not the training corpus (Python {record['python']})")
    assert train.main(["--out", str(tmp_path), "--tokenizer-only"]) == 0
    assert (tmp_path / "tokenizer.json").read_bytes() == (DEFAULT_CHECKPOINT_DIR / "tokenizer.json").read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


# ------------------------------------------------------------------ synthetic writer


@pytest.mark.parametrize("dtype, tied, max_shard_bytes", [
    ("bfloat16", True, None),
    ("bfloat16", False, 40_000),
    ("float16", False, None),
    ("float32", True, 60_000),
])
def test_synth_checkpoint_loads_in_transformers(tmp_path, dtype, tied, max_shard_bytes):
    config = dict(TINY_SHAPE, tie_word_embeddings=tied)
    synth.write_random_qwen3_checkpoint(tmp_path, config, dtype=dtype,
                                        max_shard_bytes=max_shard_bytes, seed=7)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == dtype and "rope_theta" in written

    tensors = load_checkpoint_tensors(tmp_path)
    assert {t.dtype for t in tensors.values()} == {getattr(torch, dtype)}
    assert ("lm_head.weight" in tensors) is not tied
    index_path = tmp_path / "model.safetensors.index.json"
    if max_shard_bytes is None:
        assert not index_path.exists()
    else:
        index = json.loads(index_path.read_text())
        shard_names = sorted(set(index["weight_map"].values()))
        assert len(shard_names) > 1
        assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shard_names):05d}\.safetensors", n)
                   for n in shard_names)
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    model, info = transformers.Qwen3ForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, local_files_only=True, output_loading_info=True)
    assert_transformers_reads_exactly(model, info, tensors)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits  # (1, 4, V)
    assert logits.shape == (1, 4, TINY_SHAPE["vocab_size"]) and torch.isfinite(logits).all()


def test_synth_weights_have_realistic_scale_and_are_seeded(tmp_path):
    config = dict(TINY_SHAPE, vocab_size=4096, hidden_size=64, head_dim=32)
    synth.write_random_qwen3_checkpoint(tmp_path / "a", config, dtype="float32", seed=1)
    synth.write_random_qwen3_checkpoint(tmp_path / "b", dict(config, num_hidden_layers=1),
                                        dtype="float32", seed=1)
    full = load_checkpoint_tensors(tmp_path / "a")
    shallow = load_checkpoint_tensors(tmp_path / "b")
    # A shallower variant keeps exactly the weights of the layers it has.
    for name, tensor in shallow.items():
        assert torch.equal(tensor, full[name]), name
    projection = full["model.layers.0.mlp.up_proj.weight"]
    assert abs(projection.std().item() - synth.PROJECTION_STD) < 0.002
    norm = full["model.layers.1.input_layernorm.weight"]
    assert (norm - 1).abs().max().item() < 0.2 and norm.std().item() > 0
    row_norms = full["model.embed_tokens.weight"].norm(dim=1)
    assert (row_norms > 4 * row_norms.median()).sum().item() == synth.OUTLIER_ROWS


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        synth.write_random_qwen3_checkpoint(tmp_path, TINY_SHAPE, dtype="int8")
    with pytest.raises(ValueError, match="head_dim"):
        synth.write_random_qwen3_checkpoint(tmp_path, {k: v for k, v in TINY_SHAPE.items() if k != "head_dim"})
