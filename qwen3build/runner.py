"""The host loop of `qwen3build run`: prompt -> tokens -> text, on one of three backends.

Per token (batch 1, one position per call, as the shards are built):

    embed (io_model "embed") -> shards in stack.json order (each with its KV state)
      -> logits (io_model "lm_head") -> next token (sampler_model)

Backends:
- "coreml": the saved packages on Apple's Core ML runtime (macOS only); compute units
  as in DESIGN section 1 (shards CPU+ANE, io_model and sampler CPU+GPU).
- "evaluator": the same saved packages run by qwen3build.evaluator's numpy interpreter
  (any OS): what `verify` uses, so it checks the bytes the build emitted. Slow.
- "torch": ReferenceStack, the re-authored graph in fp32 torch, built from the checkpoint
  and SLaNC scales recorded in stack.json, with sampling by qwen3build.sampling (the
  numpy twin of the sampler package). Fast on Linux; it does not run the packages.
- "auto": "coreml" on macOS, "evaluator" elsewhere (the packages, wherever possible).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable

import numpy as np

from . import sampling
from .config import DEFAULTS_FILE
from .errors import BuildError
from .sampling import SamplerSettings

log = logging.getLogger(__name__)

BACKENDS = ("auto", "coreml", "evaluator", "torch")
STACK_FILE = "stack.json"
# Compute units per package kind on Core ML (DESIGN section 1).
COREML_COMPUTE_UNITS = {"io_model": "CPU_AND_GPU", "shard": "CPU_AND_NE", "sampler": "CPU_AND_GPU"}
STOP_REASONS = ("eos", "max_new_tokens", "context")
# torch intra-op threads for the torch backend. One, as the evaluator's BLAS: on the 2
# shared cores here, 2 threads ran the tiny stack 10-30x slower than 1 (measured: 70-220
# vs 7 ms per token with other processes busy).
TORCH_THREADS = 1


def default_models_dir() -> Path:
    """OUT_DIR of the default build (qwen3build.toml), relative to the repo."""
    with open(DEFAULTS_FILE, "rb") as handle:
        out_dir = tomllib.load(handle).get("OUT_DIR") or "artifacts/coreml/packages"
    return (DEFAULTS_FILE.parent / out_dir).resolve()


# ------------------------------------------------------------------ stack.json

@dataclasses.dataclass(frozen=True)
class Stack:
    """A built deployment, as OUT_DIR/stack.json describes it."""

    models_dir: Path
    info: dict

    @property
    def seq_len(self) -> int:
        return int(self.info["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.info["model"]["vocab_size"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(int(t) for t in self.info["model"].get("eos_token_ids") or ())

    @property
    def tokenizer(self) -> Path | None:
        return Path(self.info["tokenizer"]) if self.info.get("tokenizer") else None

    def package(self, relative: str) -> Path:
        path = self.models_dir / relative
        if not path.is_dir():
            raise BuildError(f"{path} is missing: the build in {self.models_dir} is incomplete; run `./dev build` again")
        return path

    @property
    def io_model(self) -> Path:
        return self.package(self.info["io_model"])

    @property
    def sampler(self) -> Path:
        return self.package(self.info["sampler"])

    @property
    def shard_packages(self) -> list[Path]:
        return [self.package(shard["package"]) for shard in self.info["shards"]]

    @property
    def layout_text(self) -> str:
        """The SHARDS setting that reproduces this stack's layout."""
        return ",".join(f"{s['name']}:{s['first']}-{s['last']}" for s in self.info["shards"])


def load_stack(models_dir: Path) -> Stack:
    models_dir = Path(models_dir)
    path = models_dir / STACK_FILE
    if not path.is_file():
        what = "does not exist" if not models_dir.exists() else f"has no {STACK_FILE}"
        raise BuildError(f"models dir {models_dir} {what}: run `./dev build` first, "
                         f"or point --models-dir at a build's OUT_DIR")
    try:
        info = json.loads(path.read_text())
        for key in ("seq_len", "model", "io_model", "sampler", "shards"):
            info[key]
        info["model"]["vocab_size"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"{path} is not a qwen3build stack description ({exc!r}); rebuild with `./dev build`") from None
    return Stack(models_dir.resolve(), info)


# ------------------------------------------------------------------ backends

class PackageBackend:
    """The saved packages, run by Core ML ("coreml") or by the numpy evaluator ("evaluator")."""

    def __init__(self, stack: Stack, runtime_backend: str):
        from .runtime import open_package

        self.name = runtime_backend
        self.description = {"coreml": "Core ML runtime, saved packages",
                            "evaluator": "numpy package evaluator, saved packages"}[runtime_backend]

        def opened(path, function, kind):
            return open_package(path, function, backend=runtime_backend, compute_units=COREML_COMPUTE_UNITS[kind])

        self.embed = opened(stack.io_model, "embed", "io_model")
        self.head = opened(stack.io_model, "lm_head", "io_model")
        self.shards = [opened(path, None, "shard") for path in stack.shard_packages]
        self.sampler = opened(stack.sampler, None, "sampler")
        missing = [name for name in ("logits", "recent_tokens", "noise", *SamplerSettings().inputs())
                   if name not in self.sampler.inputs]
        if missing:
            raise BuildError(f"{stack.sampler.name} has inputs {sorted(self.sampler.inputs)}, not the sampler this run "
                             f"needs (missing {', '.join(missing)}): it comes from an older build; run `./dev build` again")
        self.window = self.sampler.inputs["recent_tokens"][0][1]
        self._zero_noise = np.zeros((1, stack.vocab_size), np.float32)
        self.reset()

    def reset(self) -> None:
        self.states = [shard.new_state() for shard in self.shards]

    def forward(self, token: int, position: int, want_logits: bool = True) -> np.ndarray | None:
        hidden = self.embed.predict({"input_ids": np.array([[token]], np.int32)})["hidden_states"]  # (1, 1, H)
        feed_position = np.array([position], np.int32)
        for shard, state in zip(self.shards, self.states):
            hidden = shard.predict({"hidden_states": hidden, "position": feed_position}, state)["output_hidden_states"]
        if not want_logits:
            return None
        return self.head.predict({"hidden_states": hidden})["logits"]  # (1, V) fp16

    def choose(self, logits: np.ndarray, window_ids: np.ndarray, settings: SamplerSettings,
               noise: np.ndarray | None) -> int:
        inputs = {"logits": logits, "recent_tokens": window_ids,
                  "noise": self._zero_noise if noise is None else noise, **settings.inputs()}
        return int(self.sampler.predict(inputs)["token"][0])


class TorchBackend:
    """ReferenceStack (fp32 torch) on the checkpoint and scales the stack was built from."""

    name = "torch"
    description = "fp32 torch ReferenceStack, sampling by qwen3build.sampling"

    def __init__(self, stack: Stack, threads: int = TORCH_THREADS):
        import torch

        from .plan import make_plan
        from .reference import ReferenceStack
        from .tasks import weights_provider

        info = stack.info
        checkpoint_config = Path(info.get("checkpoint") or "") / "config.json"
        if not checkpoint_config.is_file():
            raise BuildError(f"the torch backend needs the checkpoint the stack was built from; "
                             f"{checkpoint_config} is missing (stack.json 'checkpoint')")
        scales_path = Path(info.get("scales") or "")
        if not scales_path.is_file():
            raise BuildError(f"the torch backend needs the SLaNC scales the stack was built with; "
                             f"{scales_path} is missing (stack.json 'scales'); run `./dev build` again")
        # The build's own settings when stack.json records them (RECIPE_FILE, LUT_DIR, ...:
        # what weights_provider needs for a quantized recipe); these always win.
        overrides = {key: str(value) for key, value in (info.get("settings") or {}).items() if value not in (None, "")}
        overrides.update({"CONFIG": str(checkpoint_config), "SEQ_LEN": str(stack.seq_len), "SHARDS": stack.layout_text,
                          "RECIPE": info.get("recipe", "fp16"), "OUT_DIR": str(stack.models_dir)})
        plan = make_plan(overrides, environ={})
        self.reference = ReferenceStack(plan.checkpoint, weights_provider(plan), plan.layout,
                                        np.load(scales_path), stack.seq_len)
        self.window = _package_window(stack)
        torch.set_num_threads(threads)  # process-wide: `run` is the whole process
        log.debug("torch backend: %d thread(s)", threads)

    def reset(self) -> None:
        self.reference.reset()

    def forward(self, token: int, position: int, want_logits: bool = True) -> np.ndarray | None:
        return self.reference.step(token, position)  # (V,) float32; the head is cheap next to the layers

    def choose(self, logits: np.ndarray, window_ids: np.ndarray, settings: SamplerSettings,
               noise: np.ndarray | None) -> int:
        return sampling.sample(logits, window_ids, settings, noise).token


def _package_window(stack: Stack) -> int:
    """The built sampler's repetition window, so that torch penalizes the same tokens."""
    from .evaluator import read_interface

    try:
        inputs = read_interface(stack.sampler).inputs
    except BuildError:
        inputs = {}
    if "recent_tokens" in inputs:
        return inputs["recent_tokens"][0][1]
    log.info("no sampler package with a recent_tokens input in %s: repetition window %d (the default)",
             stack.models_dir, sampling.DEFAULT_WINDOW)
    return sampling.DEFAULT_WINDOW


def resolve_backend(requested: str) -> str:
    if requested not in BACKENDS:
        raise BuildError(f"--backend {requested!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if requested == "auto":
        return "coreml" if sys.platform == "darwin" else "evaluator"
    if requested == "coreml" and sys.platform != "darwin":
        raise BuildError(f"--backend coreml needs macOS's Core ML runtime (this is {sys.platform}); "
                         f"use --backend evaluator (the packages, in numpy) or --backend torch (fast reference)")
    return requested


def open_backend(stack: Stack, requested: str):
    backend = resolve_backend(requested)
    if backend == "torch":
        return TorchBackend(stack)
    return PackageBackend(stack, backend)


# ------------------------------------------------------------------ the loop

@dataclasses.dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    stop_reason: str                 # one of STOP_REASONS
    prefill_seconds: float           # prompt forwards
    time_to_first_token: float       # start of prefill -> first token chosen
    decode_seconds: float            # first token chosen -> last token chosen
    decode_steps: int                # tokens chosen after the first

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else float("nan")


def generate(backend, prompt_ids: list[int], settings: SamplerSettings, max_new_tokens: int,
             eos_token_ids: tuple[int, ...], seq_len: int, seed: int | None = None,
             on_token: Callable[[int], None] | None = None,
             on_prefill: Callable[[int, int], None] | None = None) -> Generation:
    """Prefill `prompt_ids` one position at a time, then choose tokens until EOS, the
    token budget or the context capacity. EOS is not part of the returned tokens."""
    if not prompt_ids:
        raise BuildError("the prompt encodes to no tokens; give a non-empty --prompt")
    if len(prompt_ids) > seq_len:
        raise BuildError(f"the prompt is {len(prompt_ids)} tokens but the stack's context capacity is {seq_len} "
                         f"(SEQ_LEN); shorten the prompt or rebuild with `./dev build SEQ_LEN=<more>`")
    if max_new_tokens < 1:
        raise BuildError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    rng = np.random.default_rng(seed)
    vocab_size = None
    backend.reset()
    started = time.perf_counter()
    logits = None
    for position, token in enumerate(prompt_ids):
        logits = backend.forward(int(token), position, want_logits=position == len(prompt_ids) - 1)
        if on_prefill:
            on_prefill(position + 1, len(prompt_ids))
    prefill_seconds = time.perf_counter() - started
    history = list(prompt_ids)
    generated: list[int] = []
    position = len(prompt_ids)
    chosen_times = []
    while True:
        vocab_size = vocab_size or np.asarray(logits).size
        noise = None if settings.greedy else sampling.uniform_noise(rng, vocab_size)
        token = backend.choose(logits, sampling.recent_window(history, backend.window), settings, noise)
        chosen_times.append(time.perf_counter())
        if token in eos_token_ids:
            stop = "eos"
            break
        generated.append(token)
        history.append(token)
        if on_token:
            on_token(token)
        if len(generated) >= max_new_tokens:
            stop = "max_new_tokens"
            break
        if position >= seq_len:  # the token just chosen has no KV row left to go to
            stop = "context"
            break
        logits = backend.forward(token, position)
        position += 1
    return Generation(prompt_tokens=len(prompt_ids), tokens=generated, stop_reason=stop,
                      prefill_seconds=prefill_seconds, time_to_first_token=chosen_times[0] - started,
                      decode_seconds=chosen_times[-1] - chosen_times[0], decode_steps=len(chosen_times) - 1)


# ------------------------------------------------------------------ text in, text out

class TextCodec:
    """tokenizer.json (+ tokenizer_config.json's chat template, when there is one)."""

    def __init__(self, tokenizer_path: Path):
        from tokenizers import Tokenizer

        tokenizer_path = Path(tokenizer_path)
        if tokenizer_path.is_dir():
            tokenizer_path = tokenizer_path / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise BuildError(f"tokenizer {tokenizer_path} does not exist; pass --tokenizer path/to/tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise BuildError(f"tokenizer {tokenizer_path} cannot be read ({exc})") from None
        self.path = tokenizer_path
        config_path = tokenizer_path.with_name("tokenizer_config.json")
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = self._find_chat_template(tokenizer_path)

    def _find_chat_template(self, tokenizer_path: Path) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {item.get("name"): item.get("template") for item in template}
            template = named.get("default")
        jinja_file = tokenizer_path.with_name("chat_template.jinja")  # transformers >= 4.43 writes it apart
        if not template and jinja_file.is_file():
            template = jinja_file.read_text()
        return template or None

    def _special(self, key: str) -> str:
        value = self.config.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    def render_chat(self, prompt: str) -> str:
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise BuildError("the tokenizer has a chat template but jinja2 is not installed: install jinja2, "
                             "or pass --no-chat-template to send the prompt as is") from None

        def raise_exception(message):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
        environment.globals["raise_exception"] = raise_exception
        try:
            return environment.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))
        except TemplateError as exc:
            raise BuildError(f"the chat template of {self.path} failed to render: {exc}") from None

    def encode_prompt(self, prompt: str, use_chat_template: bool = True) -> list[int]:
        if self.chat_template and use_chat_template:
            # The template writes the special tokens itself (transformers: add_special_tokens=False).
            return self.tokenizer.encode(self.render_chat(prompt), add_special_tokens=False).ids
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Writes generated text as it comes: per token, or per whole word (up to whitespace).

    The text is re-decoded from all generated ids each time (BPE merges and multi-byte
    characters can span tokens); a trailing U+FFFD means an incomplete UTF-8 sequence
    and is held back until the next token completes it.
    """

    def __init__(self, codec: TextCodec, mode: str, out=None):
        if mode not in ("word", "token"):
            raise BuildError(f"--stream-mode {mode!r} is unknown; allowed: word, token")
        self.codec, self.mode = codec, mode
        self.out = out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.written = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        pending = text[self.written:]
        if self.mode == "word":
            cut = max(pending.rfind(c) for c in (" ", "\n", "\t"))
            pending = pending[:cut + 1] if cut >= 0 else ""
        self._write(pending)

    def finish(self) -> str:
        text = self.codec.decode(self.ids)
        self._write(text[self.written:])
        self.out.write("\n")
        self.out.flush()
        return text

    def _write(self, piece: str) -> None:
        if piece:
            self.out.write(piece)
            self.out.flush()
            self.written += len(piece)


class PrefillProgress:
    """--prefill-progress: a bar on a terminal, else a log line every 10%."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_tenth = -1
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            width = 30
            filled = width * done // total
            self.stream.write(f"\rprefill [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
            return
        tenth = 10 * done // total
        if tenth != self.last_tenth:
            self.last_tenth = tenth
            log.info("prefill %d/%d tokens (%.1f s)", done, total, time.perf_counter() - self.started)
