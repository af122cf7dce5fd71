"""What shapes a verify run: the verify variables (TEXT, WINDOWS, ...) and their defaults.

Settings like RECIPE or SEQ_LEN come from the build plan; these only say how to verify.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import BuildError
from ..settings.settings import merge_variables
from ..paths import HELDOUT_TEXT_PATH, STACK_FILE

from ..runtime.packages import PACKAGE_BACKENDS as BACKENDS
from .budgets import scaled_defaults

RUNGS = ("reference", "packages", "coreai")
SEQ_LEN_WINDOW = "SEQ_LEN"
# doit / environment variables that shape a verify run (settings like RECIPE come from the plan).
VERIFY_VARS = ("TEXT", "REPORT", "WINDOWS", "MAX_WINDOWS", "PACKAGE_POSITIONS", "ROLLOUTS",
               "PROMPT_TOKENS", "ROLLOUT_TOKENS", "BACKEND", "RUNGS", "MODELS_DIR", "COREAI_POSITIONS",
               "COREAI_ROLLOUTS", "PARITY_TOKENS")
# A release bundle ships no SLaNC scales or quantization packs: only its packages can be measured.
RELEASE_RUNGS = ("packages",)


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    windows: tuple = (256, 1024, SEQ_LEN_WINDOW)  # perplexity window sizes; "SEQ_LEN" = min(SEQ_LEN, text)
    max_windows: int = 2          # windows per size; 0 = as many as the text allows (see docs/verify.md)
    package_positions: int = 0    # teacher-forced steps through the packages; 0 = as many as the reference
    rollouts: int = 4             # greedy rollouts from prompts spread over the text
    prompt_tokens: int = 32
    rollout_tokens: int = 32
    backend: str = "auto"         # packages: "auto" = Core ML on macOS, the numpy evaluator elsewhere
    rungs: tuple | None = None    # None: every rung the stack has (stack_rungs)
    # The coreai rung on Linux's Core AI runtime is slow (docs/coreai.md: ~1.6 positions/s
    # teacher-forced through prefill blocks of 64, ~1 token/s decode at SEQ_LEN 4096 on the
    # default checkpoint), so it gets its own budget: 128 positions (two prefill blocks) and
    # the first rollout keep it to about two minutes there. 0 positions = as many as the reference.
    coreai_positions: int = 128
    coreai_rollouts: int = 1      # the first this many of the greedy rollouts (at most `rollouts`)
    # The prefill parity check's long prompt (verify/parity.py): decode alone costs one call
    # per position (~10 s for 1,000 tokens in the evaluator on the default checkpoint).
    parity_tokens: int = 1000
    scaled: str | None = None     # what verify/budgets.py scaled to the model's size (the report says it)
    thresholds: dict | None = None  # None: [verify.<RECIPE>] from qwen3build.toml
    models_dir: str | None = None   # MODELS_DIR: the packages to measure (None: OUT_DIR, the build's)

    def __post_init__(self):
        for name in ("max_windows", "package_positions", "rollouts", "prompt_tokens", "rollout_tokens",
                     "coreai_positions", "coreai_rollouts", "parity_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BuildError(f"verify option {name}={value!r} must be a whole number >= 0")
        if not self.windows:
            raise BuildError("verify option windows is empty; give sizes like 256,1024,SEQ_LEN")
        for size in self.windows:
            if size != SEQ_LEN_WINDOW and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
                raise BuildError(f"verify window size {size!r} must be a whole number >= 2 or SEQ_LEN")
        if self.backend not in BACKENDS:
            raise BuildError(f"BACKEND={self.backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
        if self.rungs is not None:
            bad = [r for r in self.rungs if r not in RUNGS]
            if bad or not self.rungs or len(set(self.rungs)) != len(self.rungs):
                raise BuildError(f"RUNGS={','.join(self.rungs)!r}: allowed rungs are {', '.join(RUNGS)}, each once")
        if self.models_dir is not None and (not isinstance(self.models_dir, str) or not self.models_dir):
            raise BuildError(f"MODELS_DIR={self.models_dir!r} must name a folder holding stack.json")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["windows"] = list(self.windows)
        out["rungs"] = None if self.rungs is None else list(self.rungs)
        return out


def stack_rungs(stack) -> tuple[str, ...]:
    """The rungs a stack can be measured on: the reference (not for a release, which ships no
    scales or packs), then each package format it was built in."""
    rungs = () if stack.is_release else ("reference",)
    return rungs + (("packages",) if "coreml" in stack.formats else ()) + (("coreai",) if "coreai" in stack.formats else ())


@dataclasses.dataclass(frozen=True)
class VerifyRequest:
    text_path: Path
    report_path: Path
    options: VerifyOptions


def default_text_path() -> Path:
    return HELDOUT_TEXT_PATH


def default_report_path(plan, text_path: Path, models_dir: str | None = None) -> Path:
    """<artifacts>/verify/<RECIPE>-<text>.json; with MODELS_DIR, -<its folder name> added, so a
    run on other packages (a release) never replaces the build's own report."""
    suffix = f"-{Path(models_dir).name}" if models_dir else ""
    return plan.tree.verify_dir / f"{plan.settings.RECIPE}-{Path(text_path).name.split('.')[0]}{suffix}.json"


def is_release_dir(models_dir: str | Path) -> bool:
    """MODELS_DIR holds a release bundle's stack.json (qwen3build.stack.Stack.is_release)."""
    try:
        return "release" in json.loads((Path(models_dir) / STACK_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def _whole(key: str, raw) -> int:
    text = str(raw).strip()
    if not text.isdigit():
        raise BuildError(f"{key}={raw!r} is not a whole number >= 0")
    return int(text)


def _csv(raw) -> list[str]:
    return [part.strip() for part in str(raw).split(",") if part.strip()]


def request_from_vars(plan, variables: dict | None = None, environ: dict | None = None) -> VerifyRequest:
    """TEXT, REPORT, WINDOWS, ... from the environment < `variables` (doit command-line vars)."""
    environ = os.environ if environ is None else environ
    raw = merge_variables("verify", VERIFY_VARS, variables, environ)
    kwargs = {}
    if "WINDOWS" in raw:
        kwargs["windows"] = tuple(SEQ_LEN_WINDOW if w.upper() == SEQ_LEN_WINDOW else _whole("WINDOWS", w)
                                  for w in _csv(raw["WINDOWS"]))
    for key, field in (("MAX_WINDOWS", "max_windows"), ("PACKAGE_POSITIONS", "package_positions"),
                       ("ROLLOUTS", "rollouts"), ("PROMPT_TOKENS", "prompt_tokens"),
                       ("ROLLOUT_TOKENS", "rollout_tokens"), ("COREAI_POSITIONS", "coreai_positions"),
                       ("COREAI_ROLLOUTS", "coreai_rollouts"), ("PARITY_TOKENS", "parity_tokens")):
        if key in raw:
            kwargs[field] = _whole(key, raw[key])
    if "BACKEND" in raw:
        kwargs["backend"] = str(raw["BACKEND"]).strip()
    if "RUNGS" in raw:
        kwargs["rungs"] = tuple(_csv(raw["RUNGS"]))
    if "MODELS_DIR" in raw:
        kwargs["models_dir"] = str(Path(str(raw["MODELS_DIR"])).expanduser().resolve())
        if "RUNGS" not in raw and is_release_dir(kwargs["models_dir"]):
            kwargs["rungs"] = RELEASE_RUNGS  # the report says so (ladder: windows notes)
    scaled, note = scaled_defaults(plan.config, plan.settings.SEQ_LEN, VerifyOptions(), set(kwargs))
    options = VerifyOptions(**kwargs, **scaled, scaled=note)
    text_path = Path(raw["TEXT"]).expanduser().resolve() if "TEXT" in raw else default_text_path()
    report_path = (Path(raw["REPORT"]).expanduser().resolve() if "REPORT" in raw
                   else default_report_path(plan, text_path, options.models_dir))
    return VerifyRequest(text_path, report_path, options)


def coerce_options(options) -> VerifyOptions:
    if options is None:
        return VerifyOptions()
    if isinstance(options, VerifyOptions):
        return options
    if isinstance(options, dict):
        fields = {f.name for f in dataclasses.fields(VerifyOptions)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise BuildError(f"unknown verify option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
        opts = dict(options)
        for name in ("windows", "rungs"):
            if name in opts:
                opts[name] = tuple(opts[name])
        return VerifyOptions(**opts)
    raise TypeError(f"options must be VerifyOptions, a dict or None, not {type(options).__name__}")
