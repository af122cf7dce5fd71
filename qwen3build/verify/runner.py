"""`doit verify`: the parity ladder from the HF oracle down to the saved packages.

Rungs, each measured against the fp32 transformers oracle on the same held-out tokens:
- reference: the re-authored graph in fp32 torch (qwen3build.reference.ReferenceStack),
  with the weights as packed, the SLaNC scales, the layout and SEQ_LEN of the build;
- packages: the saved .mlpackage files chained io_model:embed -> shards (with their KV
  states) -> io_model:lm_head -> sampler_model, token by token, loaded from disk (the numpy
  evaluator on Linux, the Core ML runtime on macOS: qwen3build.runtime.open_package).

Work plan for one text: the token stream is cut into contiguous windows of each size
(256, 1024, SEQ_LEN by default; as many per size as the text allows, or MAX_WINDOWS).
A window that starts where a longer one starts is that run's prefix, so it costs nothing:
the rungs step through "runs" (fresh KV state at position 0), and every position of every
run is a teacher-forced sample; perplexity per size comes from the windows' prefixes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import BuildError
from ..hashing import code_digest, digest_bytes, digest_json, tool_versions
from . import metrics
from .gate import check_rung, load_thresholds, validate_thresholds

log = logging.getLogger(__name__)

RUNGS = ("reference", "packages")
BACKENDS = ("auto", "evaluator", "coreml")
SEQ_LEN_WINDOW = "SEQ_LEN"
STACK_FILE = "stack.json"
REPORT_FORMAT = 1
# The reference steps tiny per-token ops: one torch thread is faster than two on the two
# shared cores these builds run on (measured 16 vs 2 tokens/s with another job running).
REFERENCE_TORCH_THREADS = 1
# Context-depth buckets for the by-depth breakdown (an error invisible at 27 tokens can
# flip confident tokens at 272: DESIGN section 4).
DEPTH_EDGES = (0, 64, 256, 1024, 4096, 16384)
# Shorter texts give too few positions for any statistic (the SEQ_LEN window is cut to the text).
MIN_TEXT_TOKENS = 32
# doit / environment variables that shape a verify run (settings like RECIPE come from the plan).
VERIFY_VARS = ("TEXT", "REPORT", "WINDOWS", "MAX_WINDOWS", "PACKAGE_POSITIONS", "ROLLOUTS",
               "PROMPT_TOKENS", "ROLLOUT_TOKENS", "BACKEND", "RUNGS")


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    windows: tuple = (256, 1024, SEQ_LEN_WINDOW)  # perplexity window sizes; "SEQ_LEN" = min(SEQ_LEN, text)
    max_windows: int = 2          # windows per size; 0 = as many as the text allows (see docs/verify.md)
    package_positions: int = 0    # teacher-forced steps through the packages; 0 = as many as the reference
    rollouts: int = 4             # greedy rollouts from prompts spread over the text
    prompt_tokens: int = 32
    rollout_tokens: int = 32
    backend: str = "auto"         # packages: "auto" = Core ML on macOS, the numpy evaluator elsewhere
    rungs: tuple = RUNGS
    thresholds: dict | None = None  # None: [verify.<RECIPE>] from qwen3build.toml

    def __post_init__(self):
        for name in ("max_windows", "package_positions", "rollouts", "prompt_tokens", "rollout_tokens"):
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
        bad = [r for r in self.rungs if r not in RUNGS]
        if bad or not self.rungs:
            raise BuildError(f"RUNGS={','.join(self.rungs)!r}: allowed rungs are {', '.join(RUNGS)}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["windows"], out["rungs"] = list(self.windows), list(self.rungs)
        return out


@dataclasses.dataclass(frozen=True)
class VerifyRequest:
    text_path: Path
    report_path: Path
    options: VerifyOptions


def default_text_path() -> Path:
    from ..tinymodel import HELDOUT_TEXT_PATH
    return HELDOUT_TEXT_PATH


def default_report_path(plan, text_path: Path) -> Path:
    return plan.artifacts / "verify" / f"{plan.settings.RECIPE}-{Path(text_path).name.split('.')[0]}.json"


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
    raw = {key: environ[key] for key in VERIFY_VARS if environ.get(key) not in (None, "")}
    for key, value in (variables or {}).items():
        if key not in VERIFY_VARS:
            raise BuildError(f"unknown verify variable {key}; allowed: {', '.join(VERIFY_VARS)}")
        if value not in (None, ""):
            raw[key] = value
    kwargs = {}
    if "WINDOWS" in raw:
        kwargs["windows"] = tuple(SEQ_LEN_WINDOW if w.upper() == SEQ_LEN_WINDOW else _whole("WINDOWS", w)
                                  for w in _csv(raw["WINDOWS"]))
    for key, field in (("MAX_WINDOWS", "max_windows"), ("PACKAGE_POSITIONS", "package_positions"),
                       ("ROLLOUTS", "rollouts"), ("PROMPT_TOKENS", "prompt_tokens"),
                       ("ROLLOUT_TOKENS", "rollout_tokens")):
        if key in raw:
            kwargs[field] = _whole(key, raw[key])
    if "BACKEND" in raw:
        kwargs["backend"] = str(raw["BACKEND"]).strip()
    if "RUNGS" in raw:
        kwargs["rungs"] = tuple(_csv(raw["RUNGS"]))
    options = VerifyOptions(**kwargs)
    text_path = Path(raw["TEXT"]).expanduser().resolve() if "TEXT" in raw else default_text_path()
    report_path = (Path(raw["REPORT"]).expanduser().resolve() if "REPORT" in raw
                   else default_report_path(plan, text_path))
    return VerifyRequest(text_path, report_path, options)


def _coerce_options(options) -> VerifyOptions:
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


# ---------------------------------------------------------------------------- inputs

def load_stack(plan) -> dict:
    """OUT_DIR/stack.json, checked against the plan: verify what `doit build` made for these settings."""
    out = plan.settings.OUT_DIR
    path = out / STACK_FILE
    try:
        stack = json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{path} is missing: run `doit build` (same settings) before `doit verify`") from None
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path}: cannot read ({exc}); rebuild with `doit build`") from None
    stale = "run `doit build` with the same settings first"
    if stack.get("seq_len") != plan.settings.SEQ_LEN:
        raise BuildError(f"{path}: packages were built with SEQ_LEN={stack.get('seq_len')}, "
                         f"but SEQ_LEN={plan.settings.SEQ_LEN} now; {stale}")
    if stack.get("recipe") != plan.settings.RECIPE:
        raise BuildError(f"{path}: packages were built with RECIPE={stack.get('recipe')}, "
                         f"but RECIPE={plan.settings.RECIPE} now; {stale}")
    built = [(s["name"], s["first"], s["last"]) for s in stack.get("shards", [])]
    wanted = [(s.name, s.first, s.last) for s in plan.layout]
    if built != wanted:
        text = lambda layout: ",".join(f"{n}:{a}-{b}" for n, a, b in layout)  # noqa: E731
        raise BuildError(f"{path}: packages have layout {text(built)}, but SHARDS gives {text(wanted)}; {stale}")
    if stack.get("model") != json.loads(json.dumps(plan.config.to_dict())):
        raise BuildError(f"{path}: packages were built from another model config than {plan.settings.CONFIG}; {stale}")
    for name in [stack["io_model"], stack["sampler"]] + [s["package"] for s in stack["shards"]]:
        if not (out / name).is_dir():
            raise BuildError(f"{out / name} is missing; {stale}")
    return stack


def read_text(text_path: Path) -> str:
    try:
        return Path(text_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(f"TEXT={text_path} does not exist; give a UTF-8 text file (default: the held-out code text)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"TEXT={text_path}: cannot read as UTF-8 text ({exc})") from None


def tokenize(plan, text: str, where: str) -> np.ndarray:
    """The text's ids under the checkpoint's own tokenizer.json (no special tokens added)."""
    path = plan.settings.CONFIG.with_name("tokenizer.json")
    if not path.is_file():
        raise BuildError(f"no tokenizer.json beside {plan.settings.CONFIG}: verify tokenizes the text with the checkpoint's tokenizer")
    from tokenizers import Tokenizer
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise BuildError(f"{path}: cannot load ({exc})") from None
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
    vocab = plan.config.vocab_size
    if len(ids) and ids.max() >= vocab:
        raise BuildError(f"{path}: {where} encodes to id {int(ids.max())}, beyond the model's vocab_size {vocab}; "
                         "the tokenizer does not belong to this checkpoint")
    return ids


@dataclasses.dataclass(frozen=True)
class Run:
    start: int   # offset in the token stream
    length: int  # positions 0..length-1 from a fresh KV state


@dataclasses.dataclass(frozen=True)
class Window:
    size: int
    start: int
    run: int     # index of the run whose prefix it is


def resolve_window_sizes(sizes, seq_len: int, n_tokens: int) -> tuple[list[int], list[str]]:
    if n_tokens < MIN_TEXT_TOKENS:
        raise BuildError(f"the text has {n_tokens} tokens: too short, verify needs at least {MIN_TEXT_TOKENS}")
    resolved, notes = [], []
    for size in sizes:
        if size == SEQ_LEN_WINDOW:
            size = min(seq_len, n_tokens)
            if size < seq_len:
                notes.append(f"SEQ_LEN window cut to {size} tokens: the text has only {n_tokens}")
        elif size > seq_len:
            raise BuildError(f"WINDOWS: {size} exceeds SEQ_LEN={seq_len}, the packages' context capacity")
        elif size > n_tokens:
            notes.append(f"window size {size} skipped: the text has only {n_tokens} tokens")
            continue
        if size >= 2 and size not in resolved:
            resolved.append(size)
    if not resolved:
        raise BuildError(f"the text has {n_tokens} tokens: too short for any window ({', '.join(map(str, sizes))})")
    return sorted(resolved, reverse=True), notes


def plan_windows(n_tokens: int, sizes: list[int], max_windows: int) -> tuple[list[Run], list[Window]]:
    """Contiguous windows per size at offsets 0, size, 2*size, ...; a window starting where a
    longer run starts is its prefix. Runs come longest first."""
    runs: list[Run] = []
    windows: list[Window] = []
    for size in sorted(sizes, reverse=True):
        count = n_tokens // size
        if max_windows:
            count = min(count, max_windows)
        for j in range(count):
            start = j * size
            index = next((i for i, r in enumerate(runs) if r.start == start and r.length >= size), None)
            if index is None:
                runs.append(Run(start, size))
                index = len(runs) - 1
            windows.append(Window(size, start, index))
    return runs, windows


# ---------------------------------------------------------------------------- rungs

@contextlib.contextmanager
def _torch_threads(count: int):
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ReferenceRung:
    """The project's torch reference of the re-authored graph, exactly as the build configures it."""

    name = "reference"

    def __init__(self, plan):
        from ..reference import ReferenceStack
        from ..tasks import weights_provider
        try:
            scales = np.load(plan.scales_path)
        except OSError:
            raise BuildError(f"{plan.scales_path} is missing: run `doit build` before `doit verify`") from None
        self.stack = ReferenceStack(plan.checkpoint, weights_provider(plan), plan.layout, scales, plan.settings.SEQ_LEN)
        self.backend = "torch fp32"
        self.sampler = "argmax"

    def reset(self) -> None:
        self.stack.reset()

    def step(self, token: int, position: int) -> np.ndarray:
        return self.stack.step(token, position)

    def next_token(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    def threads(self):
        return _torch_threads(REFERENCE_TORCH_THREADS)


class PackageRung:
    """The saved packages, chained as a deployment runs them (runner.PackageBackend: the
    same chain `qwen3build run` uses), each loaded from disk."""

    name = "packages"
    sampler = "sampler_model (temperature 0)"

    def __init__(self, plan, stack: dict, backend: str):
        from ..runner import PackageBackend, load_stack, resolve_backend
        backend = resolve_backend(backend)
        try:
            self.chain = PackageBackend(load_stack(plan.settings.OUT_DIR), backend)
        except (RuntimeError, ValueError) as exc:
            raise BuildError(f"packages in {plan.settings.OUT_DIR}: cannot open with backend {backend!r}: {exc}") from None
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self.chain.reset()

    def step(self, token: int, position: int) -> np.ndarray:
        return np.asarray(self.chain.forward(token, position)[0], np.float32)  # (V,)

    def next_token(self, logits: np.ndarray) -> int:
        """Greedy through sampler_model itself: temperature 0, empty window, no penalty."""
        from ..sampling import GREEDY, recent_window
        window = recent_window([], self.chain.window)
        return self.chain.choose(logits[None].astype(np.float16), window, GREEDY, None)

    def threads(self):
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------- the ladder

@dataclasses.dataclass
class OracleRun:
    hidden: object        # (L, H) torch fp32, final-normed
    nll: np.ndarray       # (L,) next-token NLL, NaN at the last position


def _teacher_forced(rung, oracle, runs, oracle_runs, tokens, budget: int):
    """Step every run through the rung; per-position metrics against the oracle."""
    parts, run_nll, covered = [], [], []
    steps, step_seconds = 0, 0.0
    total = sum(r.length for r in runs) if not budget else min(budget, sum(r.length for r in runs))
    next_log = 0.0
    with rung.threads():
        for run, oracle_run in zip(runs, oracle_runs):
            n = run.length if not budget else max(0, min(run.length, budget - steps))
            ids = tokens[run.start:run.start + run.length]
            targets = np.append(ids[1:], -1)
            nll_parts = []
            if n:
                rung.reset()
            for c0 in range(0, n, oracle.chunk):
                c1 = min(n, c0 + oracle.chunk)
                started = time.perf_counter()
                logits = np.stack([rung.step(int(ids[t]), t) for t in range(c0, c1)])  # (C, V)
                step_seconds += time.perf_counter() - started
                part = metrics.position_metrics(oracle.logits(oracle_run.hidden[c0:c1]), logits, targets[c0:c1])
                part["depth"] = np.arange(c0, c1)
                parts.append(part)
                nll_parts.append(part["nll"])
                steps += c1 - c0
                if steps / total >= next_log:
                    log.info("verify %s: %d/%d positions (%.1f tokens/s)", rung.name, steps, total,
                             steps / max(step_seconds, 1e-9))
                    next_log += 0.25
            run_nll.append(np.concatenate(nll_parts) if nll_parts else np.zeros(0))
            covered.append(n)
    return metrics.concat_metrics(parts), run_nll, covered, steps, step_seconds


def _perplexity_table(windows, oracle_runs, run_nll=None, covered=None) -> dict:
    """Per window size: windows counted, oracle PPL, and (for a rung) its PPL on the same windows."""
    table = {}
    for size in sorted({w.size for w in windows}):
        oracle_parts, rung_parts = [], []
        for w in (w for w in windows if w.size == size):
            if covered is not None and covered[w.run] < size - 1:
                continue  # the rung's budget ended inside this window
            oracle_parts.append(oracle_runs[w.run].nll[:size - 1])
            if run_nll is not None:
                rung_parts.append(run_nll[w.run][:size - 1])
        entry = {"windows": len(oracle_parts), "predictions": int(sum(len(p) for p in oracle_parts)),
                 "oracle": metrics.perplexity(np.concatenate(oracle_parts)) if oracle_parts else None}
        if run_nll is not None:
            rung_ppl = metrics.perplexity(np.concatenate(rung_parts)) if rung_parts else None
            entry["rung"] = rung_ppl
            entry["drift"] = (rung_ppl / entry["oracle"] - 1.0) if rung_parts else None
        table[str(size)] = entry
    return table


def _prompts(n_tokens: int, options: VerifyOptions, seq_len: int) -> tuple[list[int], int, int]:
    if not options.rollouts or not options.rollout_tokens:
        return [], 0, 0
    prompt = max(1, min(options.prompt_tokens, n_tokens, seq_len - 1))
    new = min(options.rollout_tokens, seq_len - prompt)
    offsets = sorted({int(o) for o in np.linspace(0, n_tokens - prompt, options.rollouts)})
    return offsets, prompt, new


def _greedy(rung, tokens, offsets, prompt_len, oracle_rollouts) -> dict:
    results = []
    with rung.threads():
        for offset, (oracle_tokens, oracle_margins) in zip(offsets, oracle_rollouts):
            rung.reset()
            prompt = tokens[offset:offset + prompt_len]
            for t, token in enumerate(prompt):
                logits = rung.step(int(token), t)
            produced = []
            for k in range(len(oracle_tokens)):
                token = rung.next_token(logits)
                produced.append(token)
                if token != oracle_tokens[k] or k + 1 == len(oracle_tokens):
                    break
                logits = rung.step(token, prompt_len + k)
            results.append({"prompt_at": offset, **metrics.judge_rollout(oracle_tokens, oracle_margins, produced)})
    verdicts = [r["verdict"] for r in results]
    return {"prompts": len(results), "prompt_tokens": prompt_len,
            "new_tokens": len(oracle_rollouts[0][0]) if oracle_rollouts else 0,
            "identical": verdicts.count("identical"), "knife_edge": verdicts.count("knife-edge"),
            "hard": verdicts.count("hard"), "rollouts": results}


def _depth_edges(seq_len: int) -> list[int]:
    return [e for e in DEPTH_EDGES if e < seq_len] + [seq_len]


def run_verify(plan, text_path: Path | None = None, report_path: Path | None = None, options=None) -> dict:
    """Run the ladder, gate it on [verify.<RECIPE>], write the JSON report; returns the report.

    report["passed"] is the gate; report["failures"] holds one line per missed threshold."""
    started = time.perf_counter()
    options = _coerce_options(options)
    text_path = Path(text_path) if text_path is not None else default_text_path()
    report_path = Path(report_path) if report_path is not None else default_report_path(plan, text_path)
    thresholds = (validate_thresholds(options.thresholds, "thresholds option") if options.thresholds is not None
                  else load_thresholds(plan.settings.RECIPE))
    stack = load_stack(plan)
    text = read_text(text_path)
    tokens = tokenize(plan, text, text_path.name)
    seq_len = plan.settings.SEQ_LEN
    sizes, notes = resolve_window_sizes(options.windows, seq_len, len(tokens))
    runs, windows = plan_windows(len(tokens), sizes, options.max_windows)
    offsets, prompt_len, new_tokens = _prompts(len(tokens), options, seq_len)
    inputs = verify_inputs(plan, text_path, options)
    log.info("verify: %s, %d tokens; %d runs (%d positions), windows %s; %d greedy rollouts",
             text_path.name, len(tokens), len(runs), sum(r.length for r in runs),
             ", ".join(f"{sum(w.size == s for w in windows)}x{s}" for s in sizes), len(offsets))

    from .oracle import Oracle
    oracle_started = time.perf_counter()
    oracle = Oracle(plan)
    oracle_runs = []
    for run in runs:
        ids = tokens[run.start:run.start + run.length]
        hidden = oracle.hidden_states(ids)
        oracle_runs.append(OracleRun(hidden, oracle.run_nll(hidden, ids)))
    oracle_rollouts = [oracle.greedy(tokens[o:o + prompt_len], new_tokens) for o in offsets]
    report = {
        "format": REPORT_FORMAT,
        "passed": False,
        "failures": [],
        "recipe": plan.settings.RECIPE,
        "key": digest_json(inputs),
        "checkpoint": str(plan.settings.CONFIG.parent),
        "seq_len": seq_len,
        "layout": [{"name": s.name, "first": s.first, "last": s.last, "role": s.role} for s in plan.layout],
        "text": {"path": str(text_path), "digest": inputs["text"]["digest"], "tokens": int(len(tokens))},
        "windows": {"sizes": sizes, "runs": [[r.start, r.length] for r in runs], "notes": notes},
        "options": options.to_dict(),
        "thresholds": thresholds,
        "knife_edge_margin": metrics.KNIFE_EDGE_MARGIN,
        "oracle": {"perplexity": {k: {"windows": v["windows"], "ppl": v["oracle"]}
                                  for k, v in _perplexity_table(windows, oracle_runs).items()},
                   "seconds": round(time.perf_counter() - oracle_started, 2)},
        "rungs": {},
        "platform": sys.platform,
        "inputs": inputs,
    }

    failures = []
    for name in options.rungs:
        rung = ReferenceRung(plan) if name == "reference" else PackageRung(plan, stack, options.backend)
        budget = options.package_positions if name == "packages" else 0
        rung_started = time.perf_counter()
        tf, run_nll, covered, steps, step_seconds = _teacher_forced(rung, oracle, runs, oracle_runs, tokens, budget)
        figures = {
            "backend": rung.backend,
            "sampler": rung.sampler,
            "teacher_forced": metrics.summarize_teacher_forced(tf, _depth_edges(seq_len)),
            "perplexity": _perplexity_table(windows, oracle_runs, run_nll, covered),
            "greedy": _greedy(rung, tokens, offsets, prompt_len, oracle_rollouts),
            "steps": steps,
            "budget": budget or None,
            "step_seconds": round(step_seconds, 2),
            "tokens_per_second": round(steps / step_seconds, 2) if step_seconds else None,
            "seconds": round(time.perf_counter() - rung_started, 2),
        }
        figures["failures"] = check_rung(name, figures, thresholds)
        failures += figures["failures"]
        report["rungs"][name] = figures
        del rung  # free its weights before the next rung loads (a 1.7B model holds GBs per rung)
        gc.collect()
        log.info("verify %s: %s", name, "ok" if not figures["failures"] else f"{len(figures['failures'])} threshold(s) missed")
    report["failures"] = failures
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    _write_report(report_path, report)
    report["report_path"] = str(report_path)
    return report


def _write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- keys

def verify_inputs(plan, text_path: Path | None = None, options=None) -> dict:
    """Everything a verify report depends on: the packages (their content keys from
    stack.json, which cover weights, scales, layout, SEQ_LEN and build code), the reference
    and verify code, the text, the thresholds, the options and the tool versions."""
    options = _coerce_options(options)
    text_path = Path(text_path) if text_path is not None else default_text_path()
    try:
        stack = json.loads((plan.settings.OUT_DIR / STACK_FILE).read_text())
    except (OSError, ValueError):
        stack = {}
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
    try:
        from importlib import metadata
        transformers_version = metadata.version("transformers")
    except Exception:  # not installed: verify itself will say so
        transformers_version = None
    return {
        "packages": stack.get("keys"),
        "stack": {k: stack.get(k) for k in ("seq_len", "recipe", "shards", "model")},
        "reference": {"code": code_digest("qwen3build.verify.runner", "qwen3build.reference", "qwen3build.tasks"),
                      "SEQ_LEN": plan.settings.SEQ_LEN, "SHARDS": [dataclasses.asdict(s) for s in plan.layout]},
        "config": config_digest,
        "tokenizer": tokenizer_digest,
        "text": {"path": str(text_path), "digest": text_digest},
        "thresholds": thresholds,
        "options": {k: v for k, v in options.to_dict().items() if k != "thresholds"},
        "tools": {**tool_versions(), "transformers": transformers_version},
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
