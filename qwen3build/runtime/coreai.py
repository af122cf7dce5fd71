"""Run a Core AI (.aimodel) stack with Apple's Core AI runtime (coreai-core):

    decode, one position per call:
    embed (io_model "embed") -> shards' "decode" in order (each with its kv_cache state)
      -> logits (io_model "lm_head") -> next token (sampler_model)
    prefill, PREFILL_LEN positions per call (packages built with PREFILL_LEN > 0):
    embed_prefill -> shards' "prefill" (the same states) -> the last position's logits
      (lm_head) or every position's (lm_head_prefill)

CoreAIBackend has the surface of runtime/backends.PackageBackend (name, description,
window, prefill_len, reset(), forward(token, position, want_logits), prefill(tokens,
position, logits), choose(logits, window_ids, settings, noise)), so runtime/generate.py
and verify drive it unchanged. The packages' functions, inputs and outputs carry the
Core ML packages' names (lower/coreai/programs.py).

Loading: each package is compiled once per process and kept loaded. On Linux,
`AIModelAsset.executable()` lowers the program to ODIX in a temporary directory and loads
it (0.1-0.3 s); it does so again on every call of executable(), so the backend enters it
once per package and holds it open until close(). That uses only the public API; the
faster cross-process reuse (`AIModelAsset._write_odix` into a kept `.aimodelx` directory,
then `AIModel.load`) is private and would save a fraction of a second per package, so it
is not used. The runtime's calls are coroutines: the backend owns one private event loop
and runs each call to completion on it (so it cannot be used from inside a running loop).

Compute units: macOS 27's runtime takes a preferred compute unit (COMPUTE_UNITS); Linux's
runs everything on one CPU core, as a reference interpreter (docs/coreai.md), and accepts
only "default".

Stack description (stack.json's "coreai" section, written by a FORMATS=coreai build;
stack.Stack.coreai reads it): paths relative to stack.json (in the same generation)
    "coreai": {"io_model": "../coreai/io_model.aimodel", "sampler": "../coreai/sampler_model.aimodel",
               "shards": ["../coreai/decoder_shard_left.aimodel", ...],
               "functions": {path: [names, default first]}, "states": {shard path: {"kv_cache": {"shape", "dtype"}}}}
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BuildError
from ..graph import decoder as graph
from ..graph.sampler import SamplerSettings
from ..stack import COREAI_COMPUTE_UNITS as COMPUTE_UNITS
from .generate import prefill_block_ids

log = logging.getLogger(__name__)

STATE_NAME = "kv_cache"
# The runtime's dtype names (NDArrayDescriptor.dtype) of the packages' inputs and states -> numpy.
DTYPES = {"float16": np.float16, "float32": np.float32, "int32": np.int32}


def _specialization(compute_unit: str):
    """SpecializationOptions for `compute_unit`, or None for the runtime's default."""
    if compute_unit not in COMPUTE_UNITS:
        raise BuildError(f"Core AI compute unit {compute_unit!r} is unknown; allowed: {', '.join(COMPUTE_UNITS)}")
    if compute_unit == "default":
        return None
    from coreai.runtime import SpecializationOptions
    if sys.platform != "darwin" or not SpecializationOptions.is_supported():
        raise BuildError(f"choosing the Core AI compute unit ({compute_unit}) needs macOS 27's Core AI runtime "
                         f"(USE_OS_COREAI=1); this is {sys.platform}: use the default")
    if compute_unit == "cpu":
        return SpecializationOptions.cpu_only()
    from coreai.runtime import ComputeUnitKind
    return SpecializationOptions.from_preferred_compute_unit_kind(getattr(ComputeUnitKind, compute_unit)())


@contextlib.contextmanager
def _native_stderr_to_log():
    """Send what native code writes to file descriptor 2 inside the block to the log (DEBUG)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                log.debug("coreai runtime: %s", line)


class AIModelPackage:
    """One .aimodel, compiled and loaded once, every function loaded once."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, compute_unit: str = "default"):
        from coreai.authoring import AIModelAsset

        self.path, self._loop = Path(path), loop
        if not AIModelAsset.is_valid(self.path):
            raise BuildError(f"{self.path} is not a Core AI package; build it with FORMATS=coreai")
        options = _specialization(compute_unit)
        self._exit = contextlib.AsyncExitStack()
        try:
            model = loop.run_until_complete(self._exit.enter_async_context(
                AIModelAsset.load(self.path).executable(options)))  # compiled here, once
            with _native_stderr_to_log():  # the runtime prints "ODIE [default]: Loading function ..." per function
                self.functions = {name: model.load_function(name) for name in model.function_names}
        except BaseException:
            self.close()
            raise
        log.info("opened %s (%s) with the Core AI runtime", self.path.name, ", ".join(self.functions))

    def function(self, name: str | None):
        """`name`, or the package's only function."""
        if name is None:
            if len(self.functions) != 1:
                raise ValueError(f"{self.path.name} has functions {sorted(self.functions)}: name one")
            return next(iter(self.functions.values()))
        if name not in self.functions:
            raise BuildError(f"{self.path.name} has no function {name!r} (it has {', '.join(self.functions)}); "
                             "it comes from another build: rebuild with FORMATS=coreai")
        return self.functions[name]

    def input_spec(self, function: str | None, name: str) -> tuple[tuple[int, ...], np.dtype]:
        desc = self.function(function).desc.input_descriptor(name)
        return tuple(desc.shape), np.dtype(self._dtype(desc.dtype))

    def _dtype(self, name: str):
        if name not in DTYPES:
            raise BuildError(f"{self.path.name} has a {name} input or state, which qwen3build never builds; "
                             "rebuild it with FORMATS=coreai")
        return DTYPES[name]

    def new_state(self, function: str | None = None) -> dict:
        """Zeroed state arrays (name -> NDArray) for a stateful function; {} otherwise."""
        from coreai.runtime import NDArray

        desc = self.function(function).desc
        states = {}
        for name in desc.state_names:
            spec = desc.state_descriptor(name)
            states[name] = NDArray(np.zeros(tuple(spec.shape), self._dtype(spec.dtype)))
        return states

    def run(self, function: str | None, inputs: dict, state: dict | None = None) -> dict[str, np.ndarray]:
        """Call a function once; `state` (from new_state) is updated in place by the runtime."""
        from coreai.runtime import NDArray

        call = self.function(function)
        desc = call.desc
        feed = {}
        for name in desc.input_names:
            spec = desc.input_descriptor(name)
            value = np.asarray(inputs[name], self._dtype(spec.dtype)).reshape(spec.shape)
            feed[name] = NDArray(np.ascontiguousarray(value))
        raw = self._loop.run_until_complete(call(feed, state=state or {}))
        return {name: np.array(value.numpy()) for name, value in raw.items()}  # copies out of the runtime's buffers

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._exit.aclose())


class CoreAIBackend:
    """The .aimodel stack run by Apple's Core AI runtime (see the module docstring)."""

    name = "coreai"
    description = "Core AI runtime (coreai-core), saved .aimodel packages"

    def __init__(self, io_model: Path, shards: list[Path], sampler: Path, compute_unit: str = "default",
                 use_prefill: bool = True):
        """use_prefill=False leaves the prefill functions unused (prefill_len 0)."""
        from ..lower.coreai import require_coreai

        require_coreai("--backend coreai")
        self._loop = asyncio.new_event_loop()
        self.packages: list[AIModelPackage] = []
        try:
            self.io_model = self._open(io_model, compute_unit)
            self.shards = [self._open(path, compute_unit) for path in shards]
            self.sampler = self._open(sampler, compute_unit)
            for name in (graph.EMBED, graph.LM_HEAD):  # refuses an io_model without them
                self.io_model.function(name)
            self.prefill_len = self._prefill_len() if use_prefill else 0
            self.window = self.sampler.input_spec(None, "recent_tokens")[0][1]            # (1, W)
            self._zero_noise = np.zeros(self.sampler.input_spec(None, "noise")[0], np.float32)
            self.reset()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_stack(cls, stack, compute_unit: str = "default", use_prefill: bool = True) -> "CoreAIBackend":
        """The packages a stack.json's "coreai" section lists (see the module docstring)."""
        stack.require_format("coreai", "--backend coreai")
        section = stack.coreai
        if section is None:
            raise BuildError(f"{stack.models_dir}/stack.json has no coreai section; run `./dev build` again")
        resolve = lambda rel: (stack.models_dir / rel).resolve()  # noqa: E731
        backend = cls(resolve(section["io_model"]), [resolve(rel) for rel in section["shards"]],
                      resolve(section["sampler"]), compute_unit, use_prefill)
        try:
            backend._check_recorded(section)
        except BaseException:
            backend.close()
            raise
        return backend

    def _check_recorded(self, section: dict) -> None:
        """The packages opened have the functions and states stack.json records."""
        paths = [section["io_model"], *section["shards"], section["sampler"]]
        packages = [self.io_model, *self.shards, self.sampler]
        for rel, package in zip(paths, packages):
            recorded = section.get("functions", {}).get(rel, [])
            if sorted(recorded) != sorted(package.functions):
                raise BuildError(f"{package.path.name} has functions {', '.join(package.functions)}, stack.json records "
                                 f"{', '.join(recorded)}: the stack was changed after it was built; run `./dev build` again")
        for rel, state in zip(section["shards"], self.states):
            recorded = {name: (list(spec["shape"]), spec["dtype"]) for name, spec in section.get("states", {}).get(rel, {}).items()}
            opened = {name: (list(value.shape), str(value.dtype)) for name, value in
                      ((name, np.asarray(array.numpy())) for name, array in state.items())}
            if recorded != opened:
                raise BuildError(f"{rel}: states {opened}, stack.json records {recorded}: the stack was changed after "
                                 "it was built; run `./dev build` again")

    def _prefill_len(self) -> int:
        """Tokens per prefill call (the io_model's embed_prefill input (1, T)); 0 when no
        package has a prefill function. A stack with them in some packages only is refused."""
        wanted = [(self.io_model, set(graph.io_functions(1)) - set(graph.io_functions(0)))]
        wanted += [(shard, set(graph.shard_functions(1)) - set(graph.shard_functions(0))) for shard in self.shards]
        if not any(names & set(package.functions) for package, names in wanted):
            return 0
        missing = [f"{package.path.name}:{name}" for package, names in wanted for name in sorted(names)
                   if name not in package.functions]
        if missing:
            raise BuildError(f"the Core AI packages are of mixed builds ({', '.join(missing)} missing); "
                             "rebuild with FORMATS=coreai")
        return self.io_model.input_spec(graph.EMBED_PREFILL, "input_ids")[0][1]

    def _open(self, path: Path, compute_unit: str) -> AIModelPackage:
        package = AIModelPackage(path, self._loop, compute_unit)
        self.packages.append(package)
        return package

    def reset(self) -> None:
        self.states = [shard.new_state(graph.DECODE) for shard in self.shards]  # prefill shares them

    def forward(self, token: int, position: int, want_logits: bool = True) -> np.ndarray | None:
        hidden = self.io_model.run(graph.EMBED, {"input_ids": np.array([[token]], np.int32)})["hidden_states"]  # (1, 1, H)
        feed_position = np.array([position], np.int32)
        for shard, state in zip(self.shards, self.states):
            hidden = shard.run(graph.DECODE, {"hidden_states": hidden, "position": feed_position},
                               state)["output_hidden_states"]
        if not want_logits:
            return None
        return self.io_model.run(graph.LM_HEAD, {"hidden_states": hidden})["logits"]  # (1, V) fp16

    def prefill(self, tokens, position: int, logits: str | None = "last") -> np.ndarray | None:
        """Feed 1..prefill_len tokens at positions position.. in one call of every prefill
        function (a partial block padded with graph.PREFILL_PAD_ID; the padded block must
        fit the ring). logits: "last" -> (1, V) fp16 of the last token given, "all" ->
        (n, V) fp16 of every token given, None -> nothing. (PackageBackend.prefill's rules.)"""
        count = len(tokens)
        ids = prefill_block_ids(self.name, tokens, self.prefill_len)  # (1, T)
        hidden = self.io_model.run(graph.EMBED_PREFILL, {"input_ids": ids})["hidden_states"]  # (1, H, 1, T)
        feed_position = np.array([position], np.int32)
        for shard, state in zip(self.shards, self.states):  # the decode functions' states
            hidden = shard.run(graph.PREFILL, {"hidden_states": hidden, "position": feed_position},
                               state)["output_hidden_states"]
        if logits == "all":
            return self.io_model.run(graph.LM_HEAD_PREFILL, {"hidden_states": hidden})["logits"][0, :count]  # (n, V)
        if logits == "last":
            last = np.ascontiguousarray(hidden[0, :, 0, count - 1]).reshape(1, 1, -1)        # (1, 1, H)
            return self.io_model.run(graph.LM_HEAD, {"hidden_states": last})["logits"]       # (1, V) fp16
        return None

    def choose(self, logits: np.ndarray, window_ids: np.ndarray, settings: SamplerSettings,
               noise: np.ndarray | None) -> int:
        inputs = {"logits": logits, "recent_tokens": window_ids,
                  "noise": self._zero_noise if noise is None else noise, **settings.inputs()}
        return int(self.sampler.run(None, inputs)["token"].reshape(-1)[0])

    def state_arrays(self) -> list[dict[str, np.ndarray]]:
        """A snapshot of every shard's state (tests and debugging)."""
        return [{name: np.array(value.numpy()) for name, value in state.items()} for state in self.states]

    def close(self) -> None:
        for package in reversed(self.packages):
            package.close()
        self.packages = []
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> "CoreAIBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
