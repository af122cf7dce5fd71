"""`doit verify`: metrics, thresholds, options and the whole ladder on a checkpoint of an
unusual shape (head_dim != hidden/heads, untied head, a custom four-shard layout).

Random checkpoints have flat next-token distributions (few oracle margins >= 0.1), so the
checkpoints here are "peaked": the final RMSNorm gain is scaled up, which spreads the
logits without changing anything else about the graph.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tomllib

from qwen3build.paths import DEFAULTS_FILE
from qwen3build.errors import BuildError
from qwen3build.build.plan import make_plan
from qwen3build.paths import DEFAULT_CHECKPOINT_DIR, HELDOUT_TEXT_PATH
from qwen3build.verify import (KNIFE_EDGE_MARGIN, THRESHOLD_KEYS, VerifyOptions, format_report, judge_rollout,
                               load_thresholds, plan_windows, position_metrics, report_is_current,
                               request_from_vars, run_verify, verify_inputs, verify_key)
from qwen3build.verify.__main__ import main as verify_main
from qwen3build.verify.windows import resolve_window_sizes

from conftest import make_checkpoint

PEAK_FACTOR = 16.0        # final-norm gain multiplier: logits std ~0.16 -> ~2.5
TOKENIZER_VOCAB = 300     # byte-level BPE: 256 bytes + 44 merges, below every tiny vocab
GATED_RECIPES = ("fp16", "lut8", "lut6-4", "default")
SMALL_OPTIONS = dict(windows=(12, 24, "SEQ_LEN"), max_windows=2, rollouts=2, prompt_tokens=6, rollout_tokens=6)


# ---------------------------------------------------------------- helpers (also used by test_verify_broken)

def write_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """A byte-level BPE tokenizer.json made from the held-out text, small enough for tiny vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([HELDOUT_TEXT_PATH.read_text()], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def peak(config_path: Path, factor: float = PEAK_FACTOR) -> None:
    """Scale model.norm.weight in place so the logits spread (random weights are flat)."""
    from safetensors.torch import load_file, save_file
    path = config_path.with_name("model.safetensors")
    tensors = load_file(str(path))
    norm = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = (norm.float() * factor).to(norm.dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


def peaked_checkpoint(directory: Path, shape: str, seed: int, **overrides) -> Path:
    config_path = make_checkpoint(directory, shape, seed=seed, **overrides)
    peak(config_path)
    write_tokenizer(directory)
    return config_path


def settings_for(config_path: Path, root: Path, seq_len: int, shards: str = "preset", kv_write: str = "slice") -> dict:
    art = root / "artifacts"
    return {"CONFIG": str(config_path), "SEQ_LEN": str(seq_len), "SHARDS": shards, "RECIPE": "fp16",
            "KV_WRITE": kv_write, "OUT_DIR": str(art / "coreml" / "packages"), "MIL_DIR": str(art / "coreml" / "mil"),
            "TMP_DIR": str(art / ".tmp"), "CACHE_DIR": str(root / "cache")}


def build_stack(config_path: Path, root: Path, seq_len: int, shards: str = "preset", kv_write: str = "slice"):
    """Build and publish every package with the build's own code (what the doit tasks run), in-process."""
    from qwen3build.build.actions import Builder
    plan = make_plan(settings_for(config_path, root, seq_len, shards, kv_write), environ={})
    builder = Builder(plan)
    builder.weights()
    builder.publish()
    return plan


# ---------------------------------------------------------------- metrics

def test_position_metrics_on_known_logits():
    oracle = np.array([[3.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0],    # clear top-1 (margin 2)
                       [1.0, 0.95, 0.0, -1.0, -2.0, -3.0, -4.0]])  # knife-edge (margin 0.05)
    same = position_metrics(oracle, oracle, np.array([1, -1]))
    np.testing.assert_allclose(same["margin"], [2.0, 0.05])
    assert same["top1"].all() and same["top5"].all()
    np.testing.assert_allclose(same["kl"], 0, atol=1e-12)
    np.testing.assert_allclose(same["cosine"], 1)
    assert np.isnan(same["nll"][1]) and same["nll"][0] > 0

    flipped = oracle[:, [1, 0, 2, 3, 4, 5, 6]]          # top-1 and top-2 swapped
    m = position_metrics(oracle, flipped, np.array([0, 0]))
    assert not m["top1"].any() and m["top5"].all() and (m["kl"] > 0).all()
    buried = oracle[:, ::-1]                              # oracle's top-1 is the rung's last
    assert not position_metrics(oracle, buried, np.array([0, 0]))["top5"].any()
    broken = oracle.copy()
    broken[0, 3] = np.inf                                 # fp16 overflow in a package
    m = position_metrics(oracle, broken, np.array([0, 0]))
    assert not m["top1"][0] and m["kl"][0] == np.inf


def test_greedy_divergence_passes_only_at_a_knife_edge():
    oracle_tokens, margins = [5, 6, 7, 8], [1.0, 0.05, 2.0, 3.0]
    assert judge_rollout(oracle_tokens, margins, [5, 6, 7, 8])["verdict"] == "identical"
    tie = judge_rollout(oracle_tokens, margins, [5, 9])
    assert (tie["verdict"], tie["diverged_at"], tie["matched"]) == ("knife-edge", 1, 1)
    hard = judge_rollout(oracle_tokens, margins, [5, 6, 0])
    assert hard["verdict"] == "hard" and hard["oracle_margin"] == 2.0 >= KNIFE_EDGE_MARGIN


# ---------------------------------------------------------------- windows, thresholds, options

def test_windows_cover_the_text_and_share_prefixes():
    runs, windows = plan_windows(100, [64, 32, 16], max_windows=0)
    for size in (64, 32, 16):
        assert sum(w.size == size for w in windows) == 100 // size  # as many as the text allows
    for w in windows:
        run = runs[w.run]
        assert run.start == w.start and run.length >= w.size      # each window is a run's prefix
    assert sum(r.length for r in runs) == 64 + 2 * 32 + 3 * 16      # shared prefixes cost nothing
    runs, windows = plan_windows(100, [64, 32, 16], max_windows=1)
    assert [(r.start, r.length) for r in runs] == [(0, 64)]


def test_window_sizes_follow_seq_len_and_the_text():
    assert resolve_window_sizes((256, 1024, "SEQ_LEN"), 4096, 10_000) == ([4096, 1024, 256], [])
    sizes, notes = resolve_window_sizes((256, 1024, "SEQ_LEN"), 4096, 700)
    assert sizes == [700, 256] and len(notes) == 2
    with pytest.raises(BuildError, match="exceeds SEQ_LEN=512"):
        resolve_window_sizes((1024,), 512, 10_000)
    with pytest.raises(BuildError, match="too short"):
        resolve_window_sizes((256,), 512, 100)
    with pytest.raises(BuildError, match="too short"):
        resolve_window_sizes(("SEQ_LEN",), 512, 20)


def test_every_recipe_has_thresholds_and_fp16_is_the_tightest():
    with open(DEFAULTS_FILE, "rb") as handle:
        defined = set(tomllib.load(handle).get("recipes", {}))
    tables = {recipe: load_thresholds(recipe) for recipe in sorted(defined | set(GATED_RECIPES))}
    fp16 = tables["fp16"]
    for recipe, table in tables.items():
        assert set(table) == set(THRESHOLD_KEYS), recipe
        for key, value in table.items():
            if key.startswith("min_") and key != "min_qualified":
                assert fp16[key] >= value, (recipe, key)
            elif key.startswith("max_"):
                assert fp16[key] <= value, (recipe, key)


@pytest.mark.parametrize("text, match", [
    ("[verify.fp16]\nmin_top1 = 1.0\n", "missing key"),
    ("[verify.fp16]\nmin_top1 = 1.0\nbogus = 2\n", "unknown key"),
    ('[verify.fp16]\n' + "".join(f"{k} = 1\n" for k in THRESHOLD_KEYS).replace("min_top1 = 1", 'min_top1 = "high"'),
     "must be a finite number"),
    ("RECIPE = 'fp16'\n", r"no \[verify.fp16\] table"),
])
def test_threshold_errors_are_one_line(tmp_path, text, match):
    path = tmp_path / "qwen3build.toml"
    path.write_text(text)
    with pytest.raises(BuildError, match=match) as info:
        load_thresholds("fp16", path)
    assert "\n" not in str(info.value)
    with pytest.raises(BuildError, match=r"no \[verify.int3\] table .*have: \[verify.fp16\]"):
        load_thresholds("int3")


def test_request_from_vars(tmp_path, gqa_checkpoint):
    plan = make_plan({"CONFIG": str(gqa_checkpoint), "SEQ_LEN": "64", "RECIPE": "fp16",
                      "OUT_DIR": str(tmp_path / "a/coreml/packages")},
                     environ={})
    request = request_from_vars(plan, {"WINDOWS": "128,seq_len", "MAX_WINDOWS": "3", "RUNGS": "packages",
                                       "TEXT": str(tmp_path / "t.txt")}, environ={"PACKAGE_POSITIONS": "64"})
    assert request.options.windows == (128, "SEQ_LEN") and request.options.max_windows == 3
    assert request.options.rungs == ("packages",) and request.options.package_positions == 64
    assert request.text_path == tmp_path / "t.txt"
    assert request.report_path == tmp_path / "a" / "verify" / "fp16-t.json"
    assert request_from_vars(plan, {}, environ={}).text_path == HELDOUT_TEXT_PATH
    for variables, match in [({"MAX_WINDOWS": "two"}, "not a whole number"), ({"RUNGS": "oracle"}, "allowed rungs"),
                             ({"BACKEND": "gpu"}, "BACKEND='gpu' is unknown"), ({"WINDOWS": "1"}, ">= 2"),
                             ({"TEXTS": "x"}, "unknown verify variable")]:
        with pytest.raises(BuildError, match=match) as info:
            request_from_vars(plan, variables, environ={})
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the ladder, end to end

@pytest.fixture(scope="module")
def unusual_builds(tmp_path_factory):
    """KV_WRITE mode -> gqa shape (head_dim 32 != hidden 64 / 4 heads) with an untied head,
    four custom shards, built once per mode when first asked."""
    built = {}

    def unusual(kv_write: str):
        if kv_write not in built:
            root = tmp_path_factory.mktemp(f"verify_unusual_{kv_write}")
            config_path = peaked_checkpoint(root / "ckpt", "gqa", seed=21, tie_word_embeddings=False)
            plan = build_stack(config_path, root, seq_len=48, shards="a:0-0,b:1-1,c:2-2,d:3-3", kv_write=kv_write)
            assert not plan.config.tie_word_embeddings and plan.config.q_dim != plan.config.hidden_size
            built[kv_write] = plan
        return built[kv_write]

    return unusual


@pytest.fixture(scope="module")
def unusual_stack(unusual_builds):
    return unusual_builds("slice")


@pytest.fixture(scope="module")
def unusual_report(unusual_stack):
    return run_verify(unusual_stack, None, unusual_stack.tree.artifacts / "verify" / "report.json", SMALL_OPTIONS)


@pytest.mark.parametrize("kv_write", ["slice", "blend"])
def test_ladder_passes_on_an_honest_build(unusual_builds, unusual_report, kv_write):
    unusual_stack = unusual_builds(kv_write)
    assert json.loads((unusual_stack.settings.OUT_DIR / "stack.json").read_text())["kv_write"] == kv_write
    report = unusual_report if kv_write == "slice" else run_verify(
        unusual_stack, None, unusual_stack.tree.artifacts / "verify" / "report.json", SMALL_OPTIONS)
    assert report["passed"], report["failures"]
    assert set(report["rungs"]) == {"reference", "packages"}
    assert [s["name"] for s in report["layout"]] == ["a", "b", "c", "d"]
    for name, rung in report["rungs"].items():
        tf = rung["teacher_forced"]
        assert tf["qualified"] >= load_thresholds("fp16")["min_qualified"], name
        assert tf["max_depth"] == unusual_stack.settings.SEQ_LEN - 1, name  # the whole context, not a prefix
        assert rung["greedy"]["prompts"] == 2 and rung["tokens_per_second"] > 0
        assert set(rung["perplexity"]) == {"12", "24", "48"}
    assert report["rungs"]["packages"]["sampler"].startswith("sampler_model")
    assert report["rungs"]["reference"]["teacher_forced"]["mean_kl"] < 1e-6  # fp32 graph on fp16 constants
    # Both rungs read through the prefill graph (the default PREFILL_LEN 64, fitted to SEQ_LEN
    # 48), and prefill-then-decode agreed with decode alone on the packages.
    assert {rung["prefill_len"] for rung in report["rungs"].values()} == {48}
    parity = report["prefill_parity"]
    assert parity["prompts"] and not parity["failures"]
    assert all(p["length"] % 48 and p["continuation"]["verdict"] != "hard" for p in parity["prompts"])
    assert "prefill parity (PREFILL_LEN 48" in format_report(report)


def test_report_on_disk_and_table(unusual_stack, unusual_report):
    on_disk = json.loads(Path(unusual_report["report_path"]).read_text())
    assert on_disk["key"] == unusual_report["key"] and on_disk["passed"] is True
    table = format_report(unusual_report)
    lines = table.splitlines()
    assert any(line.startswith("oracle") for line in lines)
    assert any(line.startswith("reference") for line in lines) and any(line.startswith("packages") for line in lines)
    assert "PASSED" in table and "PPL 48" in table


def test_verify_key_tracks_packages_text_and_options(unusual_stack, unusual_report, tmp_path):
    plan = unusual_stack
    key = verify_key(plan, None, SMALL_OPTIONS)
    assert key == unusual_report["key"] == verify_key(plan, None, SMALL_OPTIONS)
    inputs = verify_inputs(plan, None, SMALL_OPTIONS)
    assert inputs["packages"] == json.loads((plan.settings.OUT_DIR / "stack.json").read_text())["keys"]
    assert all(inputs["packages"].values())
    text = tmp_path / "other.txt"
    text.write_text(HELDOUT_TEXT_PATH.read_text()[:5000])
    assert verify_key(plan, text, SMALL_OPTIONS) != key
    assert verify_key(plan, None, {**SMALL_OPTIONS, "max_windows": 3}) != key
    request = request_from_vars(plan, {"WINDOWS": "12,24,SEQ_LEN", "MAX_WINDOWS": "2", "ROLLOUTS": "2",
                                       "PROMPT_TOKENS": "6", "ROLLOUT_TOKENS": "6",
                                       "REPORT": unusual_report["report_path"]}, environ={})
    assert report_is_current(plan, request)
    assert not report_is_current(plan, request.__class__(text, request.report_path, request.options))


def test_package_positions_limit_the_package_rung(unusual_stack, tmp_path):
    options = {**SMALL_OPTIONS, "package_positions": 30, "rungs": ("packages",), "rollouts": 0}
    report = run_verify(unusual_stack, None, tmp_path / "r.json", options)
    packages = report["rungs"]["packages"]
    assert packages["steps"] == 30 and packages["budget"] == 30
    assert packages["perplexity"]["48"]["windows"] == 0        # the 48-token run was cut at 30
    assert packages["perplexity"]["24"]["windows"] >= 1          # its 24-token prefix was not
    assert packages["greedy"]["prompts"] == 0
    assert "limited to 30" in format_report(report)


def test_cli_exit_codes_and_one_line_errors(unusual_stack, tmp_path, capsys):
    settings = settings_for(unusual_stack.settings.CONFIG, unusual_stack.tree.artifacts.parent, 48, "a:0-0,b:1-1,c:2-2,d:3-3")
    args = [f"{k}={v}" for k, v in settings.items()]
    small = ["WINDOWS=24", "MAX_WINDOWS=1", "ROLLOUTS=1", "PROMPT_TOKENS=4", "ROLLOUT_TOKENS=4",
             f"REPORT={tmp_path / 'cli.json'}"]
    assert verify_main(args + small) == 0
    assert "PASSED" in capsys.readouterr().out
    wrong_layout = [a for a in args if not a.startswith("SHARDS=")] + ["SHARDS=x:0-1,y:2-3"]
    assert verify_main(wrong_layout + small) == 2
    err = capsys.readouterr().err.strip()
    assert "layout a:0-0,b:1-1,c:2-2,d:3-3" in err and "\n" not in err
    assert verify_main(args + small + ["SEQ_LEN=40"]) == 2
    assert "SEQ_LEN=48" in capsys.readouterr().err
    assert verify_main(args + small + ["PREFILL_LEN=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "built with PREFILL_LEN=48, but PREFILL_LEN=8 now" in err and "\n" not in err
    assert verify_main(args + ["TEXT=/nonexistent/notes.txt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert verify_main(args + ["FOO=1"]) == 2


def test_input_errors_are_one_line(tmp_path, gqa_checkpoint, unusual_stack):
    no_build = make_plan(settings_for(gqa_checkpoint, tmp_path, 48), environ={})
    with pytest.raises(BuildError, match="`doit build`"):
        run_verify(no_build, None, tmp_path / "r.json", SMALL_OPTIONS)
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(BuildError, match="too short"):
        run_verify(unusual_stack, short, tmp_path / "r.json", SMALL_OPTIONS)
    # Packages of another checkpoint than CONFIG are refused.
    other = tmp_path / "other"
    shutil.copytree(unusual_stack.settings.CONFIG.parent, other)
    plan = make_plan({**settings_for(other / "config.json", unusual_stack.tree.artifacts.parent, 48,
                                     "a:0-0,b:1-1,c:2-2,d:3-3")}, environ={})
    with pytest.raises(BuildError, match="packages were built from") as info:
        run_verify(plan, None, tmp_path / "r.json", SMALL_OPTIONS)
    assert "\n" not in str(info.value)
    # A stack whose checkpoint had no tokenizer.json: verify cannot tokenize the text.
    copy = tmp_path / "copy"
    shutil.copytree(unusual_stack.tree.artifacts.parent, copy, symlinks=True)
    plan = make_plan({**settings_for(unusual_stack.settings.CONFIG, copy, 48, "a:0-0,b:1-1,c:2-2,d:3-3")}, environ={})
    stack_path = plan.tree.out_dir / "stack.json"
    stack_path.write_text(stack_path.read_text().replace('"tokenizer": "', '"tokenizer_was": "'))
    with pytest.raises(BuildError, match="no tokenizer.json") as info:
        run_verify(plan, None, tmp_path / "r.json", SMALL_OPTIONS)
    assert "\n" not in str(info.value)


def test_oracle_reads_weights_kept_apart_from_config(tmp_path, unusual_stack):
    """WEIGHTS elsewhere: the oracle builds Qwen3ForCausalLM from config.json and the file's tensors."""
    import torch
    from qwen3build.verify.oracle import Oracle
    apart = tmp_path / "weights"
    apart.mkdir()
    shutil.copy(unusual_stack.settings.CONFIG.with_name("model.safetensors"), apart / "w.safetensors")
    plan = make_plan({"CONFIG": str(unusual_stack.settings.CONFIG), "WEIGHTS": str(apart / "w.safetensors"),
                      "SEQ_LEN": "48", "RECIPE": "fp16"}, environ={})
    tokens = np.arange(10) + 3
    standard, separate = Oracle(unusual_stack), Oracle(plan)
    torch.testing.assert_close(standard.hidden_states(tokens), separate.hidden_states(tokens), rtol=0, atol=0)
    np.testing.assert_array_equal(standard.logits(standard.hidden_states(tokens)),
                                  separate.logits(separate.hidden_states(tokens)))


def test_a_released_oracle_keeps_its_head_and_frees_its_layers(unusual_stack):
    """The ladder frees the oracle's decoder once its runs are computed (GBs at 1.7B)."""
    from qwen3build.verify.oracle import Oracle
    oracle = Oracle(unusual_stack)
    hidden = oracle.hidden_states(np.arange(10) + 3)
    before = oracle.logits(hidden)
    oracle.release_decoder()
    assert len(oracle.model.model.layers) == 0
    np.testing.assert_array_equal(oracle.logits(hidden), before)
    with pytest.raises(AssertionError, match="released"):
        oracle.hidden_states(np.arange(4))


# ---------------------------------------------------------------- the default checkpoint, full size

@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_CHECKPOINT_DIR / "model.safetensors").is_file(), reason="default checkpoint not trained yet")
def test_default_checkpoint_passes_the_fp16_gate(tmp_path):
    """The real gate: assets/qwen3-tiny at SEQ_LEN 4096 on the held-out text, default options
    (minutes: every package step runs the full 4096-slot ring)."""
    plan = build_stack(DEFAULT_CHECKPOINT_DIR / "config.json", tmp_path, seq_len=4096)
    report = run_verify(plan, None, tmp_path / "report.json", VerifyOptions())
    print(format_report(report))
    assert report["passed"], report["failures"]
