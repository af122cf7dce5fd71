"""What shapes an audit run: the audit variables and their defaults (cheap to import:
dodo.py reads AUDIT_VARS at start-up).

Like verify's, these are not build settings: they change the audit's report, never a
package. Each comes from the environment, overridden by a doit variable
(`doit audit ANE_MIN_RESIDENCY=0.99`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ..errors import BuildError
from ..settings.settings import merge_variables

# ANE_MIN_RESIDENCY: on macOS, the least share of a Neural Engine package's compute ops that
# Core ML's compute plan must place on the ANE (a gate; unset: report only).
# AUDIT_REPORT: where the JSON report goes (default: <artifacts>/audit/audit.json).
AUDIT_VARS = ("ANE_MIN_RESIDENCY", "AUDIT_REPORT")
REPORT_NAME = "audit.json"


@dataclasses.dataclass(frozen=True)
class AuditRequest:
    report_path: Path
    ane_min_residency: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "ane_min_residency", check_residency(self.ane_min_residency))


def default_report_path(tree) -> Path:
    """<artifacts>/audit/audit.json of a build tree (qwen3build.paths.BuildTree)."""
    return tree.artifacts / "audit" / REPORT_NAME


def check_residency(value) -> float | None:
    """A share in [0, 1], or None (no gate). Text is parsed; a bool is refused."""
    if value is None:
        return None
    problem = f"ANE_MIN_RESIDENCY={value!r} must be a number from 0 to 1 (e.g. 0.99: the share of a Neural " \
              "Engine package's compute ops Core ML must place on the ANE)"
    if isinstance(value, bool):
        raise BuildError(problem)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise BuildError(problem) from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise BuildError(problem)
    return float(value)


def request_from_vars(tree, variables: dict | None = None, environ: dict | None = None) -> AuditRequest:
    """ANE_MIN_RESIDENCY and AUDIT_REPORT from the environment < `variables` (doit variables)."""
    environ = os.environ if environ is None else environ
    raw = merge_variables("audit", AUDIT_VARS, variables, environ)
    report = (Path(raw["AUDIT_REPORT"]).expanduser().resolve() if "AUDIT_REPORT" in raw
              else default_report_path(tree))
    return AuditRequest(report, check_residency(raw.get("ANE_MIN_RESIDENCY")))
