"""The saved packages themselves, loaded back from disk: structure, pitfalls, numerics,
for both KV_WRITE modes."""
import json

import numpy as np
import pytest

from qwen3build.settings.layout import parse_layout
from qwen3build.evaluator import PackageEvaluator, load_function
from qwen3build.graph import decoder as graph
from qwen3build.lower.mil import programs, save
from qwen3build.quant.provider import PackedWeights
from qwen3build.settings.model_config import load_model_config
from qwen3build.lower.torch.reference import ReferenceStack
from qwen3build.runtime.backends import PackageBackend
from qwen3build.stack import load_stack
from qwen3build.graph.sampler import DEFAULT_WINDOW as WINDOW, GREEDY, recent_window
from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files
from qwen3build.graph.slanc import compute_slanc_scales

from conftest import make_checkpoint

# Packages compute in fp16, the reference in fp32 on the same fp16 constants.
PACKAGE_MAX_REL_LOGIT_ERROR = 1e-2
PACKAGE_MIN_LOGIT_COSINE = 0.999
TOKENS = 24
KV_WRITE_MODES = ("slice", "blend")
# Large enough that an S x S table would out-size every weight of the tiny checkpoints.
TABLE_CHECK_SEQ_LEN = 256


def op_types(package, function_name=None):
    return [op.op_type for op in load_function(package, function_name).function.operations]


def stack_info(ws):
    return json.loads((ws.out_dir / "stack.json").read_text())


def test_each_shard_reads_its_state_once_and_writes_one_row_per_write(built_stack):
    """The default build (KV_WRITE=slice): one read; per layer a K and a V row, each a
    slice_update followed by a state update (nothing rewrites the whole state)."""
    assert stack_info(built_stack)["kv_write"] == "slice"
    for shard in stack_info(built_stack)["shards"]:
        layers = shard["last"] - shard["first"] + 1
        types = op_types(built_stack.out_dir / shard["package"])
        assert types.count("read_state") == 1, shard
        assert types.count("slice_update") == types.count("coreml_update_state") == 2 * layers, shard
        assert "stack" not in types and "gather" not in types, shard


def test_prefill_reads_its_state_once_and_writes_one_block_per_layer_and_kind(built_stack):
    """A shard's prefill (the default PREFILL_LEN, fitted to SEQ_LEN 32): one read; per layer
    one slice_update of the K block and one of the V block, each followed by a state update;
    projections are matmuls on the decode's weight constants, no linear, gather or table."""
    info = stack_info(built_stack)
    assert info["prefill_len"] == info["seq_len"] == 32
    for shard in info["shards"]:
        layers = shard["last"] - shard["first"] + 1
        types = op_types(built_stack.out_dir / shard["package"], "prefill")
        assert types.count("read_state") == 1, shard
        assert types.count("slice_update") == types.count("coreml_update_state") == 2 * layers, shard
        assert types.count("reverse") == 2 * layers, shard               # K and V rows, newest first
        assert "linear" not in types and "gather" not in types and "stack" not in types, shard
        assert types.count("rsqrt") == 4 * layers + (1 if shard["role"] in ("exit", "entry+exit") else 0), shard


def build_shards(tmp_path, config_path, seq_len, kv_write, palettize=False, shards="preset"):
    """Every shard of a layout, lowered and saved in-process: {spec: package path}."""
    config = load_model_config(config_path)
    checkpoint = Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))
    scales, _ = compute_slanc_scales(checkpoint, config)
    weights = PackedWeights.dense(checkpoint, config.tie_word_embeddings)
    packages = {}
    for spec in parse_layout(shards, config.num_hidden_layers):
        path = tmp_path / f"{kv_write}_{spec.package_name}.mlpackage"
        program = programs.shard_program(checkpoint, weights, config, spec, scales, seq_len, palettize,
                                         kv_write=kv_write)
        save.save_package(save.convert(program), path)
        packages[spec] = path
    return packages


@pytest.mark.parametrize("kv_write", KV_WRITE_MODES)
def test_no_table_grows_with_seq_len_squared(tmp_path, gqa_checkpoint, kv_write):
    """RoPE (S, 2D), mask ramp (2S,) and, for blend, write ramp (2S,): no S x S table, and
    per-position rows are slices at the position, not gathers."""
    seq_len = TABLE_CHECK_SEQ_LEN
    head_dim = load_model_config(gqa_checkpoint).head_dim
    for spec, path in build_shards(tmp_path, gqa_checkpoint, seq_len, kv_write, palettize=True,
                                   shards="all:0-3").items():
        function = load_function(path).function
        tables = {op.outputs[0].name: tuple(op.outputs[0].shape) for op in function.operations
                  if op.op_type == "const" or op.op_type.startswith("constexpr_")}
        assert max(int(np.prod(shape)) for shape in tables.values()) < seq_len * seq_len, tables
        expected = {"rope_table": (seq_len, 2 * head_dim), "causal_mask_ramp": (2 * seq_len,)}
        if kv_write == "blend":
            expected["kv_write_ramp"] = (2 * seq_len,)
        assert {name: tables.get(name) for name in expected} == expected
        assert "kv_write_ramp" not in tables or kv_write == "blend"
        types = [op.op_type for op in function.operations]
        assert "gather" not in types and types.count("slice_by_size") == len(expected)
        if kv_write == "blend":  # the seed's write: one update of the whole stacked state
            assert types.count("coreml_update_state") == 1 and types.count("stack") == 1
            assert "slice_update" not in types


def test_every_layer_is_computed_and_final_norm_only_in_exit(built_stack):
    for shard in stack_info(built_stack)["shards"]:
        layers = shard["last"] - shard["first"] + 1
        types = op_types(built_stack.out_dir / shard["package"])
        assert types.count("linear") == 7 * layers, shard       # q k v o gate up down
        norms = 4 * layers + (1 if shard["role"] in ("exit", "entry+exit") else 0)
        assert types.count("rsqrt") == norms, shard             # input, q, k, post (+ final)


def test_io_model_has_embed_and_lm_head(built_stack):
    package = built_stack.out_dir / "io_model.mlpackage"
    assert "gather" in op_types(package, "embed")
    assert "linear" in op_types(package, "lm_head")
    assert "gather" in op_types(package, "embed_prefill")
    assert "matmul" in op_types(package, "lm_head_prefill")


@pytest.mark.parametrize("kv_write", KV_WRITE_MODES)
def test_builds_are_byte_identical(tmp_path, gqa_checkpoint, kv_write):
    config = load_model_config(gqa_checkpoint)
    checkpoint = Checkpoint(config, *resolve_weight_files(gqa_checkpoint, None, None, ""))
    spec = parse_layout("preset", config.num_hidden_layers)[1]
    scales = np.ones((config.num_hidden_layers + 1, 4), np.float32)
    digests = []
    for attempt in range(2):
        weights = PackedWeights.dense(checkpoint, config.tie_word_embeddings)
        model = save.convert(programs.shard_program(checkpoint, weights, config, spec, scales, 16, False,
                                                    kv_write=kv_write))
        save.save_package(model, tmp_path / f"s{attempt}.mlpackage")
        digests.append(sorted((p.relative_to(tmp_path / f"s{attempt}.mlpackage").as_posix(), p.read_bytes())
                              for p in (tmp_path / f"s{attempt}.mlpackage").rglob("*") if p.is_file()))
    differing = [a[0] for a, b in zip(*digests) if a != b]
    assert not differing, differing


def test_saved_chain_matches_the_reference(built_stack, gqa_checkpoint):
    info = stack_info(built_stack)
    chain = PackageBackend(load_stack(built_stack.out_dir), "evaluator")  # the chain `run` and verify use
    config = load_model_config(gqa_checkpoint)
    checkpoint = Checkpoint(config, *resolve_weight_files(gqa_checkpoint, None, None, ""))
    reference = ReferenceStack(checkpoint, PackedWeights.dense(checkpoint, config.tie_word_embeddings), config,
                               parse_layout("preset", config.num_hidden_layers),
                               np.load(load_stack(built_stack.out_dir).scales_path), info["seq_len"], info["kv_write"])
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, TOKENS)
    for position, token in enumerate(tokens):
        logits = chain.forward(int(token), position)[0].astype(np.float32)
        expected = reference.step(int(token), position)
        rel = np.abs(logits - expected).max() / np.abs(expected).max()
        cosine = logits @ expected / np.linalg.norm(logits) / np.linalg.norm(expected)
        assert rel < PACKAGE_MAX_REL_LOGIT_ERROR, (position, rel)
        assert cosine > PACKAGE_MIN_LOGIT_COSINE, (position, cosine)
        chosen = chain.choose(logits[None].astype(np.float16), recent_window([], WINDOW), GREEDY, None)
        assert chosen == int(np.argmax(logits.astype(np.float16)))


# Shapes the default checkpoint never uses, in both modes: MHA with an untied head, a
# single KV head over six layers in four shards, GQA with head_dim != hidden / heads.
SHAPE_LAYOUTS = {"untied_mha": "preset", "mqa6": "a:0-0,b:1-3,c:4-4,d:5-5", "gqa": "preset"}
SHAPE_SEQ_LEN = 16


@pytest.mark.parametrize("kv_write", KV_WRITE_MODES)
@pytest.mark.parametrize("shape", sorted(SHAPE_LAYOUTS))
def test_shards_match_the_reference_on_unusual_shapes(tmp_path, shape, kv_write):
    """Shards only (the hidden state after the last shard, and every state after every
    step), against the fp32 reference of the same mode, through the whole ring."""
    import torch
    config_path = make_checkpoint(tmp_path / "ckpt", shape, seed=4)
    config = load_model_config(config_path)
    checkpoint = Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))
    layout = parse_layout(SHAPE_LAYOUTS[shape], config.num_hidden_layers)
    packages = build_shards(tmp_path, config_path, SHAPE_SEQ_LEN, kv_write, shards=SHAPE_LAYOUTS[shape])
    evaluators = [PackageEvaluator(packages[spec]) for spec in layout]
    states = [e.new_state() for e in evaluators]
    reference = ReferenceStack(checkpoint, PackedWeights.dense(checkpoint, config.tie_word_embeddings), config,
                               layout, compute_slanc_scales(checkpoint, config)[0], SHAPE_SEQ_LEN, kv_write)
    rng = np.random.default_rng(1)
    for position in range(SHAPE_SEQ_LEN):
        hidden = (rng.standard_normal((1, 1, config.hidden_size))).astype(np.float16)
        expected = torch.from_numpy(hidden.astype(np.float32))
        pos = torch.tensor([position], dtype=torch.int32)
        for index, (spec, evaluator) in enumerate(zip(layout, evaluators)):
            hidden = evaluator.predict({"hidden_states": hidden, "position": np.array([position], np.int32)},
                                       states[index])["output_hidden_states"]
            with torch.no_grad():
                expected = graph.decoder_shard(reference.ops, expected, pos, reference.states[index],
                                               lambda layer, kind: reference.layer_weights[layer, kind],
                                               reference.tables, spec.layers, spec.is_exit, config, reference.scales,
                                               SHAPE_SEQ_LEN, kv_write, final_norm=reference.final_norm)
            ours, theirs = hidden.astype(np.float32).ravel(), expected.numpy().ravel()
            assert np.abs(ours - theirs).max() / np.abs(theirs).max() < PACKAGE_MAX_REL_LOGIT_ERROR, (spec, position)
            ring = states[index]["kv_cache"].astype(np.float32)
            written = ring[:, :, SHAPE_SEQ_LEN - 1 - position, :]
            np.testing.assert_allclose(written, reference.states[index][:, :, SHAPE_SEQ_LEN - 1 - position, :].numpy(),
                                       rtol=2e-2, atol=2e-2)
            assert not ring[:, :, : SHAPE_SEQ_LEN - 1 - position, :].any(), "a slot ahead of the context was written"
