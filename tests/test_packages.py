"""The saved packages themselves, loaded back from disk: structure, pitfalls, numerics."""
import json

import numpy as np

from qwen3build.settings.layout import parse_layout
from qwen3build.evaluator import load_function
from qwen3build.lower.mil import programs, save
from qwen3build.quant.provider import PackedWeights
from qwen3build.settings.model_config import load_model_config
from qwen3build.lower.torch.reference import ReferenceStack
from qwen3build.runtime.backends import PackageBackend
from qwen3build.stack import load_stack
from qwen3build.graph.sampler import DEFAULT_WINDOW as WINDOW, GREEDY, recent_window
from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files

# Packages compute in fp16, the reference in fp32 on the same fp16 constants.
PACKAGE_MAX_REL_LOGIT_ERROR = 1e-2
PACKAGE_MIN_LOGIT_COSINE = 0.999
TOKENS = 24


def op_types(package, function_name=None):
    return [op.op_type for op in load_function(package, function_name).function.operations]


def stack_info(ws):
    return json.loads((ws.out_dir / "stack.json").read_text())


def test_each_shard_reads_and_writes_its_state_once(built_stack):
    for shard in stack_info(built_stack)["shards"]:
        types = op_types(built_stack.out_dir / shard["package"])
        assert types.count("read_state") == 1, shard
        assert types.count("coreml_update_state") == 1, shard


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


def test_builds_are_byte_identical(tmp_path, gqa_checkpoint):
    config = load_model_config(gqa_checkpoint)
    checkpoint = Checkpoint(config, *resolve_weight_files(gqa_checkpoint, None, None, ""))
    spec = parse_layout("preset", config.num_hidden_layers)[1]
    scales = np.ones((config.num_hidden_layers + 1, 4), np.float32)
    digests = []
    for attempt in range(2):
        weights = PackedWeights.dense(checkpoint, config.tie_word_embeddings)
        model = save.convert(programs.shard_program(checkpoint, weights, config, spec, scales, 16, False))
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
                               np.load(load_stack(built_stack.out_dir).scales_path), info["seq_len"])
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
