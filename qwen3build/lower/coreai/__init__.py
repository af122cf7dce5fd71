"""Core AI (.aimodel) lowering: graph/decoder.py lowered a third time, beside MIL and the torch reference.

A package is a torch nn.Module whose forward calls the graph functions with CoreAIOps
(ops.py: TorchOps made exportable), with its KV cache as a buffer updated in place (a
Core AI state), exported by torch.export and converted by Apple's coreai-torch
(convert.py). Quantized weights come from the project's own packs as coreai custom ops
(weights.py), so nothing is re-quantized. docs/coreai.md has the whole story and the
beta's known limits.

Only this package (and the build body / runtime that use it) imports coreai: it is the
optional `coreai` extra, so `require_coreai()` turns a missing install into one line.
"""
from __future__ import annotations

import importlib.util
import warnings

from ...errors import BuildError

# Pinned in pyproject.toml / constraints.txt: convert.py relies on two private hooks of
# this exact coreai-core (deterministic resource names; see convert.py).
COREAI_PINS = {"coreai-core": "1.0.0b3", "coreai-torch": "0.4.3", "coreai-opt": "0.3.0"}
INSTALL_HINT = 'pip install -c constraints.txt -e ".[coreai]" (./dev installs it with the test extra)'


def coreai_available() -> bool:
    try:
        require_coreai()
    except BuildError:
        return False
    return True


def check_coreai_installed(what: str = "Core AI output") -> None:
    """require_coreai's one-line error, found without importing anything (so a plan can
    check it before any work, and a no-op build stays fast)."""
    for module in ("coreai", "coreai_torch"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _not_installed(what, module)


def _not_installed(what: str, name: str) -> BuildError:
    return BuildError(f"{what} needs Apple's Core AI packages ({name} is not importable): {INSTALL_HINT}")


def require_coreai(what: str = "Core AI output") -> None:
    """Import coreai-core and coreai-torch (registering the coreai:: torch ops), or raise
    a one-line BuildError saying what to install."""
    try:
        with warnings.catch_warnings():
            # coreai-torch compares torch's version with "2.13.0" and warns for "2.13.0+cpu",
            # the very version it was validated with (a local-version suffix, same release).
            warnings.filterwarnings("ignore", message="coreai-torch has only been validated")
            import coreai  # noqa: F401
            import coreai_torch  # noqa: F401
            import coreai_torch._compression.custom_layers  # noqa: F401  registers torch.ops.coreai.*
            from coreai.authoring import AIModelAsset  # noqa: F401
            from coreai.runtime import NDArray  # noqa: F401
    except ImportError as exc:
        raise _not_installed(what, exc.name or str(exc)) from None
