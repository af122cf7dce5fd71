"""Parity gate from the Hugging Face oracle down to the emitted packages (`doit verify`).

    from qwen3build.verify import run_verify, format_report, request_from_vars
    request = request_from_vars(plan, {"TEXT": "notes.txt"})
    report = run_verify(plan, request.text_path, request.report_path, request.options)
    print(format_report(report)); assert report["passed"], report["failures"]

Importing this package is cheap (no torch, transformers or coremltools); they are loaded
when a run starts. See docs/verify.md.
"""
import importlib

# Where each public name lives. Imported on first use (PEP 562): dodo.py imports
# verify.options on every doit run, and must not pay for numpy, torch or transformers.
_HOMES = {
    "THRESHOLD_KEYS": "gate", "check_rung": "gate", "load_thresholds": "gate", "validate_thresholds": "gate",
    "KNIFE_EDGE_MARGIN": "metrics", "judge_rollout": "metrics", "position_metrics": "metrics",
    "format_report": "report",
    "report_is_current": "keys", "verify_inputs": "keys", "verify_key": "keys",
    "run_verify": "ladder",
    "VERIFY_VARS": "options", "VerifyOptions": "options", "VerifyRequest": "options",
    "default_report_path": "options", "default_text_path": "options", "request_from_vars": "options",
    "plan_windows": "windows",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
