"""A deliberately broken build must fail the gate, and the honest build must pass it.

One honest build of a peaked tiny checkpoint; each broken variant is a copy of it with
shard packages rebuilt in-process by the real lowering (qwen3build.lower.programs +
qwen3build.lower.save) with one piece patched:
- two layers swapped: layers 0 and 1 exchange all their weights (projections and norms);
- the final norm dropped: the exit shard is lowered as if it were an interior shard;
- a KV write off by one: numerics.tables.write_table writes each position one ring slot
  over (the row the mask does not expect).
The gate runs with the real [verify.fp16] thresholds from qwen3build.toml.
"""
import dataclasses
import shutil

import numpy as np
import pytest

from qwen3build.plan import make_plan
from qwen3build.verify import format_report, run_verify
from qwen3build.verify.__main__ import main as verify_main

from test_verify import build_stack, peaked_checkpoint, settings_for

SEQ_LEN = 64
OPTIONS = dict(windows=(16, 32, "SEQ_LEN"), max_windows=3, rollouts=2, prompt_tokens=8, rollout_tokens=8)
SWAPPED = (0, 1)  # both in the entry shard of the 4-layer preset layout (left:0-1)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_honest")
    config_path = peaked_checkpoint(root / "ckpt", "gqa", seed=11)
    return build_stack(config_path, root / "build", SEQ_LEN)


class SwappedCheckpoint:
    """The checkpoint with two layers' tensors exchanged (norms come from checkpoint.layer)."""

    def __init__(self, checkpoint, a: int, b: int):
        self.inner, self.config, self.swap = checkpoint, checkpoint.config, {a: b, b: a}

    def layer(self, layer: int, kind: str):
        return self.inner.layer(self.swap.get(layer, layer), kind)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class SwappedWeights:
    """The weights provider with two layers' projections exchanged."""

    def __init__(self, weights, a: int, b: int):
        self.inner, self.swap = weights, {a: b, b: a}

    def projection_var(self, layer: int, kind: str, name: str):
        return self.inner.projection_var(self.swap.get(layer, layer), kind, name)

    def projection_array(self, layer: int, kind: str):
        return self.inner.projection_array(self.swap.get(layer, layer), kind)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def broken_copy(honest, tmp_path, shards):
    """Copy the honest artifacts, then rebuild `shards` as [(spec to lower, checkpoint, weights)]."""
    from qwen3build.lower import programs, save
    shutil.copytree(honest.artifacts, tmp_path / "artifacts")
    plan = make_plan(settings_for(honest.settings.CONFIG, tmp_path, SEQ_LEN), environ={})
    scales = np.load(plan.scales_path)
    for spec, checkpoint, weights in shards:
        program = programs.shard_program(checkpoint, weights, spec, scales, SEQ_LEN, False)
        save.save_package(save.convert(program), plan.package_path(spec.package_name))
    return plan


def swap_two_layers(plan):
    from qwen3build.tasks import weights_provider
    entry = plan.layout[0]
    assert all(layer in entry.layers for layer in SWAPPED)
    return [(entry, SwappedCheckpoint(plan.checkpoint, *SWAPPED), SwappedWeights(weights_provider(plan), *SWAPPED))]


def drop_final_norm(plan):
    from qwen3build.tasks import weights_provider
    exit_spec = plan.layout[-1]
    return [(dataclasses.replace(exit_spec, is_exit=False), plan.checkpoint, weights_provider(plan))]


def kv_write_off_by_one(plan, monkeypatch):
    from qwen3build.numerics import tables
    from qwen3build.tasks import weights_provider
    honest_table = tables.write_table
    monkeypatch.setattr(tables, "write_table", lambda seq_len: np.roll(honest_table(seq_len), -1, axis=1))
    return [(spec, plan.checkpoint, weights_provider(plan)) for spec in plan.layout]


def test_honest_build_passes(honest, tmp_path):
    report = run_verify(honest, None, tmp_path / "honest.json", OPTIONS)
    assert report["passed"], format_report(report)
    assert report["rungs"]["packages"]["teacher_forced"]["qualified"] >= 100


@pytest.mark.parametrize("breakage", ["swap_two_layers", "drop_final_norm", "kv_write_off_by_one"])
def test_broken_build_fails_the_gate(honest, tmp_path, monkeypatch, breakage):
    def shards(plan):
        if breakage == "kv_write_off_by_one":
            return kv_write_off_by_one(plan, monkeypatch)
        return {"swap_two_layers": swap_two_layers, "drop_final_norm": drop_final_norm}[breakage](plan)

    plan = broken_copy(honest, tmp_path, shards(honest))
    monkeypatch.undo()  # the reference and the verify run see the honest tables
    report = run_verify(plan, None, tmp_path / "broken.json", {**OPTIONS, "rungs": ("packages",)})
    assert not report["passed"], f"{breakage} passed the gate:\n{format_report(report)}"
    assert any(f.startswith("packages: teacher-forced top-1 agreement") for f in report["failures"]), report["failures"]
    assert all("\n" not in f for f in report["failures"])
    assert "FAILED" in format_report(report)


def test_cli_exits_non_zero_on_a_broken_build(honest, tmp_path, capsys):
    plan = broken_copy(honest, tmp_path, drop_final_norm(honest))
    args = [f"{k}={v}" for k, v in settings_for(plan.settings.CONFIG, tmp_path, SEQ_LEN).items()]
    code = verify_main(args + ["WINDOWS=32", "MAX_WINDOWS=1", "ROLLOUTS=1", "PROMPT_TOKENS=4", "ROLLOUT_TOKENS=4",
                               "RUNGS=packages", f"REPORT={tmp_path / 'cli.json'}"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAILED" in out and "packages: teacher-forced top-1 agreement" in out
