"""The rungs of the ladder: what gets measured against the oracle.

- reference: the project's torch reference of the graph, built from the published stack
  (its checkpoint, scales and packs: runtime.backends.reference_from_stack);
- packages: the saved packages, chained as a deployment runs them (runtime PackageBackend:
  the same chain `qwen3build run` uses), each loaded from disk.
- coreai: the Core AI (.aimodel) packages (FORMATS=coreai), chained the same way on Apple's
  Core AI runtime (runtime/coreai.py CoreAIBackend, `run --backend coreai`).

Both read prompts and teacher-forced runs the way `run` reads a prompt
(runtime.generate.prompt_logits): blocks of PREFILL_LEN through the prefill graph where
the stack has it, single positions through decode elsewhere; greedy continuations step
through decode.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import BuildError

# The reference steps tiny per-token ops: one torch thread is faster than two on the two
# shared cores these builds run on (measured 16 vs 2 tokens/s with another job running).
REFERENCE_TORCH_THREADS = 1


@contextlib.contextmanager
def _torch_threads(count: int):
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ReferenceRung:
    """The project's torch reference of the graph, exactly as the stack was built."""

    name = "reference"
    backend = "torch fp32"
    sampler = "argmax"

    def __init__(self, stack):
        from ..runtime.backends import reference_from_stack
        self.stack = reference_from_stack(stack)
        self.prefill_len = self.stack.prefill_len

    def reset(self) -> None:
        self.stack.reset()

    def step(self, token: int, position: int) -> np.ndarray:
        return self.stack.step(token, position)

    # the backend surface runtime.generate.prompt_logits feeds
    def forward(self, token: int, position: int, want_logits: bool = True) -> np.ndarray:
        return self.stack.step(token, position)  # (V,)

    def prefill(self, tokens, position: int, logits: str | None = "last"):
        out = self.stack.prefill(list(tokens), position)  # (n, V)
        return out if logits == "all" else out[-1] if logits == "last" else None

    def next_token(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    def threads(self):
        return _torch_threads(REFERENCE_TORCH_THREADS)


def prompt_last_logits(rung, ids, seq_len: int) -> np.ndarray:
    """Read a prompt from a fresh state as `run` does; the last position's logits (V,) float32."""
    from ..runtime.generate import prompt_logits
    rung.reset()
    logits = None
    for _step, out in prompt_logits(rung, ids, seq_len):
        logits = out if out is not None else logits
    return np.asarray(logits, np.float32).reshape(-1)


class ChainRung:
    """Saved packages chained as `run` chains them (a runtime backend: self.chain)."""

    sampler = "sampler_model (temperature 0)"

    def __init__(self, chain, backend: str):
        self.chain, self.backend = chain, backend
        self.prefill_len = self.chain.prefill_len
        self.reset()

    def reset(self) -> None:
        self.chain.reset()

    def step(self, token: int, position: int) -> np.ndarray:
        return np.asarray(self.chain.forward(token, position)[0], np.float32)  # (V,)

    # the backend surface runtime.generate.prompt_logits feeds
    def forward(self, token: int, position: int, want_logits: bool = True):
        return self.chain.forward(token, position, want_logits)

    def prefill(self, tokens, position: int, logits: str | None = "last"):
        return self.chain.prefill(tokens, position, logits)

    def next_token(self, logits: np.ndarray) -> int:
        """Greedy through sampler_model itself: temperature 0, empty window, no penalty."""
        from ..graph.sampler import GREEDY, recent_window
        window = recent_window([], self.chain.window)
        return self.chain.choose(logits[None].astype(np.float16), window, GREEDY, None)

    def threads(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        getattr(self.chain, "close", lambda: None)()


class PackageRung(ChainRung):
    """The saved Core ML packages of the stack, on Core ML (macOS) or the evaluator."""

    name = "packages"

    def __init__(self, stack, backend: str):
        from ..runtime.backends import PackageBackend, resolve_backend
        backend = resolve_backend(backend)
        try:
            chain = PackageBackend(stack, backend)
        except (RuntimeError, ValueError) as exc:
            raise BuildError(f"packages in {stack.models_dir}: cannot open with backend {backend!r}: {exc}") from None
        super().__init__(chain, backend)


class CoreAIRung(ChainRung):
    """The stack's Core AI (.aimodel) packages on Apple's Core AI runtime, the preferred
    compute unit COREAI_COMPUTE_UNIT (honoured on macOS 27 only)."""

    name = "coreai"

    def __init__(self, stack, compute_unit: str = "default"):
        from ..runtime.coreai import CoreAIBackend
        super().__init__(CoreAIBackend.from_stack(stack, compute_unit), f"Core AI runtime ({compute_unit})")
