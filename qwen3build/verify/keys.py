"""What a verify report depends on, and whether the report on disk is current.

A report is keyed on the packages it measured (their content keys, from stack.json,
which cover weights, scales, layout, SEQ_LEN and build code), the reference and verify
code, the text, the thresholds, the options and the tool versions.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..build.keys import code_digest, digest_bytes, digest_json, tool_versions
from ..errors import BuildError
from ..stack import Stack, load_stack
from .gate import load_thresholds, validate_thresholds
from .options import VerifyRequest, coerce_options, default_text_path

VERIFY_CODE = ("qwen3build.verify.ladder", "qwen3build.runtime.backends")
VERIFY_TOOLS = ("coremltools", "numpy", "torch", "tokenizers", "transformers", "coreai-core")

__all__ = ["check_stack_matches", "digest_json", "report_is_current", "verify_inputs", "verify_key"]


def check_stack_matches(plan, models_dir: str | Path | None = None) -> Stack:
    """The published stack (OUT_DIR, or MODELS_DIR), refused in one line unless it was built
    for these settings. A release bundle is matched to CONFIG by its config.json's bytes."""
    out = Path(models_dir) if models_dir else plan.tree.out_dir
    stack = load_stack(out)
    info = stack.info
    stale = ("verify it with the settings it was built with (SEQ_LEN={}, RECIPE={}, SHARDS={}, PREFILL_LEN={})".format(
        info.get("seq_len"), info.get("recipe"), stack.layout_text, int(info.get("prefill_len") or 0))
        if stack.is_release
        else "run `doit build` with the same settings first")
    if info.get("seq_len") != plan.settings.SEQ_LEN:
        raise BuildError(f"{out}: packages were built with SEQ_LEN={info.get('seq_len')}, "
                         f"but SEQ_LEN={plan.settings.SEQ_LEN} now; {stale}")
    if int(info.get("prefill_len") or 0) != plan.settings.PREFILL_LEN:
        raise BuildError(f"{out}: packages were built with PREFILL_LEN={int(info.get('prefill_len') or 0)}, "
                         f"but PREFILL_LEN={plan.settings.PREFILL_LEN} now; {stale}")
    if info.get("recipe") != plan.settings.RECIPE:
        raise BuildError(f"{out}: packages were built with RECIPE={info.get('recipe')}, "
                         f"but RECIPE={plan.settings.RECIPE} now; {stale}")
    built = [(s["name"], s["first"], s["last"]) for s in info.get("shards", [])]
    wanted = [(s.name, s.first, s.last) for s in plan.layout]
    if built != wanted:
        text = lambda layout: ",".join(f"{n}:{a}-{b}" for n, a, b in layout)  # noqa: E731
        raise BuildError(f"{out}: packages have layout {text(built)}, but SHARDS gives {text(wanted)}; {stale}")
    if stack.is_release:
        bundled = stack.checkpoint_config
        try:
            same = bundled is not None and bundled.read_bytes() == plan.settings.CONFIG.read_bytes()
        except OSError:
            same = False
        if not same:
            raise BuildError(f"{out}: the release's config.json is not CONFIG={plan.settings.CONFIG}: point CONFIG at "
                             "the config.json of the checkpoint the release was built from")
    elif info.get("checkpoint_config") != str(plan.settings.CONFIG):
        raise BuildError(f"{out}: packages were built from {info.get('checkpoint_config')}, "
                         f"not CONFIG={plan.settings.CONFIG}; {stale}")
    if info.get("model") != json.loads(json.dumps(plan.config.to_dict())):
        raise BuildError(f"{out}: packages were built from another model config than {plan.settings.CONFIG}; {stale}")
    return stack


def verify_inputs(plan, text_path: Path | None = None, options=None, stack: Stack | None = None) -> dict:
    options = coerce_options(options)
    text_path = Path(text_path) if text_path is not None else default_text_path()
    if stack is None:
        try:
            stack = load_stack(Path(options.models_dir) if options.models_dir else plan.tree.out_dir, check_files=False)
        except BuildError:
            stack = None
    info = stack.info if stack is not None else {}
    # A release carries no build keys: its packages are named by their files' sizes and digests.
    packages = {"files": info.get("files")} if "release" in info else info.get("keys")
    try:
        text_digest = digest_bytes(text_path.read_bytes())
    except OSError:
        text_digest = None
    try:
        config_digest = digest_bytes(plan.settings.CONFIG.read_bytes())
        tokenizer_digest = digest_bytes(plan.settings.CONFIG.with_name("tokenizer.json").read_bytes())
    except OSError:
        config_digest = tokenizer_digest = None
    try:
        thresholds = (validate_thresholds(options.thresholds) if options.thresholds is not None
                      else load_thresholds(plan.settings.RECIPE))
    except BuildError as error:
        thresholds = {"error": str(error)}
    return {
        "packages": packages,
        "stack": {k: info.get(k) for k in ("seq_len", "recipe", "shards", "model", "prefill_len")},
        "reference": {"code": code_digest(*VERIFY_CODE),
                      "SEQ_LEN": plan.settings.SEQ_LEN, "SHARDS": [dataclasses.asdict(s) for s in plan.layout]},
        "coreai_compute_unit": plan.settings.COREAI_COMPUTE_UNIT,  # what runs the coreai rung's packages
        "config": config_digest,
        "tokenizer": tokenizer_digest,
        "text": {"path": str(text_path), "digest": text_digest},
        "thresholds": thresholds,
        "options": {k: v for k, v in options.to_dict().items()
                    if k != "thresholds" and not (k == "models_dir" and v is None)},
        "tools": tool_versions(VERIFY_TOOLS),
    }


def verify_key(plan, text_path: Path | None = None, options=None) -> str:
    return digest_json(verify_inputs(plan, text_path, options))


def report_is_current(plan, request: VerifyRequest) -> bool:
    """doit uptodate: the report exists, passed, and was made from exactly these inputs."""
    try:
        report = json.loads(Path(request.report_path).read_text())
    except (OSError, ValueError):
        return False
    return bool(report.get("passed")) and report.get("key") == verify_key(plan, request.text_path, request.options)
