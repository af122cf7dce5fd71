"""Text in, text out: the tokenizer (with its chat template), streaming and progress."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from ..errors import BuildError

log = logging.getLogger(__name__)


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
