"""Backends that run a published stack (batch 1):

    decode, one position per call:
    embed (io_model "embed") -> shards' "decode" in stack.json order (each with its KV state)
      -> logits (io_model "lm_head") -> next token (sampler_model)
    prefill, PREFILL_LEN positions per call (a stack built with PREFILL_LEN > 0):
    embed_prefill -> shards' "prefill" (the same KV states) -> the last position's logits
      (lm_head on its hidden state), or every position's (lm_head_prefill)

Every backend has `prefill_len` (0: no prefill), `forward(token, position, want_logits)`
and `prefill(tokens, position, logits)`; runtime/generate.py decides which calls a prompt
takes (prompt_schedule).

- "coreml": the saved packages on Apple's Core ML runtime (macOS only), with the compute
  units stack.json records (shards CPU+ANE, io_model and sampler CPU+GPU).
- "evaluator": the same saved packages run by qwen3build.evaluator's numpy interpreter
  (any OS): what `verify` uses, so it checks the bytes the build emitted. Slow.
- "torch": ReferenceStack, the graph in fp32 torch, built from what the stack's own
  generation holds (checkpoint, SLaNC scales, quantization packs), with sampling by
  graph/sampler.py (the numpy twin of the sampler package). Fast on Linux; it does not
  run the packages.
- "coreai": the Core AI (.aimodel) packages of a stack built with FORMATS=coreai, run by
  Apple's Core AI runtime (runtime/coreai.py; on Linux, a slow one-core interpreter), with
  COREAI_COMPUTE_UNIT as the preferred compute unit (honoured on macOS 27 only).
- "auto": "coreml" on macOS, "evaluator" elsewhere (the packages, wherever possible).

Everything here starts from a Stack (qwen3build.stack): nothing imports the build.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from ..errors import BuildError
from ..graph import decoder as graph
from ..graph import sampler as sampling
from ..graph.sampler import SamplerSettings
from .generate import prefill_block_ids
from ..stack import Stack
from .packages import PACKAGE_BACKENDS

log = logging.getLogger(__name__)

BACKENDS = PACKAGE_BACKENDS + ("torch", "coreai")
# torch intra-op threads for the torch backend. One, as the evaluator's BLAS: on the 2
# shared cores here, 2 threads ran the tiny stack 10-30x slower than 1 (measured: 70-220
# vs 7 ms per token with other processes busy).
TORCH_THREADS = 1


class PackageBackend:
    """The saved packages, run by Core ML ("coreml") or by the numpy evaluator ("evaluator").

    use_prefill=False opens the decode functions only (`run --no-prefill`)."""

    def __init__(self, stack: Stack, runtime_backend: str, use_prefill: bool = True):
        from .packages import open_functions, open_package

        stack.require_format("coreml", f"--backend {runtime_backend}")
        self.name = runtime_backend
        self.description = {"coreml": "Core ML runtime, saved packages",
                            "evaluator": "numpy package evaluator, saved packages"}[runtime_backend]
        units = stack.info.get("compute_units", {})
        self.prefill_len = stack.prefill_len if use_prefill else 0

        def opened(path, functions):
            return open_functions(path, functions, backend=runtime_backend, compute_units=units.get(path.name, "ALL"))

        io_names = graph.io_functions(self.prefill_len)
        io = opened(stack.io_model, io_names)
        self.embed, self.head = io[graph.EMBED], io[graph.LM_HEAD]
        self.shards, self.prefill_shards = [], []
        for path in stack.shard_packages:
            recorded = stack.functions(path.name)  # a stack from before prefill records none: its default
            names = graph.shard_functions(self.prefill_len) if recorded else [None]
            missing = [name for name in names if name is not None and name not in recorded]
            if missing:
                raise BuildError(f"{path.name} has no function {', '.join(missing)} (stack.json records "
                                 f"{', '.join(recorded)}); run `./dev build` again")
            functions = opened(path, names)
            self.shards.append(functions[graph.DECODE] if recorded else next(iter(functions.values())))
            if self.prefill_len:
                self.prefill_shards.append(functions[graph.PREFILL])
        if self.prefill_len:
            self.embed_prefill, self.head_prefill = io[graph.EMBED_PREFILL], io[graph.LM_HEAD_PREFILL]
        self.sampler = open_package(stack.sampler, None, backend=runtime_backend,
                                    compute_units=units.get(stack.sampler.name, "ALL"))
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

    def prefill(self, tokens, position: int, logits: str | None = "last") -> np.ndarray | None:
        """Feed 1..prefill_len tokens at positions position.. in one call of every prefill
        function (a partial block is padded with graph.PREFILL_PAD_ID; the padded block must
        fit the ring: position + prefill_len <= SEQ_LEN). logits: "last" -> (1, V) fp16 of
        the last token given (lm_head on its hidden state), "all" -> (n, V) fp16 of every
        token given (lm_head_prefill), None -> nothing."""
        count = len(tokens)
        ids = prefill_block_ids(self.name, tokens, self.prefill_len)  # (1, T)
        hidden = self.embed_prefill.predict({"input_ids": ids})["hidden_states"]  # (1, H, 1, T)
        feed_position = np.array([position], np.int32)
        for shard, state in zip(self.prefill_shards, self.states):  # the decode functions' states
            hidden = shard.predict({"hidden_states": hidden, "position": feed_position}, state)["output_hidden_states"]
        if logits == "all":
            return self.head_prefill.predict({"hidden_states": hidden})["logits"][0, :count]  # (n, V) fp16
        if logits == "last":
            last = np.ascontiguousarray(hidden[0, :, 0, count - 1]).reshape(1, 1, -1)       # (1, 1, H)
            return self.head.predict({"hidden_states": last})["logits"]                     # (1, V) fp16
        return None

    def choose(self, logits: np.ndarray, window_ids: np.ndarray, settings: SamplerSettings,
               noise: np.ndarray | None) -> int:
        inputs = {"logits": logits, "recent_tokens": window_ids,
                  "noise": self._zero_noise if noise is None else noise, **settings.inputs()}
        return int(self.sampler.predict(inputs)["token"][0])


def reference_from_stack(stack: Stack, use_prefill: bool = True):
    """The torch ReferenceStack of a published stack: the checkpoint it was built from, and
    the SLaNC scales and quantization packs of its own generation (and its PREFILL_LEN
    block, unless use_prefill is False)."""
    from ..checkpoint.reader import Checkpoint
    from ..lower.torch.reference import ReferenceStack
    from ..quant.provider import PackedWeights
    from ..settings.layout import parse_layout
    from ..settings.model_config import ModelConfig

    if stack.is_release:
        raise BuildError(f"{stack.models_dir} is a release bundle: it ships the packages, not the weights, SLaNC "
                         "scales and packs the torch backend computes with; use --backend evaluator (or coreml)")
    info = stack.info
    config = ModelConfig(**{**info["model"], "eos_token_ids": tuple(info["model"].get("eos_token_ids") or ())})
    files = [Path(f) for f in (info.get("weights") or {}).get("files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise BuildError(f"the torch backend needs the checkpoint the stack was built from; "
                         f"{', '.join(missing) or 'stack.json names no weight files'} missing")
    index = (info.get("weights") or {}).get("index")
    checkpoint = Checkpoint(config, files, Path(index) if index else None)
    scales_path = stack.scales_path
    if scales_path is None or not scales_path.is_file():
        raise BuildError(f"the torch backend needs the stack's SLaNC scales ({scales_path}); run `./dev build` again")
    quant = info["quantization"]
    layers = {int(layer): allocation for layer, allocation in quant["layers"].items()}
    pack_root = stack.quant_dir
    weights = PackedWeights(checkpoint, lambda layer: layers[layer],
                            {layer: pack_root / f"layer{layer:02d}" for layer, a in layers.items() if any(a.values())},
                            pack_root / "embed" if quant.get("embed_bits") else None, config.tie_word_embeddings)
    layout = parse_layout(stack.layout_text, config.num_hidden_layers)
    return ReferenceStack(checkpoint, weights, config, layout, np.load(scales_path), stack.seq_len,
                          info["kv_write"], stack.prefill_len if use_prefill else 0)


class TorchBackend:
    """ReferenceStack (fp32 torch) of the stack, with sampling by graph/sampler.py."""

    name = "torch"
    description = "fp32 torch ReferenceStack, sampling by qwen3build.graph.sampler"

    def __init__(self, stack: Stack, threads: int = TORCH_THREADS, use_prefill: bool = True):
        import torch

        self.reference = reference_from_stack(stack, use_prefill)
        self.prefill_len = self.reference.prefill_len
        self.window = _package_window(stack)
        torch.set_num_threads(threads)  # process-wide: `run` is the whole process
        log.debug("torch backend: %d thread(s)", threads)

    def reset(self) -> None:
        self.reference.reset()

    def forward(self, token: int, position: int, want_logits: bool = True) -> np.ndarray | None:
        return self.reference.step(token, position)  # (V,) float32; the head is cheap next to the layers

    def prefill(self, tokens, position: int, logits: str | None = "last") -> np.ndarray | None:
        """As PackageBackend.prefill, through the reference's prefill block graph: "last"
        -> (V,) float32, "all" -> (n, V) float32."""
        out = self.reference.prefill(list(tokens), position)  # (n, V); the head is cheap
        return out if logits == "all" else out[-1] if logits == "last" else None

    def choose(self, logits: np.ndarray, window_ids: np.ndarray, settings: SamplerSettings,
               noise: np.ndarray | None) -> int:
        return sampling.sample(logits, window_ids, settings, noise).token


def _package_window(stack: Stack) -> int:
    """The built sampler's repetition window, so that torch penalizes the same tokens."""
    from ..evaluator import read_interface

    try:
        inputs = read_interface(stack.sampler).inputs
    except (BuildError, OSError, ValueError):
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


def open_backend(stack: Stack, requested: str, use_prefill: bool = True, compute_unit: str = "default"):
    """compute_unit: the Core AI backend's preferred compute unit (COREAI_COMPUTE_UNIT)."""
    backend = resolve_backend(requested)
    if backend == "torch":
        return TorchBackend(stack, use_prefill=use_prefill)
    if backend == "coreai":
        from .coreai import CoreAIBackend
        return CoreAIBackend.from_stack(stack, compute_unit, use_prefill)
    return PackageBackend(stack, backend, use_prefill)
