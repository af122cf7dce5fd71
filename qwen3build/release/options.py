"""What shapes a release: the release variables and their defaults (cheap to import:
dodo.py reads RELEASE_VARS at start-up).

Like verify's and audit's, these are not build settings: they never change a package.
Each comes from the environment, overridden by a doit variable (`doit release
BASE_MODEL=Qwen/Qwen3-1.7B`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..errors import BuildError
from ..settings.settings import merge_variables

# RELEASE_DIR: where the release folder goes (default <artifacts>/release).
# BASE_MODEL: the Hugging Face id of the checkpoint (card front matter, folder name).
# RELEASE_UNVERIFIED: 1 releases without a passing verify report (the card says so at its top).
# RELEASE_COMPILED: 1 also zips the compiled .mlmodelc of every package (macOS only).
RELEASE_VARS = ("RELEASE_DIR", "BASE_MODEL", "RELEASE_UNVERIFIED", "RELEASE_COMPILED")
# The verify / audit variables that say which report the release reads.
VERIFY_REPORT_VARS = ("TEXT", "REPORT")
RELEASE_FOLDER = "release"
# A Hugging Face model id: "name" or "owner/name", letters, digits, '.', '_' and '-'.
HUB_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class ReleaseRequest:
    release_dir: Path
    base_model: str | None = None
    unverified: bool = False
    compiled: bool = False
    verify_vars: dict = dataclasses.field(default_factory=dict)   # TEXT / REPORT: which verify report
    audit_vars: dict = dataclasses.field(default_factory=dict)    # AUDIT_REPORT / ANE_MIN_RESIDENCY

    def variables(self) -> dict:
        """The variables that shape the bundle's bytes (part of the release key)."""
        return {"BASE_MODEL": self.base_model, "RELEASE_UNVERIFIED": self.unverified,
                "RELEASE_COMPILED": self.compiled}


def default_release_dir(tree) -> Path:
    return tree.artifacts / RELEASE_FOLDER


def parse_flag(key: str, raw) -> bool:
    """1/0, true/false, yes/no, on/off; a bool as itself; anything else refused."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BuildError(f"{key}={raw!r} is not a flag: use 1 or 0 (true/false, yes/no, on/off)")


def check_base_model(raw) -> str | None:
    """A Hugging Face model id like Qwen/Qwen3-1.7B, or None. A local path is refused: it
    would put this machine's paths into the card."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BuildError(f"BASE_MODEL={raw!r} must be a Hugging Face model id like Qwen/Qwen3-1.7B")
    text = raw.strip()
    if not text:
        return None
    if not HUB_ID.fullmatch(text) or ".." in text:
        raise BuildError(f"BASE_MODEL={raw!r} is not a Hugging Face model id: give one like Qwen/Qwen3-1.7B "
                         "(owner/name; a local path is not accepted, it would end up in the model card)")
    return text


def request_from_vars(tree, variables: dict | None = None, environ: dict | None = None) -> ReleaseRequest:
    """The release variables (and the verify / audit ones naming their reports) from the
    environment < `variables` (doit command-line variables)."""
    from ..audit.options import AUDIT_VARS
    environ = os.environ if environ is None else environ
    known = RELEASE_VARS + VERIFY_REPORT_VARS + AUDIT_VARS
    raw = merge_variables("release", known, variables, environ)
    release_dir = (Path(str(raw["RELEASE_DIR"])).expanduser().resolve() if "RELEASE_DIR" in raw
                   else default_release_dir(tree))
    return ReleaseRequest(
        release_dir=release_dir,
        base_model=check_base_model(raw.get("BASE_MODEL")),
        unverified=parse_flag("RELEASE_UNVERIFIED", raw.get("RELEASE_UNVERIFIED", "0")),
        compiled=parse_flag("RELEASE_COMPILED", raw.get("RELEASE_COMPILED", "0")),
        verify_vars={k: raw[k] for k in VERIFY_REPORT_VARS if k in raw},
        audit_vars={k: raw[k] for k in AUDIT_VARS if k in raw})
