"""A deliberately broken build must fail the gate, and the honest build must pass it.

One honest build of a peaked tiny checkpoint; each broken variant is a copy of it with
shard packages rebuilt in-process by the real lowering (qwen3build.lower.programs +
qwen3build.lower.save) with one piece patched:
- two layers swapped: layers 0 and 1 exchange all their weights (projections and norms);
- the final norm dropped: the exit shard is lowered as if it were an interior shard;
- a KV write off by one, in each KV_WRITE mode: every position's K/V row lands one ring
  slot over (slot S-2-p, the row the mask does not expect). slice: the graph's ring slot
  is shifted (graph.decoder.step_rows); blend: the one-hot write ramp is rolled by one
  (graph.tables.write_ramp), as the seed's test rolled its write table. Only `decode`
  writes that way; prompts and teacher-forced runs go through the honest `prefill`, so
  the prefill parity check (decode alone against prefill) is what catches it;
- a poisoned prefill: each block writes one K row twice, the block's first position's
  row again at the ring slot of the position after it (graph.decoder.decoder_block's
  SliceWrite), so that position's key is lost. `decode` is honest: the parity check and
  the teacher-forced figures (read through prefill) both catch it.
The gate runs with the real [verify.fp16] thresholds from qwen3build.toml; the parity
check with its named constants (qwen3build.verify.parity).
"""
import dataclasses
import json
import shutil

import numpy as np
import pytest

from qwen3build.build.plan import make_plan
from qwen3build.verify import format_report, run_verify
from qwen3build.verify.__main__ import main as verify_main

from test_verify import build_stack, peaked_checkpoint, settings_for

SEQ_LEN = 64
# 12 windows per size: read through prefill they cost little, and the perplexity drift of
# this peaked random model (PPL ~1e9) is noise on fewer (3 windows: 0.35-0.51%, honest).
OPTIONS = dict(windows=(16, 32, "SEQ_LEN"), max_windows=12, rollouts=2, prompt_tokens=8, rollout_tokens=8)
SWAPPED = (0, 1)  # both in the entry shard of the 4-layer preset layout (left:0-1)
# The shifted slice write of the last position (slot -1) is outside the ring and refused:
# the package rung of the off-by-one builds stops one position short of SEQ_LEN.
OFF_BY_ONE_POSITIONS = SEQ_LEN - 1


@pytest.fixture(scope="module")
def honest_builds(tmp_path_factory):
    """KV_WRITE mode -> the honest build of that mode (each built once, when first asked)."""
    built = {}

    def honest(kv_write: str):
        if kv_write not in built:
            root = tmp_path_factory.mktemp(f"verify_honest_{kv_write}")
            config_path = peaked_checkpoint(root / "ckpt", "gqa", seed=11)
            built[kv_write] = build_stack(config_path, root / "build", SEQ_LEN, kv_write=kv_write)
        return built[kv_write]

    return honest


def _swapped_name(name: str, swap: dict) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) in swap:
        parts[2] = str(swap[int(parts[2])])
    return ".".join(parts)


class SwappedCheckpoint:
    """The checkpoint with two layers' tensors exchanged (norms and projections)."""

    def __init__(self, checkpoint, a: int, b: int):
        self.inner, self.config, self.swap = checkpoint, checkpoint.config, {a: b, b: a}

    def tensor_fp16(self, name: str):
        return self.inner.tensor_fp16(_swapped_name(name, self.swap))

    def tensor(self, name: str, dtype=np.float32):
        return self.inner.tensor(_swapped_name(name, self.swap), dtype)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def broken_copy(honest, tmp_path, shards):
    """Copy the honest published tree, then rebuild `shards` as [(spec to lower, tensors)]
    and record the new packages in stack.json (as a build would have)."""
    from qwen3build.build.cache import describe_tree
    from qwen3build.lower.mil import programs, save
    from qwen3build.quant.provider import PackedWeights
    shutil.copytree(honest.tree.artifacts, tmp_path / "artifacts", symlinks=True)
    kv_write = honest.settings.KV_WRITE
    plan = make_plan(settings_for(honest.settings.CONFIG, tmp_path, SEQ_LEN, kv_write=kv_write), environ={})
    scales = np.load(plan.tree.scales_path)
    config = plan.config
    for spec, tensors in shards:
        weights = PackedWeights.dense(tensors, config.tie_word_embeddings)
        program = programs.shard_program(tensors, weights, config, spec, scales, SEQ_LEN, False, kv_write=kv_write,
                                         prefill_len=plan.settings.PREFILL_LEN)
        save.save_package(save.convert(program), plan.tree.package_path(spec.package_name))
    stack_path = plan.tree.out_dir / "stack.json"
    stack = json.loads(stack_path.read_text())
    stack["files"] = {name: describe_tree(plan.tree.out_dir / name) for name in stack["files"]}
    stack_path.write_text(json.dumps(stack))
    return plan


def swap_two_layers(plan):
    entry = plan.layout[0]
    assert all(layer in entry.layers for layer in SWAPPED)
    return [(entry, SwappedCheckpoint(plan.checkpoint, *SWAPPED))]


def drop_final_norm(plan):
    exit_spec = plan.layout[-1]
    return [(dataclasses.replace(exit_spec, is_exit=False), plan.checkpoint)]


def kv_write_off_by_one(plan, monkeypatch):
    from qwen3build.graph import decoder, tables
    if plan.settings.KV_WRITE == "blend":
        honest_ramp = tables.write_ramp
        monkeypatch.setattr(tables, "write_ramp", lambda seq_len: np.roll(honest_ramp(seq_len), -1))
    else:
        honest_rows = decoder.step_rows

        def shifted_rows(ops, table_vars, position, seq_len, head_dim, kv_write):
            rows = honest_rows(ops, table_vars, position, seq_len, head_dim, kv_write)
            rows.slot = ops.index_rsub(seq_len - 2, position)  # honest: seq_len - 1
            return rows

        monkeypatch.setattr(decoder, "step_rows", shifted_rows)
    return [(spec, plan.checkpoint) for spec in plan.layout]


def poison_one_prefill_row(plan, monkeypatch):
    """Every prefill block also writes its first position's K row at the slot of the next
    position (S-p-2), in every layer: one row at the wrong slot. decode is untouched
    (KV_WRITERS keeps the honest SliceWrite); the block write is the patched module global."""
    from qwen3build.graph import decoder
    honest_rows, honest_write = decoder.block_rows, decoder.SliceWrite

    def rows_with_wrong_slot(ops, table_vars, position, seq_len, head_dim, tokens):
        rows = honest_rows(ops, table_vars, position, seq_len, head_dim, tokens)
        rows.wrong_slot = ops.index_rsub(seq_len - 2, position)  # the slot of position p+1
        return rows

    class PoisonedBlockWrite(honest_write):
        def __init__(self, ops, state, rows):
            super().__init__(ops, state, rows)
            self.wrong_slot = rows.wrong_slot

        def layer(self, local, key_rows, value_rows):
            super().layer(local, key_rows, value_rows)
            oldest = self.ops.slice_axis(key_rows, 1, self.count - 1, self.count)  # position p's K row (KVH, 1, D)
            self.kv = self.ops.write_state_row(self.state, self.kv, 2 * local, self.wrong_slot, oldest)
            return self.ops.index_first(self.kv, 2 * local), self.ops.index_first(self.kv, 2 * local + 1)

    monkeypatch.setattr(decoder, "block_rows", rows_with_wrong_slot)
    monkeypatch.setattr(decoder, "SliceWrite", PoisonedBlockWrite)
    return [(spec, plan.checkpoint) for spec in plan.layout]


@pytest.mark.parametrize("kv_write", ["slice", "blend"])
def test_honest_build_passes(honest_builds, tmp_path, kv_write):
    report = run_verify(honest_builds(kv_write), None, tmp_path / "honest.json", OPTIONS)
    assert report["passed"], format_report(report)
    assert report["rungs"]["packages"]["teacher_forced"]["qualified"] >= 100
    assert report["rungs"]["packages"]["prefill_len"] == SEQ_LEN  # the default 64, fitted to SEQ_LEN
    parity = report["prefill_parity"]
    assert parity["prompts"] and not parity["failures"]
    assert all(p["length"] % SEQ_LEN for p in parity["prompts"])


# What each breakage must fail: the teacher-forced gate where prefill is broken too, the
# prefill parity check where only decode is.
EXPECTED_FAILURE = {"swap_two_layers": "packages: teacher-forced top-1 agreement",
                    "drop_final_norm": "packages: teacher-forced top-1 agreement",
                    "kv_write_off_by_one": "prefill parity:",
                    "poisoned_prefill": "prefill parity:"}


@pytest.mark.parametrize("kv_write, breakage", [
    ("slice", "swap_two_layers"), ("slice", "drop_final_norm"),
    ("slice", "kv_write_off_by_one"), ("blend", "kv_write_off_by_one"),
    ("slice", "poisoned_prefill"),
])
def test_broken_build_fails_the_gate(honest_builds, tmp_path, monkeypatch, kv_write, breakage):
    honest = honest_builds(kv_write)

    def shards(plan):
        if breakage == "kv_write_off_by_one":
            return kv_write_off_by_one(plan, monkeypatch)
        if breakage == "poisoned_prefill":
            return poison_one_prefill_row(plan, monkeypatch)
        return {"swap_two_layers": swap_two_layers, "drop_final_norm": drop_final_norm}[breakage](plan)

    plan = broken_copy(honest, tmp_path, shards(honest))
    monkeypatch.undo()  # the reference and the verify run see the honest graph
    options = {**OPTIONS, "rungs": ("packages",)}
    if breakage == "kv_write_off_by_one":
        options["package_positions"] = OFF_BY_ONE_POSITIONS
    report = run_verify(plan, None, tmp_path / "broken.json", options)
    assert not report["passed"], f"{breakage} passed the gate:\n{format_report(report)}"
    expected = EXPECTED_FAILURE[breakage]
    assert any(f.startswith(expected) for f in report["failures"]), report["failures"]
    assert all("\n" not in f for f in report["failures"])
    assert "FAILED" in format_report(report)
    if breakage == "poisoned_prefill":  # prefill is what the teacher-forced runs read, so they see it too
        assert any(f.startswith("packages: teacher-forced") for f in report["failures"]), report["failures"]


def test_cli_exits_non_zero_on_a_broken_build(honest_builds, tmp_path, capsys):
    honest = honest_builds("slice")
    plan = broken_copy(honest, tmp_path, drop_final_norm(honest))
    args = [f"{k}={v}" for k, v in settings_for(plan.settings.CONFIG, tmp_path, SEQ_LEN).items()]
    code = verify_main(args + ["WINDOWS=32", "MAX_WINDOWS=1", "ROLLOUTS=1", "PROMPT_TOKENS=4", "ROLLOUT_TOKENS=4",
                               "RUNGS=packages", f"REPORT={tmp_path / 'cli.json'}"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAILED" in out and "packages: teacher-forced top-1 agreement" in out
