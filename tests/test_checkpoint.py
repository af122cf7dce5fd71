"""Checkpoint reading: every shape from config.json, lazy validated tensors, digests."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen3build.errors import BuildError
from qwen3build.settings.model_config import load_model_config
from qwen3build.checkpoint.digests import DigestStore
from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files

from conftest import make_checkpoint


def open_checkpoint(config_path):
    config = load_model_config(config_path)
    return Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))


def test_head_dim_is_read_not_derived(tmp_path):
    config = load_model_config(make_checkpoint(tmp_path, "gqa"))
    assert config.head_dim == 32 and config.q_dim == 128 != config.hidden_size


def test_rope_parameters_spelling_of_transformers_5(tmp_path):
    path = make_checkpoint(tmp_path, "gqa")
    raw = json.loads(path.read_text())
    raw.pop("rope_theta", None)
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    path.write_text(json.dumps(raw))
    assert load_model_config(path).rope_theta == 12345.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tensors_read_exactly_in_every_dtype(tmp_path, dtype):
    path = make_checkpoint(tmp_path, "untied_mha", dtype=dtype)
    checkpoint = open_checkpoint(path)
    reference = load_file(str(tmp_path / "model.safetensors"))
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.norm.weight"):
        expected = reference[name].to(torch.float32).numpy()
        np.testing.assert_array_equal(checkpoint.tensor(name), expected)


def test_sharded_checkpoint_with_index(tmp_path):
    path = make_checkpoint(tmp_path, "gqa", max_shard_bytes=60_000)
    files, index = resolve_weight_files(path, None, None, "")
    assert index is not None and len(files) > 1
    checkpoint = Checkpoint(load_model_config(path), files, index)
    assert checkpoint.layer(3, "q_proj").shape == (128, 64)


def test_missing_tensor_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "gqa")
    raw = json.loads(path.read_text())
    raw["num_hidden_layers"] = 5  # the file has 4
    path.write_text(json.dumps(raw))
    with pytest.raises(BuildError, match="missing .*model.layers.4"):
        open_checkpoint(path)


def test_shape_mismatch_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "gqa")
    raw = json.loads(path.read_text())
    raw["intermediate_size"] = 100
    path.write_text(json.dumps(raw))
    with pytest.raises(BuildError, match="mlp.*shape .* config.json implies"):
        open_checkpoint(path)


def test_not_qwen3_is_refused(tmp_path):
    path = make_checkpoint(tmp_path, "gqa")
    raw = json.loads(path.read_text())
    raw["model_type"], raw["architectures"] = "llama", ["LlamaForCausalLM"]
    path.write_text(json.dumps(raw))
    with pytest.raises(BuildError, match="only Qwen3"):
        load_model_config(path)


def test_digests_are_remembered_by_stat_and_rehashed_once_after_touch(tmp_path):
    path = make_checkpoint(tmp_path, "gqa")
    checkpoint = open_checkpoint(path)
    weights = tmp_path / "model.safetensors"
    store = DigestStore(tmp_path / "stat.sqlite3")
    first = store.file_digests(checkpoint, weights)
    assert store.bytes_hashed > 0
    hashed = store.bytes_hashed
    assert store.file_digests(checkpoint, weights) == first and store.bytes_hashed == hashed
    weights.touch()
    import os
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10_000_000))
    assert store.file_digests(checkpoint, weights) == first and store.bytes_hashed == 2 * hashed
    assert store.file_digests(checkpoint, weights) == first and store.bytes_hashed == 2 * hashed


def test_hugging_face_cache_layout_is_accepted(tmp_path):
    """snapshots/<rev>/ holds symlinks into ../../blobs/: the index names files beside it,
    so the links' targets outside the folder are fine (only the names must stay inside)."""
    snapshot = tmp_path / "snapshots" / "rev"
    path = make_checkpoint(snapshot, "gqa", max_shard_bytes=60_000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in snapshot.glob("*.safetensors"):
        blob = blobs / f"sha-{shard.name}"
        shard.rename(blob)
        shard.symlink_to(blob)
    checkpoint = open_checkpoint(path)
    assert checkpoint.layer(3, "q_proj").shape == (128, 64)


def test_headers_are_checked_without_reading_weight_bytes(tmp_path):
    """A NaN is only in the values: opening the checkpoint (what make_plan does) passes,
    and reading the tensor names it."""
    path = make_checkpoint(tmp_path, "gqa", dtype="float32")
    weights = tmp_path / "model.safetensors"
    checkpoint = open_checkpoint(path)
    entry = checkpoint.entries["model.layers.1.self_attn.o_proj.weight"]
    data = bytearray(weights.read_bytes())
    data[entry.begin:entry.begin + 4] = np.array([np.nan], np.float32).tobytes()
    weights.write_bytes(bytes(data))
    checkpoint = open_checkpoint(path)
    with pytest.raises(BuildError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: 1 non-finite"):
        checkpoint.tensor("model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(BuildError, match=r"o_proj\.weight: non-finite"):
        checkpoint.tensor_fp16("model.layers.1.self_attn.o_proj.weight")
