"""`qwen3build run`: the host loop, its backends, its stops and its errors, on the tiny
built stack (conftest.built_stack: gqa checkpoint, SEQ_LEN 32)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3build.paths import STACK_FILE
from qwen3build.runtime import backends, generate as generation, text
from qwen3build.stack import load_stack
from qwen3build.cli import main
from qwen3build.evaluator import read_interface
from qwen3build.lower.mil import save
from qwen3build.lower.mil.sampler import convert, sampler_program
from qwen3build.graph.sampler import GREEDY, SamplerSettings

REPO = Path(__file__).resolve().parent.parent
PROMPT = "def f(x):"
AGREEMENT_TOKENS = 20
TOKENIZER_VOCAB = 300  # byte-level BPE: 256 bytes + 3 specials + merges; below the gqa vocab of 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The random gqa model (tied embeddings: the logits favour the token just fed) repeats one
# token under plain greedy; this strong a penalty makes it wander over a few tokens.
WANDERING_PENALTY = 20.0


# ------------------------------------------------------------------ fixtures

def _link_stack(source: Path, target: Path) -> Path:
    """A models dir whose packages are symlinks into `source` (stack.json copied, editable),
    beside links to the source generation's numerics/ and quant/ (stack.json's ../ paths)."""
    generation = source.resolve().parent
    target.mkdir(parents=True)
    for folder in ("numerics", "quant"):
        (target.parent / folder).symlink_to(generation / folder)
    for item in source.iterdir():
        if item.name == STACK_FILE:
            (target / item.name).write_text(item.read_text())
        else:
            (target / item.name).symlink_to(item.resolve())
    return target


def _edit_stack(models_dir: Path, edit) -> None:
    path = models_dir / STACK_FILE
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.fixture(scope="module")
def models_dir(built_stack, tmp_path_factory) -> Path:
    """built_stack's OUT_DIR. Until tasks.py builds lower/sampler.py's sampler (issue 5
    wiring), the old greedy-only sampler there is swapped for it in a linked copy."""
    out = built_stack.out_dir
    if "noise" in read_interface(out / "sampler_model.mlpackage").inputs:
        return out
    linked = _link_stack(out, tmp_path_factory.mktemp("run") / "models")
    (linked / "sampler_model.mlpackage").unlink()
    vocab = json.loads((out / STACK_FILE).read_text())["model"]["vocab_size"]
    save.save_package(convert(sampler_program(vocab)), linked / "sampler_model.mlpackage")
    return linked


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A tiny byte-level BPE (the checkpoint fixture has no tokenizer)."""
    import inspect
    import pathlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([inspect.getsource(pathlib)], trainer=trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def stack(models_dir):
    return load_stack(models_dir)


@pytest.fixture(scope="module")
def torch_backend(stack):
    return backends.TorchBackend(stack)


@pytest.fixture(scope="module")
def evaluator_backend(stack):
    return backends.PackageBackend(stack, "evaluator")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer_path):
    return text.TextCodec(tokenizer_path).encode_prompt(PROMPT)


@pytest.fixture
def logs():
    """Messages logged under qwen3build while main() runs (its handler does not propagate)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("qwen3build")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def run_cli(*args):
    """main([...]); argparse's own errors exit through SystemExit: returned as the code."""
    try:
        return main(["run", *args])
    except SystemExit as exit_:
        return exit_.code


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------ backends agree

def generate(backend, prompt_ids, settings=GREEDY, max_new_tokens=AGREEMENT_TOKENS, eos=(), seed=None, seq_len=32):
    return generation.generate(backend, prompt_ids, settings, max_new_tokens, eos, seq_len, seed=seed)


@pytest.mark.parametrize("penalty", [1.0, WANDERING_PENALTY])
def test_greedy_torch_and_evaluator_agree_token_for_token(torch_backend, evaluator_backend, prompt_ids, penalty):
    settings = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=penalty)
    from_torch = generate(torch_backend, prompt_ids, settings).tokens
    from_packages = generate(evaluator_backend, prompt_ids, settings).tokens
    assert len(from_torch) == AGREEMENT_TOKENS
    assert from_torch == from_packages
    if penalty != 1.0:
        assert len(set(from_torch)) > 3  # not a single repeated token: the comparison means something


def test_sampling_with_one_seed_agrees_and_reproduces(torch_backend, evaluator_backend, prompt_ids):
    """Same seed -> same host noise -> same tokens on both backends (the evaluator runs the
    sampler package, torch runs sampling.py); another seed gives another run."""
    settings = SamplerSettings(temperature=0.9, min_p=0.02, repetition_penalty=1.1, coherence=0.5)
    runs = [generate(torch_backend, prompt_ids, settings, seed=5).tokens,
            generate(evaluator_backend, prompt_ids, settings, seed=5).tokens,
            generate(torch_backend, prompt_ids, settings, seed=6).tokens]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="the Core ML runtime exists only on macOS")
def test_greedy_coreml_agrees_with_the_evaluator(stack, evaluator_backend, prompt_ids):
    coreml = backends.PackageBackend(stack, "coreml")
    settings = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=WANDERING_PENALTY)
    assert generate(coreml, prompt_ids, settings).tokens == generate(evaluator_backend, prompt_ids, settings).tokens


# ------------------------------------------------------------------ stops

def test_stops_at_eos_without_printing_it(models_dir, tokenizer_path, torch_backend, prompt_ids, tmp_path,
                                          capsys, logs):
    settings = SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=WANDERING_PENALTY)
    tokens = generate(torch_backend, prompt_ids, settings).tokens
    stop_at = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])
    linked = _link_stack(models_dir, tmp_path / "models")
    _edit_stack(linked, lambda info: info["model"].update(eos_token_ids=[tokens[stop_at]]))
    code = run_cli("--models-dir", str(linked), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT,
                   "--repetition-penalty", str(WANDERING_PENALTY), "--backend", "torch", "--max-new-tokens", "30")
    assert code == 0
    expected = text.TextCodec(tokenizer_path).decode(tokens[:stop_at])
    assert capsys.readouterr().out == expected + "\n"
    assert any("end-of-sequence" in m and f"({stop_at} tokens generated)" in m for m in logs), logs


def test_stops_with_a_message_at_the_context_capacity(models_dir, tokenizer_path, prompt_ids, logs):
    seq_len = load_stack(models_dir).seq_len
    code = run_cli("--models-dir", str(models_dir), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT,
                   "--backend", "torch", "--max-new-tokens", "1000")
    assert code == 0
    # Every position 0..seq_len-1 is fed once; the token chosen after the last one is kept.
    generated = seq_len - len(prompt_ids) + 1
    assert any(f"context capacity of {seq_len} tokens" in m and f"({generated} tokens generated)" in m
               for m in logs), logs


def test_generate_reports_the_stop_reason(torch_backend, prompt_ids):
    assert generate(torch_backend, prompt_ids, max_new_tokens=3).stop_reason == "max_new_tokens"
    assert generate(torch_backend, prompt_ids, max_new_tokens=100).stop_reason == "context"
    first = generate(torch_backend, prompt_ids, max_new_tokens=1).tokens[0]
    eos_run = generate(torch_backend, prompt_ids, eos=(first,))
    assert (eos_run.stop_reason, eos_run.tokens) == ("eos", [])


# ------------------------------------------------------------------ the console script

def test_console_script_streams_text_and_reports_stats(models_dir, tokenizer_path, prompt_ids):
    """As a user runs it: a subprocess; text on stdout, backend and stats on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "qwen3build.cli", "run", "--models-dir", str(models_dir), "--tokenizer",
         str(tokenizer_path), "--prompt", PROMPT, "--max-new-tokens", "6", "--backend", "evaluator", "--stats",
         "--prefill-progress", "--stream-mode", "token"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = generate(backends.PackageBackend(load_stack(models_dir), "evaluator"), prompt_ids,
                        max_new_tokens=6).tokens
    assert result.stdout == text.TextCodec(tokenizer_path).decode(expected) + "\n"
    err = result.stderr
    assert "backend: evaluator" in err
    assert f"prefill {len(prompt_ids)}/{len(prompt_ids)} tokens" in err
    assert "stats: backend=evaluator" in err and f"prompt_tokens={len(prompt_ids)}" in err
    assert "generated_tokens=6" in err and "stop=max_new_tokens" in err
    for field in ("time_to_first_token=", "prefill=", "decode=", "stats: prompt read in 1 prefill call(s)"):
        assert field in err, err
    assert err.count("tokens/s") == 2


@pytest.mark.parametrize("backend", ["evaluator", "torch"])
def test_prompt_file_and_no_prefill_give_the_same_text(models_dir, tokenizer_path, tmp_path, logs, capsys, backend):
    """--prompt-file reads the prompt; --no-prefill reads it one token per call (decode) and
    must write the same text; --stats says how the prompt was read."""
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT * 3)
    prefill_len = load_stack(models_dir).prefill_len
    assert prefill_len > 0
    texts = {}
    for flags in ([], ["--no-prefill"]):
        logs.clear()
        assert run_cli("--models-dir", str(models_dir), "--tokenizer", str(tokenizer_path), "--prompt-file",
                       str(prompt_file), "--max-new-tokens", "5", "--backend", backend, "--stats", *flags) == 0
        texts[bool(flags)] = capsys.readouterr().out
        calls = next(m for m in logs if m.startswith("stats: prompt read in"))
        started = next(m for m in logs if m.startswith("backend:"))
        if flags:
            assert calls.startswith("stats: prompt read in 0 prefill call(s)") and "one token per call" in started
        else:
            assert f"of {prefill_len} tokens and 0 decode call(s)" in calls and "prefill blocks of" in started
    assert texts[True] == texts[False] and texts[True].strip()
    ids = text.TextCodec(tokenizer_path).encode_prompt(PROMPT * 3)
    assert generation.prompt_schedule(len(ids), prefill_len, 32)[0].kind == generation.PREFILL


@pytest.mark.parametrize("make, words", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_text(""), p)[1], "is empty"),
    (lambda p: (p.write_bytes(b"\xff\xfe\xfa"), p)[1], "cannot read as UTF-8"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
])
def test_bad_prompt_file_is_a_one_line_error(models_dir, tokenizer_path, tmp_path, capsys, make, words):
    path = make(tmp_path / "prompt.txt")
    assert run_cli("--models-dir", str(models_dir), "--tokenizer", str(tokenizer_path), "--prompt-file", str(path),
                   "--backend", "torch") == 2
    assert words in error_line(capsys)


def test_prompt_and_prompt_file_together_are_refused(models_dir, tmp_path, capsys):
    assert run_cli("--models-dir", str(models_dir), "--prompt", "x", "--prompt-file", str(tmp_path / "p")) == 2
    assert "not allowed with argument" in error_line(capsys)


# ------------------------------------------------------------------ user errors: one line, exit 2

def test_missing_models_dir_says_to_build_first(tmp_path, capsys):
    assert run_cli("--models-dir", str(tmp_path / "nowhere"), "--prompt", "x") == 2
    assert "./dev build" in error_line(capsys)


@pytest.mark.parametrize("args, words", [
    (["--temperature", "0.5"], "--temperature only apply with --decode-mode sample"),
    (["--decode-mode", "sample", "--temperature", "0"], "must be above 0"),
    (["--decode-mode", "sample", "--min-p", "1.5"], "--min-p=1.5"),
    (["--decode-mode", "sample", "--coherence", "-1"], "--coherence=-1.0"),
    (["--repetition-penalty", "0"], "--repetition-penalty=0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--decode-mode", "sample", "--seed", "-3"], "--seed=-3"),
    (["--max-new-tokens", "many"], "invalid int value"),
    (["--backend", "gpu"], "invalid choice"),
    (["--stream-mode", "char"], "invalid choice"),
])
def test_bad_option_values_are_one_line_errors(models_dir, tokenizer_path, capsys, args, words):
    code = run_cli("--models-dir", str(models_dir), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT,
                   "--backend", "torch", *args)  # a later --backend overrides
    assert code == 2
    assert words in error_line(capsys)


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML is available on macOS")
def test_coreml_backend_off_macos_is_a_clear_error(models_dir, tokenizer_path, capsys):
    assert run_cli("--models-dir", str(models_dir), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT,
                   "--backend", "coreml") == 2
    assert "needs macOS" in error_line(capsys)


def test_prompt_beyond_the_context_capacity(models_dir, tokenizer_path, capsys):
    assert run_cli("--models-dir", str(models_dir), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT * 20,
                   "--backend", "torch") == 2
    assert "context capacity is 32" in error_line(capsys)


def test_stack_without_tokenizer_asks_for_one(models_dir, capsys):
    assert json.loads((models_dir / STACK_FILE).read_text())["tokenizer"] is None
    assert run_cli("--models-dir", str(models_dir), "--prompt", PROMPT, "--backend", "torch") == 2
    assert "--tokenizer" in error_line(capsys)


def test_sampler_from_an_older_build_is_refused(models_dir, tokenizer_path, tmp_path, capsys):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    vocab = load_stack(models_dir).vocab_size

    @mb.program(input_specs=[mb.TensorSpec((1, vocab), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def greedy_only(logits):
        return mb.reduce_argmax(x=logits, axis=-1, keep_dims=False, name="token")

    linked = _link_stack(models_dir, tmp_path / "models")
    (linked / "sampler_model.mlpackage").unlink()
    save.save_package(save.convert(greedy_only), linked / "sampler_model.mlpackage")
    capsys.readouterr()  # coremltools' progress bars
    assert run_cli("--models-dir", str(linked), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT,
                   "--backend", "evaluator") == 2
    assert "stack.json records" in error_line(capsys)  # a package swapped after the build is refused
    from qwen3build.build.cache import describe_tree
    _edit_stack(linked, lambda info: info["files"].update(
        {"sampler_model.mlpackage": describe_tree(linked / "sampler_model.mlpackage")}))
    assert run_cli("--models-dir", str(linked), "--tokenizer", str(tokenizer_path), "--prompt", PROMPT,
                   "--backend", "evaluator") == 2
    assert "older build" in error_line(capsys)


# ------------------------------------------------------------------ text in and out

def test_chat_template_is_applied_when_the_tokenizer_has_one(tokenizer_path, tmp_path):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_text(tokenizer_path.read_text())
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    codec = text.TextCodec(directory / "tokenizer.json")
    ids = codec.encode_prompt("hi")
    assert ids.count(SPECIAL_TOKENS.index("<|im_start|>")) == 2 and ids.count(SPECIAL_TOKENS.index("<|im_end|>")) == 1
    assert codec.tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert codec.encode_prompt("hi", use_chat_template=False) == text.TextCodec(tokenizer_path).encode_prompt("hi")


class _Chars:
    """A stand-in codec: token i is the character chr(i)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("mode, pieces", [("token", ["a", "b", " ", "c", "d", "\n"]),
                                          ("word", ["", "", "ab ", "", "", "cd\n"])])
def test_stream_modes(mode, pieces):
    import io

    out = io.StringIO()
    stream = text.TextStream(_Chars(), mode, out)
    seen = []
    for char in "ab cd":
        stream(ord(char))
        seen.append(out.getvalue())
    assert stream.finish() == "ab cd"
    seen.append(out.getvalue())
    assert [b[len(a):] for a, b in zip([""] + seen, seen)] == pieces
