"""The work plan of a verify run: the text's tokens cut into windows and runs.

The token stream is cut into contiguous windows of each size (256, 1024, SEQ_LEN by
default; as many per size as the text allows, or MAX_WINDOWS). A window that starts
where a longer one starts is that run's prefix, so it costs nothing: the rungs step
through "runs" (fresh KV state at position 0), and every position of every run is a
teacher-forced sample; perplexity per size comes from the windows' prefixes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import BuildError
from .options import SEQ_LEN_WINDOW

# Shorter texts give too few positions for any statistic (the SEQ_LEN window is cut to the text).
MIN_TEXT_TOKENS = 32


def read_text(text_path: Path) -> str:
    try:
        return Path(text_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(f"TEXT={text_path} does not exist; give a UTF-8 text file (default: the held-out code text)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"TEXT={text_path}: cannot read as UTF-8 text ({exc})") from None


def tokenize(path: Path | None, vocab: int, text: str, where: str) -> np.ndarray:
    """The text's ids under the checkpoint's own tokenizer.json (no special tokens added)."""
    if path is None or not Path(path).is_file():
        raise BuildError(f"the stack names no tokenizer.json ({path}): verify tokenizes the text with the "
                         "checkpoint's tokenizer; put tokenizer.json beside config.json and build again")
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise BuildError(f"{path}: cannot load ({exc})") from None
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
    if len(ids) and ids.max() >= vocab:
        raise BuildError(f"{path}: {where} encodes to id {int(ids.max())}, beyond the model's vocab_size {vocab}; "
                         "the tokenizer does not belong to this checkpoint")
    return ids


@dataclasses.dataclass(frozen=True)
class Run:
    start: int   # offset in the token stream
    length: int  # positions 0..length-1 from a fresh KV state


@dataclasses.dataclass(frozen=True)
class Window:
    size: int
    start: int
    run: int     # index of the run whose prefix it is


def resolve_window_sizes(sizes, seq_len: int, n_tokens: int) -> tuple[list[int], list[str]]:
    if n_tokens < MIN_TEXT_TOKENS:
        raise BuildError(f"the text has {n_tokens} tokens: too short, verify needs at least {MIN_TEXT_TOKENS}")
    resolved, notes = [], []
    for size in sizes:
        if size == SEQ_LEN_WINDOW:
            size = min(seq_len, n_tokens)
            if size < seq_len:
                notes.append(f"SEQ_LEN window cut to {size} tokens: the text has only {n_tokens}")
        elif size > seq_len:
            raise BuildError(f"WINDOWS: {size} exceeds SEQ_LEN={seq_len}, the packages' context capacity")
        elif size > n_tokens:
            notes.append(f"window size {size} skipped: the text has only {n_tokens} tokens")
            continue
        if size >= 2 and size not in resolved:
            resolved.append(size)
    if not resolved:
        raise BuildError(f"the text has {n_tokens} tokens: too short for any window ({', '.join(map(str, sizes))})")
    return sorted(resolved, reverse=True), notes


def plan_windows(n_tokens: int, sizes: list[int], max_windows: int) -> tuple[list[Run], list[Window]]:
    """Contiguous windows per size at offsets 0, size, 2*size, ...; a window starting where a
    longer run starts is its prefix. Runs come longest first."""
    runs: list[Run] = []
    windows: list[Window] = []
    for size in sorted(sizes, reverse=True):
        count = n_tokens // size
        if max_windows:
            count = min(count, max_windows)
        for j in range(count):
            start = j * size
            index = next((i for i, r in enumerate(runs) if r.start == start and r.length >= size), None)
            if index is None:
                runs.append(Run(start, size))
                index = len(runs) - 1
            windows.append(Window(size, start, index))
    return runs, windows
