"""`doit audit`: read the published stack, audit every package, write audit.json.

    from qwen3build.audit.run import run_audit
    from qwen3build.audit.options import AuditRequest
    report = run_audit(tree.out_dir, AuditRequest(Path("audit.json")))
    report["stack"]["ratio"], report["flags"]

Per package: role, layers, bytes, states, op histogram, functions, traffic per decode
token (traffic.py), the minimum, their ratio, dispatches and the rule flags (rules.py);
then the same figures for the whole stack. With a prefill function (PREFILL_LEN > 0):
the modeled bytes one prefill call moves, per prompt token (/ PREFILL_LEN), and the
dispatches per prompt token, per package and for the stack. On macOS, Core ML's compute plan adds each
package's share of compute ops on the Neural Engine, gated by ANE_MIN_RESIDENCY.

The report is keyed: its key covers the packages it read (their content keys in
stack.json), the audit code, the tool versions and the variables, so `doit audit` reruns
exactly when one of those changes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from ..build.keys import code_digest, digest_json, tool_versions
from ..errors import BuildError
from ..stack import COMPUTE_UNITS, Stack, load_stack
from . import macos
from .options import AuditRequest
from .program import Package, read_package
from .rules import RULES, Subject, check
from .traffic import Traffic, function_traffic

log = logging.getLogger(__name__)

REPORT_FORMAT = 1
AUDIT_CODE = ("qwen3build.audit.run",)
AUDIT_TOOLS = ("coremltools", "numpy", "protobuf")
IO_DECODE_FUNCTIONS = ("embed", "lm_head")   # the io_model functions one token calls
# The function one prefill block calls in each kind of package (docs/prefill.md): a block
# runs embed_prefill and every shard's prefill; the prompt's last position then takes one
# lm_head call (once per prompt, not per token).
IO_PREFILL_FUNCTION, SHARD_PREFILL_FUNCTION = "embed_prefill", "prefill"
IO_ROLE, SAMPLER_ROLE = "io", "sampler"


# ---------------------------------------------------------------- one package

def _states(package: Package, functions) -> dict:
    states = {}
    for name in functions:
        states.update(package.functions[name].states)
    return states


def minimum_bytes(package: Package, functions, seq_len: int | None) -> dict:
    """The least one token must move: every constant once as stored, one read of each
    state, and the new rows (a state's bytes / SEQ_LEN, for a state with an axis of length
    SEQ_LEN; a state without one counts whole)."""
    constants = {}
    for name in functions:
        constants.update(package.functions[name].stored_constants())
    states = _states(package, functions)
    rows = 0
    for tensor_type in states.values():
        rows += tensor_type.nbytes // seq_len if seq_len and seq_len in tensor_type.shape else tensor_type.nbytes
    weights = sum(c.stored_bytes for c in constants.values())
    state_read = sum(t.nbytes for t in states.values())
    return {"weights": weights, "state_read": state_read, "rows_written": rows, "total": weights + state_read + rows}


def _state_update(traffic: Traffic, states: dict) -> str:
    if not states:
        return "none"
    if traffic.full_state_writes:
        return "full rewrite"
    return "in-place rows" if traffic.in_place_row_writes else "not written"


def _ratio(modeled: float, minimum: float) -> float | None:
    return round(modeled / minimum, 4) if minimum else None


def prefill_figures(traffic: Traffic, function: str, tokens: int, dispatches: int = 1) -> dict:
    """What one prefill call (`tokens` positions) moves, and per prompt token."""
    return {"function": function, "tokens_per_call": tokens, "traffic": traffic.to_dict(),
            "bytes_per_call": round(traffic.total), "bytes_per_prompt_token": round(traffic.total / tokens),
            "dispatches_per_call": dispatches, "dispatches_per_prompt_token": round(dispatches / tokens, 6)}


def audit_package(path: str | Path, role: str = "shard", compute_units: str = "CPU_AND_NE",
                  functions=None, layers: tuple[int, int] | None = None, seq_len: int | None = None,
                  name: str | None = None, prefill: str | None = None, prefill_len: int = 0) -> dict:
    """Audit one saved package. `functions`: the functions one decode token calls (default:
    the package's default function, what a runtime calls when it names none); `layers`:
    (first, last) for a shard; `seq_len` names the sequence axis of its states and the
    S x S rule's S; `prefill`: the function a prefill block calls (prefill_len tokens per
    call), audited beside the decode functions (its traffic per prompt token, and flags)."""
    path = Path(path)
    try:
        package = read_package(path)
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot audit {path}: {exc}") from None
    decode = list(functions) if functions is not None else [package.default_function]
    missing = [f for f in decode + ([prefill] if prefill else []) if f not in package.functions]
    if missing:
        raise BuildError(f"{path} has no function {', '.join(missing)} (it has "
                         f"{', '.join(sorted(package.functions))}); rebuild the stack with `doit build`")
    traffic = {f: function_traffic(package.functions[f]) for f in decode}
    total = Traffic()
    for item in traffic.values():
        total.add(item)
    audited = dict(traffic)
    if prefill:
        audited[prefill] = function_traffic(package.functions[prefill])
    histogram = Counter()
    for f in decode:
        histogram.update(package.functions[f].histogram())
    states = _states(package, decode)
    minimum = minimum_bytes(package, decode, seq_len)
    layer_count = None if layers is None else layers[1] - layers[0] + 1
    # The rules look at every function a deployment calls: decode's and prefill's.
    subject = Subject(name or path.name, package, role, compute_units, list(audited), audited, layer_count, seq_len)
    return {
        "name": subject.name,
        "role": role,
        "compute_units": compute_units,
        "layers": None if layers is None else {"first": layers[0], "last": layers[1], "count": layer_count},
        "package_bytes": package.file_bytes,
        "weights_file_bytes": package.weights_file_bytes,
        "weights_stored_bytes": minimum["weights"],
        "functions": [{"name": f, "default": f == package.default_function, "decode": f in decode,
                       "prefill": f == prefill,
                       "ops": sum(n for op, n in package.functions[f].histogram().items() if op != "const"),
                       "consts": package.functions[f].histogram().get("const", 0),
                       **({"traffic": audited[f].to_dict()} if f in audited else {})}
                      for f in sorted(package.functions)],
        "states": [{"name": n, "shape": list(t.shape), "dtype": t.short_dtype, "bytes": t.nbytes}
                   for n, t in sorted(states.items())],
        "state_update": _state_update(total, states),
        "op_histogram": dict(sorted(histogram.items(), key=lambda item: (-item[1], item[0]))),
        "traffic": total.to_dict(),
        "top_ops": {op: round(b) for op, b in total.by_op.most_common(6)},
        "decode_bytes_per_token": round(total.total),
        "minimum": minimum,
        "minimum_bytes_per_token": minimum["total"],
        "ratio": _ratio(total.total, minimum["total"]),
        "dispatches_per_token": len(decode),
        "prefill": prefill_figures(audited[prefill], prefill, prefill_len) if prefill else None,
        "flags": check(subject),
    }


# ---------------------------------------------------------------- the stack

def decode_chain(stack: Stack) -> list[dict]:
    """The packages one decode token runs, in order, with what each is: embed, every shard,
    lm_head, sampler (runtime/backends.py PackageBackend.forward and .choose)."""
    io_name = stack.info["io_model"]
    units = stack.info.get("compute_units", {})
    prefilling = stack.prefill_len > 0
    packages = [{"path": stack.io_model, "role": IO_ROLE, "functions": list(IO_DECODE_FUNCTIONS),
                 "prefill": IO_PREFILL_FUNCTION if prefilling else None,
                 "compute_units": units.get(io_name, COMPUTE_UNITS["io_model"])}]
    for shard in stack.shards:
        packages.append({"path": stack.package(shard["package"]), "role": shard["role"], "functions": None,
                         "layers": (shard["first"], shard["last"]),
                         "prefill": SHARD_PREFILL_FUNCTION if prefilling else None,
                         "compute_units": units.get(shard["package"], COMPUTE_UNITS["shard"])})
    packages.append({"path": stack.sampler, "role": SAMPLER_ROLE, "functions": None,
                     "compute_units": units.get(stack.info["sampler"], COMPUTE_UNITS["sampler"])})
    return packages


def _sum(packages: list[dict], key: str) -> int:
    return sum(p[key] for p in packages)


def audit_stack(stack: Stack) -> dict:
    """Every package of the decode chain audited, and the whole stack's figures."""
    packages = []
    for item in decode_chain(stack):
        packages.append(audit_package(item["path"], item["role"], item["compute_units"], item["functions"],
                                      item.get("layers"), stack.seq_len, prefill=item.get("prefill"),
                                      prefill_len=stack.prefill_len))
    traffic = {k: sum(p["traffic"][k] for p in packages) for k in packages[0]["traffic"]}
    modeled, minimum = _sum(packages, "decode_bytes_per_token"), _sum(packages, "minimum_bytes_per_token")
    flags = [flag for p in packages for flag in p["flags"]]
    chain = [f"{p['name']}:{f['name']}" for p in packages for f in p["functions"] if f["decode"]]
    return {
        "stack": {
            "models_dir": str(stack.models_dir),
            "seq_len": stack.seq_len,
            "recipe": stack.recipe,
            "layout": stack.layout_text,
            "packages": len(packages),
            "package_bytes": _sum(packages, "package_bytes"),
            "weights_stored_bytes": _sum(packages, "weights_stored_bytes"),
            "state_bytes": sum(p["minimum"]["state_read"] for p in packages),
            "rows_bytes": sum(p["minimum"]["rows_written"] for p in packages),
            "traffic": traffic,
            "decode_bytes_per_token": modeled,
            "minimum_bytes_per_token": minimum,
            "ratio": _ratio(modeled, minimum),
            "dispatches_per_token": len(chain),
            "decode_chain": chain,
            "flags": len(flags),
            "flags_by_rule": dict(sorted(Counter(f["rule"] for f in flags).items())),
            "prefill": stack_prefill(packages, stack.prefill_len),
        },
        "packages": packages,
        "flags": flags,
        "rules": [rule.to_dict() for rule in RULES],
    }


def stack_prefill(packages: list[dict], prefill_len: int) -> dict:
    """A prefill block through the stack: embed_prefill and every shard's prefill, one
    dispatch each per PREFILL_LEN prompt tokens; the prompt's last position adds one
    lm_head call per prompt (`per_prompt`), not per token."""
    if not prefill_len:
        return {"prefill_len": 0}
    calling = [p for p in packages if p["prefill"]]
    per_call = sum(p["prefill"]["bytes_per_call"] for p in calling)
    io = packages[0]
    head = next((f for f in io["functions"] if f["name"] == IO_DECODE_FUNCTIONS[1]), None)
    traffic = {k: round(sum(p["prefill"]["traffic"][k] for p in calling) / prefill_len)
               for k in calling[0]["prefill"]["traffic"]}
    return {
        "prefill_len": prefill_len,
        "chain": [f"{p['name']}:{p['prefill']['function']}" for p in calling],
        "bytes_per_call": per_call,
        "bytes_per_prompt_token": round(per_call / prefill_len),
        "dispatches_per_call": len(calling),
        "dispatches_per_prompt_token": round(len(calling) / prefill_len, 6),
        "traffic_per_prompt_token": traffic,
        "per_prompt": {"function": f"{io['name']}:{IO_DECODE_FUNCTIONS[1]}", "dispatches": 1,
                       "bytes": head["traffic"]["total"] if head and "traffic" in head else None},
    }


# ---------------------------------------------------------------- compute plan (macOS)

def compute_plan_section(report: dict, threshold: float | None) -> tuple[dict, list[str]]:
    """Core ML's placement per package, and the gate's failures (ANE packages below threshold)."""
    if not macos.SUPPORTED:
        note = macos.NOT_SUPPORTED_REASON
        if threshold is not None:
            note += f"; ANE_MIN_RESIDENCY={threshold:g} was not checked"
        return {"skipped": note}, []
    section, failures = {}, []
    models_dir = Path(report["stack"]["models_dir"])
    for package in report["packages"]:
        plan = macos.compute_plan(models_dir / package["name"], package["compute_units"])
        section[package["name"]] = plan
        gated = package["compute_units"] in ("CPU_AND_NE", "ALL")
        if threshold is not None and gated and plan["share"] < threshold:
            off = Counter(op["op"] for f in plan["functions"].values() for op in f["off_ane"])
            off_text = ", ".join(f"{kind} x{n}" for kind, n in off.most_common(5))
            failures.append(f"{package['name']}: {plan['share']:.1%} of compute ops on the Neural Engine, below "
                            f"ANE_MIN_RESIDENCY={threshold:g} (off: {off_text})")
    return section, failures


# ---------------------------------------------------------------- keyed report

def audit_inputs(stack: Stack, request: AuditRequest) -> dict:
    return {
        "packages": stack.info.get("keys"),
        "files": stack.info.get("files"),
        "code": code_digest(*AUDIT_CODE),
        "tools": tool_versions(AUDIT_TOOLS),
        "platform": macos.SUPPORTED,
        "variables": {"ANE_MIN_RESIDENCY": request.ane_min_residency},
    }


def audit_key(stack: Stack, request: AuditRequest) -> str:
    return digest_json(audit_inputs(stack, request))


def run_audit(models_dir: str | Path, request: AuditRequest) -> dict:
    """Audit the stack in models_dir (OUT_DIR), write request.report_path, return the report."""
    started = time.perf_counter()
    stack = load_stack(Path(models_dir))
    stack.require_format("coreml", "doit audit")
    report = {"format": REPORT_FORMAT, "key": audit_key(stack, request)}
    report.update(audit_stack(stack))
    plan, failures = compute_plan_section(report, request.ane_min_residency)
    report["compute_plan"] = plan
    report["ane_min_residency"] = request.ane_min_residency
    report["failures"] = failures
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_report(report, request.report_path)
    log.info("audit: ratio %s, %d flag(s), %.1f s", report["stack"]["ratio"], report["stack"]["flags"],
             report["seconds"])
    return report


def write_report(report: dict, path: Path) -> None:
    """Whole or nothing: written beside the target, then renamed over it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
        os.replace(partial, path)
    except OSError as exc:
        raise BuildError(f"cannot write the audit report {path}: {exc.strerror or exc}; "
                         "set AUDIT_REPORT to a writable path") from None


def report_is_current(models_dir: str | Path, request: AuditRequest) -> bool:
    """doit uptodate: a passing report made from exactly these packages, code and variables."""
    try:
        report = json.loads(Path(request.report_path).read_text())
        stack = load_stack(Path(models_dir), check_files=True)
    except (OSError, ValueError, BuildError):
        return False
    return bool(report.get("passed")) and report.get("key") == audit_key(stack, request)
