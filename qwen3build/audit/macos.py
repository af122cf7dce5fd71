"""Core ML's own placement of each op (MLComputePlan): macOS 14.4+ only.

`compute_plan(package, compute_units)` compiles the package into a temporary .mlmodelc and
asks Core ML, per function, which device each compute op prefers. `const` and
`constexpr_*` ops are not compute and are left out of the share (as in the residency
gates used in the field: DESIGN section 4).

The published package is never opened read-write: Core ML compiles a private copy whose
small files (Manifest.json, model.mlmodel) are copied and whose weights are hard links
(copied when the temp dir is on another file system).

Untested here (the project builds on Linux, where coremltools cannot load a plan); the
calls follow coremltools 9.0's API (coremltools.models.compute_plan) and its own tests.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

SUPPORTED = sys.platform == "darwin"
NOT_SUPPORTED_REASON = f"MLComputePlan needs macOS 14.4+ (this is {sys.platform})"
ANE, CPU, GPU, UNKNOWN = "ANE", "CPU", "GPU", "unknown"
SMALL_FILE_BYTES = 16 * 1024 * 1024   # copied; larger files are hard-linked


def _private_copy(package: Path, destination: Path) -> Path:
    for source in package.rglob("*"):
        target = destination / source.relative_to(package)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.stat().st_size > SMALL_FILE_BYTES:
            try:
                os.link(source, target)
                continue
            except OSError:
                pass
        shutil.copyfile(source, target)
    return destination


def _is_compute(operator_name: str) -> bool:
    kind = operator_name.split(".")[-1]          # "ios18.linear" or "linear"
    return kind != "const" and not kind.startswith("constexpr")


def compute_plan(package: str | Path, compute_units: str) -> dict:
    """{"functions": {name: {"compute_ops", "ane_ops", "share", "devices", "off_ane": [...]}},
    "compute_ops", "ane_ops", "share"} for every function of the package."""
    if not SUPPORTED:
        raise RuntimeError(NOT_SUPPORTED_REASON)
    import coremltools as ct
    from coremltools.models.compute_device import (MLCPUComputeDevice, MLGPUComputeDevice,
                                                   MLNeuralEngineComputeDevice)
    from coremltools.models.compute_plan import MLComputePlan

    def device(usage) -> str:
        preferred = None if usage is None else usage.preferred_compute_device
        if isinstance(preferred, MLNeuralEngineComputeDevice):
            return ANE
        if isinstance(preferred, MLGPUComputeDevice):
            return GPU
        if isinstance(preferred, MLCPUComputeDevice):
            return CPU
        return UNKNOWN

    package = Path(package)
    with tempfile.TemporaryDirectory(prefix="qwen3build-audit-") as tmp:
        copy = _private_copy(package, Path(tmp) / package.name)
        compiled = ct.models.utils.compile_model(str(copy), str(Path(tmp) / "model.mlmodelc"))
        plan = MLComputePlan.load_from_path(compiled, compute_units=getattr(ct.ComputeUnit, compute_units))
        program = plan.model_structure.program
        if program is None:
            raise ValueError(f"{package}: not an ML Program")
        functions, total, on_ane = {}, 0, 0
        for name, function in program.functions.items():
            devices, off_ane = Counter(), []
            for op in function.block.operations:
                if not _is_compute(op.operator_name):
                    continue
                usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                where = device(usage)
                devices[where] += 1
                if where != ANE:
                    cost = plan.get_estimated_cost_for_mlprogram_operation(op)
                    off_ane.append({"op": op.operator_name, "output": op.outputs[0].name if op.outputs else "",
                                    "device": where, "cost": None if cost is None else cost.weight})
            count = sum(devices.values())
            functions[name] = {"compute_ops": count, "ane_ops": devices[ANE],
                               "share": devices[ANE] / count if count else 1.0,
                               "devices": dict(devices), "off_ane": off_ane}
            total += count
            on_ane += devices[ANE]
    return {"functions": functions, "compute_ops": total, "ane_ops": on_ane,
            "share": on_ane / total if total else 1.0}
