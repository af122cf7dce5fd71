"""Batched prefill: the `prefill` function of every shard (and the io_model's prefill twins),
how a prompt is cut into blocks, and that prefill-then-decode equals decode alone, in the
fp32 reference and in the saved packages, for prompt lengths that are not multiples of
PREFILL_LEN (a padded last block), near the context capacity (a decode tail) and with
PREFILL_LEN=0 (decode only). The poisoned prefill is in tests/test_verify_broken.py."""
import json

import numpy as np
import pytest
import torch

from qwen3build.errors import BuildError
from qwen3build.graph import decoder as graph
from qwen3build.graph.tables import mask_ramp, MASK_NEG, rope_table
from qwen3build.lower.torch.ops import TorchOps
from qwen3build.runtime import backends
from qwen3build.runtime.generate import DECODE, PREFILL, generate, prompt_logits, prompt_schedule
from qwen3build.graph.sampler import GREEDY
from qwen3build.settings.settings import MAX_PREFILL_LEN, load_settings
from qwen3build.stack import load_stack
from qwen3build.verify.parity import PARITY_MAX_KL, PARITY_MIN_COSINE, parity_lengths
from qwen3build.verify.metrics import position_metrics

from conftest import DoitWorkspace, make_checkpoint

SEQ_LEN = 32
# 12 does not divide 32: blocks at 0 and 12 fit, one at 24 would not (24 + 12 > 32), so a
# prompt past 24 tokens ends with decode steps; shorter ones end with a padded block.
PREFILL_LEN = 12
PROMPT_LENGTHS = (1, 5, 11, 13, 23, 25, 30, SEQ_LEN)
# The fp32 reference computes prefill and decode with the same values in another order.
REFERENCE_PARITY_ATOL = 1e-4          # logits, absolute (measured: ~2e-6)
# Package bytes the prefill functions may add to the weights (issue: at most 2% overall;
# the tiny shapes here have norms that are a larger share of the weights than at 1.7B).
MAX_WEIGHT_GROWTH = 0.02
GREEDY_TOKENS = 6


# ---------------------------------------------------------------- the schedule

@pytest.mark.parametrize("prefill_len", [0, 1, 5, 12, SEQ_LEN])
def test_prompt_schedule_covers_every_position_and_never_passes_capacity(prefill_len):
    for length in range(1, SEQ_LEN + 1):
        steps = prompt_schedule(length, prefill_len, SEQ_LEN)
        positions = [p for s in steps for p in range(s.position, s.position + s.count)]
        assert positions == list(range(length))
        for step in steps:
            if step.kind == PREFILL:
                assert step.position + prefill_len <= SEQ_LEN  # the padded block fits the ring
                assert 1 <= step.count <= prefill_len
            else:
                assert step.count == 1
        kinds = [s.kind for s in steps]
        assert kinds == sorted(kinds, key=lambda k: k == DECODE)  # blocks first, then a decode tail
        if not prefill_len:
            assert set(kinds) == {DECODE}
        else:  # decode only where no padded block fits any more
            assert all(s.position + prefill_len > SEQ_LEN for s in steps if s.kind == DECODE)
    with pytest.raises(ValueError, match="outside the context capacity"):
        prompt_schedule(SEQ_LEN + 1, prefill_len, SEQ_LEN)


def test_parity_lengths_avoid_multiples_of_the_block():
    assert parity_lengths(64, 4096, 32, 9652) == [97, 1000]
    assert parity_lengths(8, 64, 8, 10_000) == [13, 55]
    for length in parity_lengths(16, 48, 6, 40, budget=30):
        assert length % 16 and length <= 30


# ---------------------------------------------------------------- the graph

@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_block_mask_is_the_causal_mask_from_the_decode_ramp(tokens):
    """block_rows' (S, 1, T) mask: query t (position p+t) sees slots s >= S-1-(p+t)."""
    seq_len, head_dim = 16, 8
    ops = TorchOps()
    tables = {"rope": ops.tensor(rope_table(seq_len, head_dim, 1e6)), "mask_ramp": ops.tensor(mask_ramp(seq_len))}
    for p in range(seq_len - tokens + 1):
        rows = graph.block_rows(ops, tables, torch.tensor([p], dtype=torch.int32), seq_len, head_dim, tokens)
        slots = np.arange(seq_len)[:, None]
        expected = np.where(slots >= seq_len - 1 - (p + np.arange(tokens))[None, :], 0.0, MASK_NEG)
        np.testing.assert_array_equal(rows.mask.numpy()[:, 0, :], expected)
        np.testing.assert_allclose(rows.cos.numpy().T, rope_table(seq_len, head_dim, 1e6)[p:p + tokens, :head_dim])
        assert int(rows.slot[0]) == seq_len - p - tokens and rows.count == tokens


def _reference(tmp_path, shape, kv_write, prefill_len):
    from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files
    from qwen3build.lower.torch.reference import ReferenceStack
    from qwen3build.quant.provider import PackedWeights
    from qwen3build.settings.layout import parse_layout
    from qwen3build.settings.model_config import load_model_config
    config_path = make_checkpoint(tmp_path / shape, shape, seed=3)
    config = load_model_config(config_path)
    checkpoint = Checkpoint(config, *resolve_weight_files(config_path, None, None, ""))
    weights = PackedWeights.dense(checkpoint, config.tie_word_embeddings)
    scales = np.ones((config.num_hidden_layers + 1, 4), np.float32)
    return ReferenceStack(checkpoint, weights, config, parse_layout("preset", config.num_hidden_layers), scales,
                          SEQ_LEN, kv_write, prefill_len)


class _ReferenceBackend:
    """The backend surface prompt_logits feeds, on a ReferenceStack."""

    def __init__(self, reference, use_prefill=True):
        self.reference, self.prefill_len = reference, reference.prefill_len if use_prefill else 0

    def forward(self, token, position, want_logits=True):
        return self.reference.step(token, position)

    def prefill(self, tokens, position, logits="last"):
        out = self.reference.prefill(tokens, position)
        return out if logits == "all" else out[-1]


@pytest.mark.parametrize("kv_write", ["slice", "blend"])
@pytest.mark.parametrize("shape", ["gqa", "untied_mha"])
def test_reference_prefill_then_decode_equals_decode_alone(tmp_path, shape, kv_write):
    reference = _reference(tmp_path, shape, kv_write, PREFILL_LEN)
    ids = np.random.default_rng(5).integers(0, reference.config.vocab_size, SEQ_LEN).tolist()
    for length in PROMPT_LENGTHS:
        reference.reset()
        alone = np.concatenate([out for _, out in prompt_logits(_ReferenceBackend(reference, False), ids[:length],
                                                                SEQ_LEN, every=True)])
        states_alone = [state.clone() for state in reference.states]
        reference.reset()
        blocked = np.concatenate([out for _, out in prompt_logits(_ReferenceBackend(reference), ids[:length],
                                                                  SEQ_LEN, every=True)])
        np.testing.assert_allclose(blocked, alone, atol=REFERENCE_PARITY_ATOL, err_msg=f"{length} tokens")
        for state, expected in zip(reference.states, states_alone):  # the ring rows of the prompt, slot by slot
            np.testing.assert_allclose(state[:, :, SEQ_LEN - length:].numpy(), expected[:, :, SEQ_LEN - length:].numpy(),
                                       atol=REFERENCE_PARITY_ATOL)


def test_reference_refuses_a_block_past_capacity(tmp_path):
    reference = _reference(tmp_path, "gqa", "slice", PREFILL_LEN)
    with pytest.raises(ValueError, match="does not fit the context capacity"):
        reference.prefill([1, 2], SEQ_LEN - PREFILL_LEN + 1)
    with pytest.raises(ValueError, match="1..12 tokens"):
        reference.prefill(list(range(PREFILL_LEN + 1)), 0)
    with pytest.raises(ValueError, match="prefill_len=0"):
        _reference(tmp_path / "none", "gqa", "slice", 0).prefill([1], 0)


# ---------------------------------------------------------------- settings

def test_prefill_len_setting_is_validated_in_one_line():
    assert load_settings({"SEQ_LEN": "4096"}, environ={}).PREFILL_LEN == 64          # qwen3build.toml
    assert load_settings({"SEQ_LEN": "32"}, environ={}).PREFILL_LEN == 32            # the default, fitted
    assert load_settings({"SEQ_LEN": "32", "PREFILL_LEN": "0"}, environ={}).PREFILL_LEN == 0
    assert load_settings({}, environ={"PREFILL_LEN": "8"}).PREFILL_LEN == 8
    for value, match in [("33", "PREFILL_LEN=33 exceeds SEQ_LEN=32"), (True, "not a whole number"),
                         ("8.0", "not a whole number"), (8.0, "not a whole number"), ("-1", "not a whole number"),
                         (str(MAX_PREFILL_LEN + 1), "out of range")]:
        with pytest.raises(BuildError, match=match) as info:
            load_settings({"SEQ_LEN": "32" if value == "33" else "4096", "PREFILL_LEN": value}, environ={})
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the packages

@pytest.fixture(scope="module")
def prefill_ws(tmp_path_factory, gqa_checkpoint):
    ws = DoitWorkspace(tmp_path_factory.mktemp("prefill"), gqa_checkpoint)
    ws.doit("build", PREFILL_LEN=str(PREFILL_LEN))
    return ws


@pytest.fixture(scope="module")
def decode_only_ws(tmp_path_factory, gqa_checkpoint):
    ws = DoitWorkspace(tmp_path_factory.mktemp("decode_only"), gqa_checkpoint)
    ws.doit("build", PREFILL_LEN="0")
    return ws


def _package_functions(path):
    from qwen3build.evaluator.loader import read_spec
    spec = read_spec(path)
    return [f.name for f in spec.description.functions], spec.description.defaultFunctionName


def test_every_shard_holds_decode_and_prefill_and_stack_json_says_so(prefill_ws):
    info = json.loads((prefill_ws.out_dir / "stack.json").read_text())
    assert info["prefill_len"] == PREFILL_LEN
    for shard in info["shards"]:
        assert info["functions"][shard["package"]] == ["decode", "prefill"]
        names, default = _package_functions(prefill_ws.out_dir / shard["package"])
        assert sorted(names) == ["decode", "prefill"] and default == "decode"
    assert info["functions"]["io_model.mlpackage"] == ["embed", "lm_head", "embed_prefill", "lm_head_prefill"]
    names, default = _package_functions(prefill_ws.out_dir / "io_model.mlpackage")
    assert sorted(names) == sorted(info["functions"]["io_model.mlpackage"]) and default == "embed"
    from qwen3build.evaluator import read_interface
    hidden = json.loads(json.dumps(info["model"]))["hidden_size"]
    prefill = read_interface(prefill_ws.out_dir / "decoder_shard_left.mlpackage", "prefill")
    assert prefill.inputs["hidden_states"][0] == (1, hidden, 1, PREFILL_LEN)       # channels-first, sequence last
    assert prefill.states == read_interface(prefill_ws.out_dir / "decoder_shard_left.mlpackage", "decode").states
    assert read_interface(prefill_ws.out_dir / "io_model.mlpackage", "lm_head_prefill").outputs["logits"][0] == (
        1, PREFILL_LEN, info["model"]["vocab_size"])


def test_prefill_functions_store_no_weight_twice(prefill_ws, decode_only_ws):
    from qwen3build.lower.mil.save import blob_references, check_shared_weights
    for name, base, added in [("io_model", ("embed", "lm_head"), ("embed_prefill", "lm_head_prefill")),
                              ("decoder_shard_left", ("decode",), ("prefill",)),
                              ("decoder_shard_right", ("decode",), ("prefill",))]:
        package = prefill_ws.out_dir / f"{name}.mlpackage"
        stored = check_shared_weights(package, base, added)          # every shared name: one blob
        refs = blob_references(package)
        for weight, offset in refs[base[0]].items():                  # what decode reads, prefill reads in place
            if weight in refs[added[-1]]:
                assert refs[added[-1]][weight] == offset, weight
        with_prefill = (package / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        without = (decode_only_ws.out_dir / f"{name}.mlpackage" / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        assert with_prefill <= without * (1 + MAX_WEIGHT_GROWTH), (name, with_prefill, without)
        assert stored["added_bytes"] <= MAX_WEIGHT_GROWTH * stored["blob_bytes"], (name, stored)


@pytest.fixture(scope="module")
def evaluator_backends(prefill_ws):
    stack = load_stack(prefill_ws.out_dir)
    return backends.PackageBackend(stack, "evaluator"), backends.PackageBackend(stack, "evaluator", use_prefill=False)


def test_packages_prefill_then_decode_equals_decode_alone(prefill_ws, evaluator_backends):
    blocked_backend, alone_backend = evaluator_backends
    assert blocked_backend.prefill_len == PREFILL_LEN and alone_backend.prefill_len == 0
    vocab = load_stack(prefill_ws.out_dir).vocab_size
    ids = np.random.default_rng(9).integers(0, vocab, SEQ_LEN).tolist()
    for length in PROMPT_LENGTHS:
        alone_backend.reset()
        alone = np.concatenate([out for _, out in prompt_logits(alone_backend, ids[:length], SEQ_LEN, every=True)])
        blocked_backend.reset()
        steps = list(prompt_logits(blocked_backend, ids[:length], SEQ_LEN, every=True))
        blocked = np.concatenate([out for _, out in steps])
        m = position_metrics(alone, blocked, np.full(length, -1))
        assert m["kl"].max() <= PARITY_MAX_KL and m["cosine"].min() >= PARITY_MIN_COSINE, length
        assert (alone.argmax(axis=1) == blocked.argmax(axis=1)).all(), length
        kinds = {step.kind for step, _ in steps}
        assert kinds == ({PREFILL, DECODE} if length > 24 else {PREFILL}), (length, kinds)
        for state_blocked, state_alone in zip(blocked_backend.states, alone_backend.states):
            rows = slice(SEQ_LEN - length, SEQ_LEN)  # the prompt's ring slots; padding lands in later ones
            np.testing.assert_allclose(state_blocked["kv_cache"][:, :, rows], state_alone["kv_cache"][:, :, rows],
                                       atol=5e-3)


def test_last_logits_of_a_block_are_lm_head_of_its_column(evaluator_backends):
    blocked_backend, _ = evaluator_backends
    blocked_backend.reset()
    every = blocked_backend.prefill([3, 1, 4, 1, 5], 0, logits="all")          # lm_head_prefill
    blocked_backend.reset()
    last = blocked_backend.prefill([3, 1, 4, 1, 5], 0, logits="last")          # lm_head on the column
    assert every.shape[0] == 5 and last.shape == (1, every.shape[1])
    np.testing.assert_allclose(last[0].astype(np.float32), every[-1].astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("length", [5, 25])
def test_greedy_generation_is_the_same_with_and_without_prefill(prefill_ws, evaluator_backends, length):
    blocked_backend, alone_backend = evaluator_backends
    torch_backend = backends.TorchBackend(load_stack(prefill_ws.out_dir))
    assert torch_backend.prefill_len == PREFILL_LEN
    ids = list(range(7, 7 + length))
    runs = {name: generate(backend, ids, GREEDY, GREEDY_TOKENS, (), SEQ_LEN)
            for name, backend in (("blocked", blocked_backend), ("alone", alone_backend), ("torch", torch_backend))}
    assert runs["blocked"].tokens == runs["alone"].tokens == runs["torch"].tokens
    assert runs["blocked"].prefill_calls == len([s for s in prompt_schedule(length, PREFILL_LEN, SEQ_LEN)
                                                 if s.kind == PREFILL]) > 0
    assert runs["alone"].prefill_calls == 0 and runs["alone"].prompt_decode_calls == length


def test_prefill_len_zero_builds_decode_only(decode_only_ws):
    info = json.loads((decode_only_ws.out_dir / "stack.json").read_text())
    assert info["prefill_len"] == 0
    assert all(functions == ["decode"] for name, functions in info["functions"].items() if "shard" in name)
    assert info["functions"]["io_model.mlpackage"] == ["embed", "lm_head"]
    names, default = _package_functions(decode_only_ws.out_dir / "decoder_shard_mid.mlpackage")
    assert names == ["decode"] and default == "decode"
    stack = load_stack(decode_only_ws.out_dir)
    backend = backends.PackageBackend(stack, "evaluator")
    assert backend.prefill_len == 0
    run = generate(backend, [5, 6, 7], GREEDY, 3, (), SEQ_LEN)
    assert run.prefill_calls == 0 and run.prompt_decode_calls == 3 and len(run.tokens) == 3
    with pytest.raises(BuildError, match="no prefill function"):
        backend.prefill([1], 0)
    from qwen3build.audit.run import audit_stack
    audited = audit_stack(stack)
    assert audited["stack"]["prefill"] == {"prefill_len": 0}
    assert all(p["prefill"] is None for p in audited["packages"])
