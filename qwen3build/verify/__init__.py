"""Parity gate from the Hugging Face oracle down to the emitted packages (`doit verify`).

    from qwen3build.verify import run_verify, format_report, request_from_vars
    request = request_from_vars(plan, {"TEXT": "notes.txt"})
    report = run_verify(plan, request.text_path, request.report_path, request.options)
    print(format_report(report)); assert report["passed"], report["failures"]

Importing this package is cheap (no torch, transformers or coremltools); they are loaded
when a run starts. See docs/verify.md.
"""
from .gate import THRESHOLD_KEYS, check_rung, load_thresholds, validate_thresholds
from .metrics import KNIFE_EDGE_MARGIN, judge_rollout, position_metrics
from .report import format_report
from .keys import report_is_current, verify_inputs, verify_key
from .ladder import run_verify
from .options import VERIFY_VARS, VerifyOptions, VerifyRequest, default_report_path, default_text_path, request_from_vars
from .windows import plan_windows

__all__ = [
    "KNIFE_EDGE_MARGIN", "THRESHOLD_KEYS", "VERIFY_VARS", "VerifyOptions", "VerifyRequest", "check_rung",
    "default_report_path", "default_text_path", "format_report", "judge_rollout", "load_thresholds",
    "plan_windows", "position_metrics", "report_is_current", "request_from_vars", "run_verify",
    "validate_thresholds", "verify_inputs", "verify_key",
]
