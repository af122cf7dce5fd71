"""FORMATS: Core AI (.aimodel) packages as keyed doit tasks beside the Core ML ones, published in
the same generation, run by `qwen3build run --backend coreai` and measured by verify's coreai rung.

The doit-level checkpoint has every unusual shape at once: head_dim 32 != hidden 64 / 4 heads,
an untied head, a four-shard layout; its logits are peaked so the gate has confident positions
(tests/test_verify.py). Keys are checked in-process: a Core-ML-only change never moves an
aimodel key and a Core-AI-only change never a Core ML one.
"""
from __future__ import annotations

import json
import logging

import pytest
from conftest import DoitWorkspace, make_checkpoint
from test_verify import peaked_checkpoint

from qwen3build.build import declared, keys
from qwen3build.build.actions import Builder
from qwen3build.build.cache import ActionCache
from qwen3build.build.plan import make_plan
from qwen3build.cli import main as cli_main
from qwen3build.lower.coreai import coreai_available
from qwen3build.stack import load_stack

needs_coreai = pytest.mark.skipif(not coreai_available(), reason="the coreai extra is not installed")

BOTH = "coreml,coreai"
SHARDS = "a:0-0,b:1-1,c:2-2,d:3-3"
SETTINGS = {"SEQ_LEN": "32", "PREFILL_LEN": "8", "SHARDS": SHARDS}
# Every position and both rollouts through the Core AI runtime: the tiny shapes are fast there.
VERIFY = {"WINDOWS": "12,24,SEQ_LEN", "MAX_WINDOWS": "2", "ROLLOUTS": "2", "PROMPT_TOKENS": "6",
          "ROLLOUT_TOKENS": "6", "COREAI_POSITIONS": "0", "COREAI_ROLLOUTS": "2"}
CORE_ML = ["io_model", *(f"shard:{name}" for name in "abcd"), "sampler_model"]
CORE_AI = [f"aimodel:{artifact}" for artifact in CORE_ML]
# doit with Core AI hidden: `import coreai` / `import coreai_torch` raise ImportError.
WITHOUT_COREAI = ("-c", ("import runpy, sys; sys.modules['coreai'] = sys.modules['coreai_torch'] = None; "
                         "sys.argv[0] = 'doit'; runpy.run_module('doit', run_name='__main__')"))


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI called in-process configures the "qwen3build" loggers (handler, levels,
    propagation): later tests must find them as they were."""
    loggers = [logging.getLogger(name) for name in ("qwen3build", "qwen3build.cli", "qwen3build.runtime")]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def statuses(ws, ids) -> dict:
    return {artifact: ws.status(artifact) for artifact in ids}


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    """A FORMATS=coreml,coreai build verified through doit (`doit verify` builds first)."""
    root = tmp_path_factory.mktemp("coreai_unusual")
    ws = DoitWorkspace(root / "ws", peaked_checkpoint(root / "ckpt", "gqa", seed=21, tie_word_embeddings=False))
    ws.report_path = root / "report.json"
    ws.verify_stdout = ws.doit("verify", FORMATS=BOTH, REPORT=str(ws.report_path), **SETTINGS, **VERIFY).stdout
    return ws


# ---------------------------------------------------------------- build, stack.json, verify, run

@needs_coreai
def test_three_rungs_pass_on_an_unusual_shape(unusual):
    report = json.loads(unusual.report_path.read_text())
    assert report["passed"], report["failures"]
    assert list(report["rungs"]) == ["reference", "packages", "coreai"]
    model = load_stack(unusual.out_dir).model
    assert not model["tie_word_embeddings"] and model["head_dim"] * model["num_attention_heads"] != model["hidden_size"]
    coreai, packages = report["rungs"]["coreai"], report["rungs"]["packages"]
    assert coreai["backend"].startswith("Core AI runtime") and coreai["prefill_len"] == 8
    assert coreai["steps"] == packages["steps"] and coreai["budget"] is None  # COREAI_POSITIONS=0: every position
    assert coreai["greedy"]["prompts"] == 2 and coreai["tokens_per_second"] > 0
    assert coreai["teacher_forced"]["max_depth"] == 31  # the whole context
    assert any(line.startswith("coreai") for line in unusual.verify_stdout.splitlines())
    assert all(unusual.status(artifact) == "rebuilt" for artifact in CORE_ML + CORE_AI)


@needs_coreai
def test_stack_json_describes_the_coreai_packages_of_its_own_generation(unusual):
    stack = load_stack(unusual.out_dir)  # checks every file it lists, the .aimodel files too
    section = stack.coreai
    assert stack.formats == ("coreml", "coreai")
    assert section["shards"] == [f"../coreai/decoder_shard_{name}.aimodel" for name in "abcd"]
    assert section["functions"][section["io_model"]] == ["embed", "lm_head", "embed_prefill", "lm_head_prefill"]
    assert section["functions"][section["shards"][0]] == ["decode", "prefill"]
    model = stack.model
    for path in section["shards"]:
        assert section["states"][path] == {"kv_cache": {"shape": [2, model["num_key_value_heads"], 32, model["head_dim"]],
                                                        "dtype": "float16"}}
    for path in [section["io_model"], section["sampler"], *section["shards"]]:
        assert path in stack.info["files"]
        published = (stack.models_dir / path).resolve()
        assert published.parent == (unusual.root / "artifacts" / "coreai").resolve()
        assert published.parent.parent == stack.models_dir.parent  # the same generation as the Core ML stack
    assert {"aimodel:shard:a", "shard:a"} <= set(stack.info["keys"])


@needs_coreai
def test_run_backend_coreai_generates_the_evaluators_tokens(unusual, capsys, monkeypatch):
    args = ["run", "--models-dir", str(unusual.out_dir), "--prompt", "def main():", "--max-new-tokens", "6",
            "--stream-mode", "token"]
    outputs = {}
    for backend in ("coreai", "evaluator"):
        assert cli_main([*args, "--backend", backend]) == 0
        outputs[backend] = capsys.readouterr().out
    assert outputs["coreai"] == outputs["evaluator"] and outputs["coreai"]
    monkeypatch.setenv("COREAI_COMPUTE_UNIT", "neural_engine")  # macOS 27's runtime only
    assert cli_main([*args, "--backend", "coreai"]) == 2
    err = capsys.readouterr().err.strip()
    assert "macOS 27" in err and "\n" not in err


@needs_coreai
def test_two_fresh_doit_runs_make_identical_aimodels(unusual, tmp_path):
    """Task-level determinism: another tree, another process, the same keys and bytes."""
    other = DoitWorkspace(tmp_path, unusual.config)
    other.doit("aimodel", FORMATS="coreai", **SETTINGS)
    for artifact in CORE_AI:
        key = unusual.state(artifact)["key"]
        assert other.state(artifact)["key"] == key and other.status(artifact) == "rebuilt", artifact
        mine, theirs = (ActionCache(ws.root / "cache").entry(key) / "out" for ws in (unusual, other))
        files = sorted(p.relative_to(mine) for p in mine.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
        assert all((mine / f).read_bytes() == (theirs / f).read_bytes() for f in files), artifact


@needs_coreai
def test_formats_switch_rebuilds_nothing_and_each_format_keeps_to_itself(unusual, capsys):
    """(Runs last: it republishes the module's tree.)"""
    coreml_only = unusual.doit("build", FORMATS="coreml", **SETTINGS)
    assert "rebuilt" not in coreml_only.stdout and ".aimodel" not in coreml_only.stdout
    stack = load_stack(unusual.out_dir)
    assert stack.formats == ("coreml",) and stack.coreai is None
    assert not any((unusual.root / "artifacts" / "coreai").iterdir())
    # A Core-ML-only setting: the Core ML shards rebuild, the aimodels come from the cache.
    unusual.doit("build", FORMATS=BOTH, PALETTIZE_MASKS="0", **SETTINGS)
    assert statuses(unusual, [f"shard:{n}" for n in "abcd"]) == dict.fromkeys([f"shard:{n}" for n in "abcd"], "rebuilt")
    assert set(statuses(unusual, CORE_AI).values()) == {"restored"}
    back = unusual.doit("build", FORMATS="coreai,coreml", **SETTINGS)  # back to the first: restores only
    assert "rebuilt" not in back.stdout
    # Core AI alone: nothing rebuilt, no Core ML package published, verify measures what is there.
    unusual.doit("build", FORMATS="coreai", **SETTINGS)
    stack = load_stack(unusual.out_dir)
    assert stack.formats == ("coreai",) and all(name.startswith("../coreai/") for name in stack.info["files"])
    assert not list(unusual.out_dir.glob("*.mlpackage"))
    assert cli_main(["run", "--models-dir", str(unusual.out_dir), "--prompt", "x", "--backend", "evaluator"]) == 2
    assert "FORMATS=coreml,coreai" in capsys.readouterr().err
    report_path = unusual.root / "coreai-only.json"
    # 24 positions: short of every SEQ_LEN window, so teacher-forced figures only (a window's
    # perplexity is counted whole or not at all).
    result = unusual.doit("verify", FORMATS="coreai", REPORT=str(report_path), **SETTINGS,
                          **{**VERIFY, "WINDOWS": "SEQ_LEN", "COREAI_POSITIONS": "24", "COREAI_ROLLOUTS": "1"})
    report = json.loads(report_path.read_text())
    assert report["passed"] and list(report["rungs"]) == ["reference", "coreai"]
    coreai = report["rungs"]["coreai"]
    assert coreai["steps"] == coreai["budget"] == 24 and coreai["greedy"]["prompts"] == 1
    assert coreai["perplexity"]["32"]["windows"] == 0 < report["rungs"]["reference"]["perplexity"]["32"]["windows"]
    assert "no packages rung" in result.stdout and "rebuilt" not in result.stdout
    refused = unusual.doit("verify", check=False, FORMATS="coreai", RUNGS="packages", **SETTINGS, **VERIFY)
    assert refused.returncode != 0 and "RUNGS=packages" in refused.stdout + refused.stderr


def test_without_the_extra_a_coreai_build_is_one_line_and_coreml_builds(tmp_path):
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "gqa"))
    refused = ws.doit("build", check=False, launcher=WITHOUT_COREAI, FORMATS=BOTH)
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert refused.returncode != 0 and len(lines) == 1, lines
    assert lines[0].startswith("qwen3build: FORMATS=coreml,coreai needs Apple's Core AI packages") and ".[coreai]" in lines[0]
    assert not (tmp_path / "artifacts" / ".generations").exists()
    ws.doit("build", launcher=WITHOUT_COREAI, FORMATS="coreml")  # everything else works
    assert load_stack(ws.out_dir).formats == ("coreml",)


# ---------------------------------------------------------------- keys (in-process)

def test_each_format_is_keyed_by_its_own_inputs_only(tmp_path, monkeypatch):
    ws = DoitWorkspace(tmp_path, make_checkpoint(tmp_path / "ckpt", "gqa", tie_word_embeddings=False))
    base = {**ws.paths(), "FORMATS": BOTH, "PREFILL_LEN": "8"}
    first = Builder(make_plan(base, environ={}))
    first.weights()
    first.ensure("slanc")  # the shards' declarations read its rows (fp16: no packs)

    def keys_with(**settings) -> dict:
        plan = make_plan({**base, **settings}, environ={})
        declarations = Builder(plan).declarations
        return {artifact: declarations.declare(artifact).key for artifact in plan.package_ids() + plan.aimodel_ids()}

    def moved(after: dict) -> set:
        return {artifact for artifact in before if after[artifact] != before[artifact]}

    before = keys_with()
    core_ml, core_ai = set(first.plan.package_ids()), set(first.plan.aimodel_ids())
    shards = {f"shard:{spec.name}" for spec in first.plan.layout}
    assert moved(keys_with(PALETTIZE_MASKS="0")) == shards  # Core ML only
    assert moved(keys_with(SEQ_LEN="24")) == shards | {f"aimodel:{s}" for s in shards}
    assert moved(keys_with(FORMATS="coreai", COREAI_COMPUTE_UNIT="gpu")) == set()  # select and run; key nothing
    real_digest, real_tools = keys.module_digest, keys.tool_versions
    monkeypatch.setattr(keys, "module_digest", lambda m: real_digest(m) + ("-edited" if m.endswith("lower.coreai.programs") else ""))
    keys.code_digest.cache_clear()
    assert moved(keys_with()) == core_ai  # the coreai lowering's code
    monkeypatch.setattr(keys, "module_digest", lambda m: real_digest(m) + ("-edited" if m.endswith("lower.mil.programs") else ""))
    keys.code_digest.cache_clear()
    assert moved(keys_with()) == core_ml  # the MIL lowering's code
    monkeypatch.setattr(keys, "module_digest", real_digest)
    keys.code_digest.cache_clear()
    for tool, shaped in (("coreai-core", core_ai), ("coreai-torch", core_ai), ("coremltools", core_ml)):
        monkeypatch.setattr(declared, "tool_versions", lambda tools, t=tool: {**real_tools(tools), **({t: "0-other"} if t in tools else {})})
        assert moved(keys_with()) == shaped, tool
