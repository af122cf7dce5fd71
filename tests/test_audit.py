"""`doit audit`: the traffic model and the rule table on small handmade MIL programs, and the
keyed report of a built stack (docs/audit.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen3build.audit import rules
from qwen3build.audit.options import AUDIT_VARS, AuditRequest, check_residency, request_from_vars
from qwen3build.audit.run import audit_package
from qwen3build.errors import BuildError

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from conftest import REPO  # noqa: E402

OPSET = ct.target.iOS18
FP16 = 2                       # bytes per fp16 element
OP_PARAMETER_BYTES = 64        # scalar op parameters (axis, batch_dims, ...) count as tiny constants
S, HEADS, HEAD_DIM = 64, 2, 64  # a KV-like state (2 rows, HEADS, S, HEAD_DIM): every dim a multiple of 32 but HEADS


def save(program, directory: Path, name: str, precision=None) -> Path:
    """Convert and save a handmade program the way the build saves packages."""
    from qwen3build.lower.mil.save import convert, save_package
    model = convert(program) if precision is None else convert(program, compute_precision=precision)
    path = directory / f"{name}.mlpackage"
    save_package(model, path)
    return path


def rules_flagged(package: dict) -> set:
    return {flag["rule"] for flag in package["flags"]}


def kv_program(write: str, state_shape=(2, HEADS, S, HEAD_DIM)):
    """One layer's K row written into a state, then attention scores over the K cache.
    write="rows": slice_update + coreml_update_state per row (the in-place pattern);
    write="blend": the whole cache blended with a one-hot row and written back."""
    rows, heads, seq, dim = state_shape

    @mb.program(input_specs=[mb.TensorSpec((1, heads, 1, dim), dtype=types.fp16),
                             mb.TensorSpec((1,), dtype=types.int32),
                             mb.StateTensorSpec(state_shape, dtype=types.fp16)], opset_version=OPSET)
    def program(row, position, kv):
        cache = mb.read_state(input=kv)
        if write == "rows":
            base = mb.concat(values=[np.zeros(2, np.int32), position, np.zeros(1, np.int32)], axis=0)
            for r in range(rows):
                begin = mb.add(x=base, y=np.array([r, 0, 0, 0], np.int32))
                end = mb.add(x=base, y=np.array([r + 1, heads, 1, dim], np.int32))
                cache = mb.slice_update(x=cache, update=row, begin=begin, end=end)
                cache = mb.coreml_update_state(state=kv, value=cache)
        else:
            table = np.eye(seq, dtype=np.float16)                                    # one-hot write rows
            onehot = mb.gather(x=table, indices=position, axis=0)                     # (1, S)
            weight = mb.reshape(x=onehot, shape=[1, 1, seq, 1])
            keep = mb.sub(x=np.float16(1), y=weight)
            cache = mb.add(x=mb.mul(x=cache, y=keep), y=mb.mul(x=row, y=weight))  # (rows, H, S, D)
            cache = mb.coreml_update_state(state=kv, value=cache)
        keys = mb.slice_by_index(x=cache, begin=[0, 0, 0, 0], end=[1, heads, seq, dim],
                                 squeeze_mask=[True, False, False, False])           # (H, S, D)
        query = mb.reshape(x=row, shape=[heads, 1, dim])
        return mb.matmul(x=query, y=keys, transpose_y=True)                          # (H, 1, S)

    return program


# ---------------------------------------------------------------- the traffic model

def test_in_place_row_writes_are_charged_the_rows(tmp_path):
    package = audit_package(save(kv_program("rows"), tmp_path, "rows"), seq_len=S)
    traffic = package["traffic"]
    row_bytes = HEADS * HEAD_DIM * FP16
    state_bytes = 2 * HEADS * S * HEAD_DIM * FP16
    assert traffic["in_place_row_writes"] == 2 and traffic["full_state_writes"] == 0
    assert traffic["state_written"] == 2 * row_bytes
    assert traffic["state_read"] == state_bytes // 2          # the K half, read once by the matmul
    assert package["minimum"]["rows_written"] == state_bytes // S == 2 * row_bytes
    assert package["minimum"]["state_read"] == state_bytes
    assert package["state_update"] == "in-place rows"
    assert "full-state-write" not in rules_flagged(package)


def test_blend_write_is_a_full_state_write(tmp_path):
    package = audit_package(save(kv_program("blend"), tmp_path, "blend"), seq_len=S)
    traffic = package["traffic"]
    state_bytes = 2 * HEADS * S * HEAD_DIM * FP16
    assert traffic["full_state_writes"] == 1 and traffic["in_place_row_writes"] == 0
    assert traffic["state_written"] == state_bytes
    # the blend reads the whole cache, then the matmul reads K back from the written state
    assert traffic["state_read"] == state_bytes + state_bytes // 2
    assert traffic["intermediate_written"] > 2 * state_bytes  # mul, mul, add: each a full cache
    assert package["state_update"] == "full rewrite"
    assert {"full-state-write", "dynamic-gather", "sxs-table"} <= rules_flagged(package)
    assert package["ratio"] > 3 > audit_package(save(kv_program("rows"), tmp_path, "rows"), seq_len=S)["ratio"]


def test_palettized_weight_is_read_as_stored_not_dense(tmp_path):
    out_features, in_features, palette = 128, 256, 16
    indices = np.random.default_rng(0).integers(0, palette, (out_features, in_features)).astype(types.np_uint4_dtype)
    lut = np.linspace(-1, 1, palette, dtype=np.float16).reshape(1, 1, palette, 1)

    @mb.program(input_specs=[mb.TensorSpec((1, in_features), dtype=types.fp16)], opset_version=OPSET)
    def program(x):
        weight = mb.constexpr_lut_to_dense(indices=indices, lut=lut)
        return mb.linear(x=x, weight=weight)

    package = audit_package(save(program, tmp_path, "lut"), role="io", compute_units="CPU_AND_GPU")
    stored = out_features * in_features * 4 // 8 + palette * FP16
    dense = out_features * in_features * FP16
    traffic = package["traffic"]
    assert stored <= traffic["weights_read"] <= stored + out_features * FP16  # + a zero bias, if any
    assert traffic["weights_read"] < dense / 3
    assert traffic["intermediate_written"] == out_features * FP16            # the output only
    assert package["weights_stored_bytes"] == traffic["weights_read"]
    assert package["weights_stored_bytes"] <= package["weights_file_bytes"]


def test_gather_reads_only_the_rows_it_returns(tmp_path):
    vocab, hidden = 1000, 64
    table = np.random.default_rng(1).standard_normal((vocab, hidden)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((1,), dtype=types.int32)], opset_version=OPSET)
    def program(token):
        return mb.gather(x=table, indices=token, axis=0)                             # (1, hidden)

    package = audit_package(save(program, tmp_path, "embed"), role="io", compute_units="CPU_AND_GPU")
    assert package["traffic"]["weights_read"] == pytest.approx(hidden * FP16, abs=OP_PARAMETER_BYTES)
    assert package["minimum"]["weights"] >= vocab * hidden * FP16               # stored once, whole
    assert package["flags"] == []                                               # not an ANE package


def test_figures_add_up(tmp_path):
    package = audit_package(save(kv_program("blend"), tmp_path, "blend"), seq_len=S)
    traffic, minimum = package["traffic"], package["minimum"]
    parts = ("weights_read", "state_read", "state_written", "intermediate_written", "intermediate_read", "io")
    assert package["decode_bytes_per_token"] == traffic["total"] == pytest.approx(sum(traffic[k] for k in parts), abs=6)
    assert package["minimum_bytes_per_token"] == minimum["weights"] + minimum["state_read"] + minimum["rows_written"]
    assert package["ratio"] == pytest.approx(package["decode_bytes_per_token"] / package["minimum_bytes_per_token"],
                                             rel=1e-3)
    assert package["dispatches_per_token"] == 1
    assert package["op_histogram"]["slice_by_index"] == 1 and package["states"][0]["bytes"] == minimum["state_read"]


# ---------------------------------------------------------------- the rule table

def test_three_states_flag(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp16)]
                + [mb.StateTensorSpec((1, 64), dtype=types.fp16) for _ in range(3)], opset_version=OPSET)
    def program(x, a, b, c):
        total = x
        for state in (a, b, c):
            total = mb.add(x=total, y=mb.read_state(input=state))
            mb.coreml_update_state(state=state, value=x)
        return total

    flagged = rules_flagged(audit_package(save(program, tmp_path, "three")))
    assert "states-per-package" in flagged


@pytest.mark.parametrize("width, flagged", [(270, True), (256, False)])
def test_state_dim_not_a_multiple_of_32_flags(tmp_path, width, flagged):
    package = audit_package(save(kv_program("rows", (2, HEADS, width, HEAD_DIM)), tmp_path, f"w{width}"))
    assert ("state-dim-32" in rules_flagged(package)) is flagged


def test_runtime_gather_flags_and_constant_index_does_not(tmp_path):
    table = np.arange(32 * 64, dtype=np.float16).reshape(32, 64) / 2048

    @mb.program(input_specs=[mb.TensorSpec((4, 64), dtype=types.fp16), mb.TensorSpec((1,), dtype=types.int32)],
                opset_version=OPSET)
    def program(x, position):
        row = mb.gather(x=table, indices=position, axis=0)                       # runtime index: flagged
        fixed = mb.gather(x=x, indices=np.array([1], np.int32), axis=0)           # constant index: not
        return mb.add(x=row, y=fixed)

    package = audit_package(save(program, tmp_path, "gathers"))
    found = [f["what"] for f in package["flags"] if f["rule"] == "dynamic-gather"]
    assert len(found) == 1 and found[0].startswith("1 gather")


def _masked_scores(mask_value: float, table_rows: int):
    mask = np.where(np.tril(np.ones((table_rows, S), bool)), 0.0, mask_value).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((1, S), dtype=types.fp16), mb.TensorSpec((1,), dtype=types.int32)],
                opset_version=OPSET)
    def program(scores, position):
        return mb.softmax(x=mb.add(x=scores, y=mb.gather(x=mask, indices=position, axis=0)), axis=-1)

    return program


def test_square_table_flags_at_seq_len(tmp_path):
    path = save(_masked_scores(-30000.0, S), tmp_path, "sxs")
    assert "sxs-table" in rules_flagged(audit_package(path, seq_len=S))
    assert "sxs-table" not in rules_flagged(audit_package(path, seq_len=2 * S))
    assert "sxs-table" not in rules_flagged(audit_package(save(_masked_scores(-30000.0, 8), tmp_path, "rows8"),
                                                          seq_len=S))


@pytest.mark.parametrize("mask_value, flagged", [(-65504.0, True), (-np.inf, True), (-30000.0, False)])
def test_mask_constant_beyond_fp16_headroom_flags(tmp_path, mask_value, flagged):
    package = audit_package(save(_masked_scores(mask_value, 8), tmp_path, "mask"))
    assert ("mask-overflow" in rules_flagged(package)) is flagged


def _fp32_program():
    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp32)], opset_version=OPSET)
    def program(x):
        return mb.softmax(x=mb.mul(x=x, y=np.float32(0.5)), axis=-1)
    return program


def test_fp32_compute_flags_in_a_shard_only(tmp_path):
    path = save(_fp32_program(), tmp_path, "fp32", precision=ct.precision.FLOAT32)
    shard = audit_package(path, role="shard", compute_units="CPU_AND_NE")
    assert "non-fp16-compute" in rules_flagged(shard)
    assert "fp32 mul x1, fp32 softmax x1" in next(f["what"] for f in shard["flags"] if f["rule"] == "non-fp16-compute")
    sampler = audit_package(path, role="sampler", compute_units="CPU_AND_GPU")   # not on the ANE: no ANE rules
    assert "non-fp16-compute" not in rules_flagged(sampler)


def test_rank_above_5_flags(tmp_path):
    # Core ML refuses rank-6 values at conversion, but not a rank-6 constant: a LUT has its
    # indices' rank + 2, so a conv weight's (rank 4) LUT has rank 6.
    indices = np.zeros((8, 32, 1, 1), dtype=types.np_uint4_dtype)
    lut = np.linspace(-1, 1, 16, dtype=np.float16).reshape(1, 1, 1, 1, 16, 1)

    @mb.program(input_specs=[mb.TensorSpec((1, 32, 1, 1), dtype=types.fp16)], opset_version=OPSET)
    def program(x):
        return mb.conv(x=x, weight=mb.constexpr_lut_to_dense(indices=indices, lut=lut))

    assert "rank" in rules_flagged(audit_package(save(program, tmp_path, "rank6")))


def test_shift_state_update_flags(tmp_path):
    state_shape = (1, 32, 64)

    @mb.program(input_specs=[mb.TensorSpec((1, 1, 64), dtype=types.fp16),
                             mb.StateTensorSpec(state_shape, dtype=types.fp16)], opset_version=OPSET)
    def program(row, window):
        cache = mb.read_state(input=window)
        older = mb.slice_by_index(x=cache, begin=[0, 1, 0], end=[1, 32, 64])           # drop the oldest row
        mb.coreml_update_state(state=window, value=mb.concat(values=[older, row], axis=1))
        return mb.reduce_sum(x=cache, axes=[1])

    assert "shift-state-update" in rules_flagged(audit_package(save(program, tmp_path, "shift")))


def test_last_axis_padding_flags_a_large_column(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((4096,), dtype=types.fp16)], opset_version=OPSET)
    def program(x):
        column = mb.mul(x=mb.reshape(x=x, shape=[4096, 1]), y=np.float16(3))        # 8 KB padded to 256 KB
        return mb.reshape(x=column, shape=[4096])

    package = audit_package(save(program, tmp_path, "column"))
    assert [f["severity"] for f in package["flags"] if f["rule"] == "last-axis-padding"] == ["info"]


def test_layers_and_size_limits(tmp_path, monkeypatch):
    path = save(_masked_scores(-30000.0, 8), tmp_path, "small")
    assert "layers-per-shard" in rules_flagged(audit_package(path, layers=(0, rules.MAX_LAYERS_PER_SHARD)))
    assert "layers-per-shard" not in rules_flagged(audit_package(path, layers=(1, rules.MAX_LAYERS_PER_SHARD)))
    assert "package-size" not in rules_flagged(audit_package(path))
    monkeypatch.setattr(rules, "MAX_ANE_PACKAGE_BYTES", 1000)
    assert "package-size" in rules_flagged(audit_package(path))


def test_every_rule_has_a_source_and_a_known_severity():
    assert len(rules.RULES) >= 12
    for rule in rules.RULES:
        assert rule.severity in ("warn", "info") and rule.scope in ("ane", "all"), rule.id
        assert rule.source and all(part.strip().startswith(("https://", "docs/")) for part in rule.source.split(";"))


# ---------------------------------------------------------------- variables

def test_ane_min_residency_is_validated(tmp_path):
    assert check_residency(None) is None and check_residency("") is None
    assert check_residency("0.99") == 0.99 and check_residency(1) == 1.0 and check_residency(0.0) == 0.0
    for bad in (True, "abc", "1.5", -0.1, float("nan"), "inf", [0.9]):
        with pytest.raises(BuildError, match="ANE_MIN_RESIDENCY"):
            check_residency(bad)
    with pytest.raises(BuildError, match="unknown audit variable"):
        request_from_vars(None, {"REPORT": "x"}, environ={})
    request = request_from_vars(None, {"AUDIT_REPORT": str(tmp_path / "a.json"), "ANE_MIN_RESIDENCY": "0.5"},
                                environ={})
    assert request == AuditRequest(tmp_path / "a.json", 0.5)
    assert AUDIT_VARS == ("ANE_MIN_RESIDENCY", "AUDIT_REPORT")


def test_residency_gate_fails_only_ane_packages_below_the_threshold(monkeypatch):
    """The gate's logic, with Core ML's answers given (the plan itself needs macOS)."""
    from qwen3build.audit import macos
    from qwen3build.audit.report import format_report
    from qwen3build.audit.run import compute_plan_section

    def plan(share, off):
        return {"compute_ops": 100, "ane_ops": round(100 * share), "share": share,
                "functions": {"main": {"off_ane": [{"op": op, "output": op, "device": "CPU", "cost": None}
                                                   for op in off]}}}

    plans = {"shard.mlpackage": plan(0.97, ["ios18.add", "ios18.add", "ios18.concat"]),
             "io.mlpackage": plan(0.10, ["ios18.gather"])}
    monkeypatch.setattr(macos, "SUPPORTED", True)
    monkeypatch.setattr(macos, "compute_plan", lambda path, units: plans[Path(path).name])
    report = {"stack": {"models_dir": "/stack"},
              "packages": [{"name": "io.mlpackage", "compute_units": "CPU_AND_GPU"},
                           {"name": "shard.mlpackage", "compute_units": "CPU_AND_NE"}]}
    section, failures = compute_plan_section(report, 0.99)
    assert section == plans
    assert failures == ["shard.mlpackage: 97.0% of compute ops on the Neural Engine, below ANE_MIN_RESIDENCY=0.99 "
                        "(off: ios18.add x2, ios18.concat x1)"]
    assert compute_plan_section(report, 0.95)[1] == [] and compute_plan_section(report, None)[1] == []
    shown = format_report({"stack": {"models_dir": "/stack", "seq_len": 8, "recipe": "fp16", "layout": "a:0-0",
                                     "package_bytes": 0, "decode_bytes_per_token": 0, "minimum_bytes_per_token": 0,
                                     "ratio": None, "dispatches_per_token": 0, "decode_chain": [],
                                     "weights_stored_bytes": 0, "state_bytes": 0, "rows_bytes": 0,
                                     "traffic": dict.fromkeys(("weights_read", "state_read", "state_written",
                                                               "intermediate_written", "intermediate_read", "io"), 0)},
                           "packages": [], "flags": [], "compute_plan": section, "failures": failures, "seconds": 0.1})
    assert "compute plan: shard.mlpackage 97.0% of 100 compute ops on the Neural Engine; not: ios18.add, " \
           "ios18.concat" in shown and "FAILED: shard.mlpackage" in shown


@pytest.mark.skipif(sys.platform != "darwin",
                    reason="MLComputePlan needs macOS 14.4+: coremltools cannot load a compute plan on Linux")
def test_compute_plan_reports_ane_share(tmp_path):
    from qwen3build.audit import macos
    path = save(kv_program("rows"), tmp_path, "plan")
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    plan = macos.compute_plan(path, "CPU_AND_NE")
    assert 0.0 <= plan["share"] <= 1.0 and plan["compute_ops"] > 0
    assert plan["ane_ops"] + sum(len(f["off_ane"]) for f in plan["functions"].values()) == plan["compute_ops"]
    assert before == {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}   # package untouched


# ---------------------------------------------------------------- `doit audit` on a built stack

def test_doit_audit_report_is_consistent_and_up_to_date(workspace):
    first = workspace.doit("audit")
    report_path = workspace.root / "artifacts" / "audit" / "audit.json"
    report = json.loads(report_path.read_text())
    stack_info = json.loads((workspace.out_dir / "stack.json").read_text())
    stack = report["stack"]
    for key in ("decode_bytes_per_token", "minimum_bytes_per_token", "ratio", "dispatches_per_token"):
        assert key in stack, key
    assert "audit of" in first.stdout and "min MB/token" in first.stdout

    # embed + every shard + lm_head + sampler, counted from stack.json
    assert stack["dispatches_per_token"] == 1 + len(stack_info["shards"]) + 1 + 1
    names = [p["name"] for p in report["packages"]]
    assert names == [stack_info["io_model"], *[s["package"] for s in stack_info["shards"]], stack_info["sampler"]]
    assert stack["decode_bytes_per_token"] == sum(p["decode_bytes_per_token"] for p in report["packages"])
    assert stack["minimum_bytes_per_token"] == (stack["weights_stored_bytes"] + stack["state_bytes"]
                                                + stack["rows_bytes"])
    assert stack["ratio"] == pytest.approx(stack["decode_bytes_per_token"] / stack["minimum_bytes_per_token"],
                                           rel=1e-3)
    for package, shard in zip(report["packages"][1:-1], stack_info["shards"]):
        assert package["layers"]["count"] == shard["last"] - shard["first"] + 1
        assert [s["shape"][2] for s in package["states"]] == [stack_info["seq_len"]]
        assert package["minimum"]["rows_written"] * stack_info["seq_len"] == package["minimum"]["state_read"]
        assert package["state_update"] in ("in-place rows", "full rewrite")
    io_model = report["packages"][0]
    assert [f["name"] for f in io_model["functions"] if f["decode"]] == ["embed", "lm_head"]
    # prefill: embed_prefill + every shard's prefill per block of PREFILL_LEN prompt tokens
    prefill, block = stack["prefill"], stack_info["prefill_len"]
    assert block > 0 and prefill["prefill_len"] == block
    assert prefill["chain"] == [f"{io_model['name']}:embed_prefill",
                                *[f"{s['package']}:prefill" for s in stack_info["shards"]]]
    assert prefill["dispatches_per_prompt_token"] == pytest.approx((1 + len(stack_info["shards"])) / block, abs=1e-6)
    calling = [p for p in report["packages"] if p["prefill"]]
    assert prefill["bytes_per_call"] == sum(p["prefill"]["bytes_per_call"] for p in calling)
    for package in report["packages"][1:-1]:   # a shard reads its weights and its state once per block, not per token
        assert package["prefill"]["function"] == "prefill"
        assert package["prefill"]["bytes_per_prompt_token"] < package["decode_bytes_per_token"]
        assert [f["name"] for f in package["functions"] if f["prefill"]] == ["prefill"]
    assert report["packages"][-1]["prefill"] is None   # the sampler takes no part
    assert "prefill MB/prompt token" in first.stdout and "per prompt token (prefill blocks of" in first.stdout
    assert io_model["weights_stored_bytes"] <= io_model["weights_file_bytes"]   # the shared table counted once
    if sys.platform != "darwin":
        assert "macOS" in report["compute_plan"]["skipped"]

    again = workspace.doit("audit")
    assert "-- audit" in again.stdout                                # up to date: not run again
    assert json.loads(report_path.read_text())["key"] == report["key"]


@pytest.mark.slow
def test_doit_audit_reruns_after_a_rebuild_and_refuses_a_bad_residency(workspace):
    report_path = workspace.root / "artifacts" / "audit" / "audit.json"
    workspace.doit("audit")
    key = json.loads(report_path.read_text())["key"]
    workspace.doit("audit", SEQ_LEN="64")                             # a rebuild reruns it
    rebuilt = json.loads(report_path.read_text())
    assert rebuilt["stack"]["seq_len"] == 64 and rebuilt["key"] != key

    bad = workspace.doit("audit", check=False, SEQ_LEN="64", ANE_MIN_RESIDENCY="1.5")
    assert bad.returncode != 0
    lines = [line for line in (bad.stdout + bad.stderr).splitlines() if "ANE_MIN_RESIDENCY" in line]
    assert lines and lines[0].startswith("qwen3build: ANE_MIN_RESIDENCY='1.5' must be a number from 0 to 1")
    assert "Traceback" not in bad.stdout + bad.stderr

    if sys.platform != "darwin":                                      # the gate needs macOS: noted, not failed
        gated = workspace.doit("audit", SEQ_LEN="64", ANE_MIN_RESIDENCY="0.99")
        noted = json.loads(report_path.read_text())
        assert noted["passed"] and "was not checked" in noted["compute_plan"]["skipped"]
        assert "compute plan: skipped" in gated.stdout


def test_audit_cli_reads_any_published_stack(built_stack, tmp_path):
    report_path = tmp_path / "cli.json"
    result = subprocess.run([sys.executable, "-m", "qwen3build.audit", "--models-dir", str(built_stack.out_dir),
                             "--report", str(report_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["stack"]["dispatches_per_token"] == len(report["packages"]) + 1   # io_model runs twice
    missing = subprocess.run([sys.executable, "-m", "qwen3build.audit", "--models-dir", str(tmp_path / "none")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("qwen3build: models dir")
