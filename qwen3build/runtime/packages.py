"""Open a saved .mlpackage for prediction with whichever runtime this machine has.

    model = open_package("build/io_model.mlpackage", backend="auto")
    state = model.new_state()            # None for a stateless function
    outputs = model.predict({"input_ids": ids}, state)

Backends:
- "coreml": Apple's Core ML runtime through coremltools (macOS only). The package is
  compiled and run on the compute units asked for.
- "evaluator": qwen3build.evaluator.PackageEvaluator, a numpy interpreter of the saved
  program (any OS). compute_units is ignored: it models fp16 numerics, not a device.
- "auto": "coreml" on macOS, "evaluator" elsewhere.

Both return objects with the same surface: .backend, .inputs / .outputs / .states
(name -> (shape, numpy dtype)), new_state(), predict(inputs, state=None) and
state_arrays(state) (a name -> ndarray snapshot, for tests and debugging).
`open_functions(path, names, ...)` opens several functions of one package (a shard's
decode and prefill take the same state object).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

PACKAGE_BACKENDS = ("auto", "evaluator", "coreml")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def _coreml_runtime_available() -> bool:
    return sys.platform == "darwin"


def available_backends() -> list[str]:
    """Concrete backends usable on this machine, preferred first."""
    return (["coreml"] if _coreml_runtime_available() else []) + ["evaluator"]


class CoreMLPackage:
    """One function of a saved package, run by Core ML (macOS)."""

    backend = "coreml"

    def __init__(self, package_path: str | os.PathLike, function_name: str | None = None, compute_units: str = "ALL"):
        import coremltools as ct

        from qwen3build.evaluator.loader import WEIGHTS_SUBDIR, read_interface, read_spec

        if compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units {compute_units!r} is not one of {COMPUTE_UNITS}")
        interface = read_interface(package_path, function_name)
        self.package_path = Path(package_path)
        self.function_name = interface.function_name
        self.inputs, self.outputs, self.states = interface.inputs, interface.outputs, interface.states
        self.compute_units = compute_units
        kwargs = {"compute_units": getattr(ct.ComputeUnit, compute_units)}
        if function_name is not None:
            kwargs["function_name"] = function_name
        # From the spec and weights, not the package path: MLModel(path) opens a package
        # read-write and rewrites its Manifest.json; published packages are never written.
        self._model = ct.models.MLModel(read_spec(self.package_path),
                                        weights_dir=str(self.package_path / WEIGHTS_SUBDIR), **kwargs)

    def new_state(self):
        """A fresh Core ML state (zero-initialized), or None for a stateless function."""
        return self._model.make_state() if self.states else None

    def predict(self, inputs: dict, state: Any = None) -> dict:
        """Run once; `state` (from new_state) is updated by Core ML."""
        missing = set(self.inputs) - set(inputs)
        if missing:
            raise ValueError(f"{self.package_path.name}:{self.function_name}: missing inputs {sorted(missing)}")
        if self.states and state is None:
            raise ValueError(
                f"{self.package_path.name}:{self.function_name}: stateful model needs state=; make one with new_state()"
            )
        import numpy as np
        feed = {name: np.asarray(inputs[name], dtype) for name, (_, dtype) in self.inputs.items()}
        raw = self._model.predict(feed, state=state) if self.states else self._model.predict(feed)
        return {name: np.asarray(raw[name]).astype(dtype, copy=False) for name, (_, dtype) in self.outputs.items()}

    def state_arrays(self, state) -> dict:
        import numpy as np
        return {name: np.asarray(state.read_state(name)) for name in self.states}


def open_functions(package_path: str | os.PathLike, function_names, backend: str = "auto",
                   compute_units: str = "ALL") -> dict:
    """Several functions of one package, keyed by resolved name (None: the default
    function). The evaluator reads the package once and decodes the weights its functions
    share once; Core ML opens one model per function. Functions with a state of the same
    name (a shard's decode and prefill) are meant to take the same state object."""
    if backend not in PACKAGE_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {PACKAGE_BACKENDS}")
    if backend == "auto":
        backend = available_backends()[0]
    if backend != "evaluator":
        opened = [open_package(package_path, name, backend, compute_units) for name in function_names]
        return {function.function_name: function for function in opened}
    from qwen3build.evaluator import PackageEvaluator

    opened = PackageEvaluator.functions(package_path, list(function_names))
    for function in opened.values():
        logger.info("opened %s:%s with backend %s", Path(package_path).name, function.function_name, function.backend)
    return opened


def open_package(
    package_path: str | os.PathLike,
    function_name: str | None = None,
    backend: str = "auto",
    compute_units: str = "ALL",
):
    """Open `package_path` for prediction; see the module docstring for the backends."""
    if backend not in PACKAGE_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {PACKAGE_BACKENDS}")
    if backend == "auto":
        backend = available_backends()[0]
    if backend == "coreml":
        if not _coreml_runtime_available():
            raise RuntimeError(
                f"Core ML prediction needs macOS (this is {sys.platform}); use backend=\"evaluator\" to run "
                "the package with the numpy evaluator"
            )
        opened = CoreMLPackage(package_path, function_name, compute_units)
    else:
        from qwen3build.evaluator import PackageEvaluator

        opened = PackageEvaluator(package_path, function_name)
    logger.info("opened %s:%s with backend %s", Path(package_path).name, opened.function_name, opened.backend)
    return opened
