"""The rule table: things known, or likely, to keep work off the Neural Engine or to fail
there, each with the source it comes from (docs/audit.md lists them with the reasoning).

A rule is data: an id, a severity ("warn": known or likely to cost ANE residency, speed or
correctness; "info": worth knowing, not known to fail), a scope ("ane": only packages
whose compute units include the Neural Engine; "all"), one line saying what it flags, its
source, and a check that returns findings (one line each) for one package. Thresholds are
named constants with their reason.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Callable

import numpy as np

from .program import CONSTEXPR_PREFIX, Constant, Function, Package, walk
from .traffic import GATHER_OPS, STATE_WRITE_OPS, VIEW_OPS, Traffic, is_runtime

# ~15 layers per package is the ANE compile-stability ceiling seen in the field (17 worked
# once, 20 did not: DESIGN section 4).
MAX_LAYERS_PER_SHARD = 15
# CoreML-LLM's rule of thumb: packages above ~1.0-1.4 GB silently fall back to the GPU on
# iOS; flag at the low end.
MAX_ANE_PACKAGE_BYTES = 1_000_000_000
# 1-2 states per package ran on the ANE; 3 compiled, then failed at predict time.
MAX_STATES_PER_PACKAGE = 2
# coremltools#2631: a state whose width was 270 failed on the ANE, 256 worked.
STATE_DIM_MULTIPLE = 32
STATE_DIMS_CHECKED = 2          # the last two axes (the ANE's height and width)
MAX_ANE_RANK = 5
# Apple's ANE mask value is -40000: finite in fp16 and exp() of it is 0. Anything larger in
# magnitude leaves less than 65504 - 40000 of headroom: -65504 plus any negative score
# overflows to -inf, which the ANE mishandles in softmax.
MASK_MAGNITUDE_LIMIT = 40000.0
ANE_DATA_TYPES = frozenset({"FLOAT16", "INT8", "INT16"})
FLOAT_DATA_TYPES = frozenset({"FLOAT16", "FLOAT32", "FLOAT64", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E5M2"})
# The ANE pads the last axis to 64 bytes; flag a tensor when that padding adds at least
# this much (a (1, 4096, 1) fp16 column pads 8 KB to 256 KB; small vectors are not worth a line).
LAST_AXIS_BYTES = 64
PADDING_FLAG_BYTES = 64 * 1024
EXAMPLES_PER_FLAG = 4           # a finding names at most this many ops, then counts the rest
WEIGHT_PARAMETERS = {"linear": ("weight",), "conv": ("weight",), "conv_transpose": ("weight",), "matmul": ("x", "y")}


@dataclasses.dataclass
class Subject:
    """One package under audit and what the rules need to know about it."""

    name: str
    package: Package
    role: str                      # io / entry / interior / exit / sampler, or a caller's own
    compute_units: str             # CPU_AND_NE, CPU_AND_GPU, ALL, ...
    functions: list                # the functions one decode token calls
    traffic: dict                  # function name -> Traffic
    layers: int | None = None      # decoder layers in the package (shards)
    seq_len: int | None = None     # the stack's SEQ_LEN (S x S tables)

    @property
    def on_ane(self) -> bool:
        return self.compute_units in ("CPU_AND_NE", "ALL")

    def audited(self):
        return [(name, self.package.functions[name]) for name in self.functions]


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    severity: str                  # "warn" or "info"
    scope: str                     # "ane" or "all"
    what: str
    source: str
    check: Callable[[Subject], list]

    def applies(self, subject: Subject) -> bool:
        return self.scope == "all" or subject.on_ane

    def to_dict(self) -> dict:
        return {"id": self.id, "severity": self.severity, "scope": self.scope, "what": self.what,
                "source": self.source}


# ---------------------------------------------------------------- helpers

def _examples(items: list[str], noun: str) -> list[str]:
    if not items:
        return []
    shown = ", ".join(items[:EXAMPLES_PER_FLAG])
    more = f" and {len(items) - EXAMPLES_PER_FLAG} more" if len(items) > EXAMPLES_PER_FLAG else ""
    return [f"{len(items)} {noun}: {shown}{more}"]


def _prefix(subject: Subject, function_name: str) -> str:
    return f"{function_name}: " if len(subject.package.functions) > 1 else ""


def _all_states(subject: Subject) -> dict:
    states = {}
    for _, function in subject.audited():
        states.update(function.states)
    return states


def _producers(function: Function) -> dict:
    return {name: op for op in walk(function.operations) for name, _ in op.outputs}


def _constant_keys(function: Function, name, producers: dict) -> set:
    """The stored constants a value is made from, through views and constexpr ops."""
    if isinstance(name, Constant):
        return {name.key}
    if name in function.constants:
        return {function.constants[name].key}
    op = producers.get(name)
    if op is None:
        return set()
    if op.type.startswith(CONSTEXPR_PREFIX):
        return {key for args in op.inputs.values() for a in args for key in _constant_keys(function, a, producers)}
    if op.type in VIEW_OPS:
        return _constant_keys(function, op.argument("x"), producers)
    return set()


def _constant_values(function: Function):
    """(label, Constant) for every constant of the function, inline ones included."""
    for name, constant in function.constants.items():
        yield name, constant
    for op in walk(function.operations):
        for parameter, arguments in op.inputs.items():
            for argument in arguments:
                if isinstance(argument, Constant):
                    yield f"{op.name}.{parameter}", argument


def _values(function: Function):
    """(name, TensorType) of every tensor the function holds: inputs, states, op outputs."""
    yield from function.inputs.items()
    yield from function.states.items()
    for op in walk(function.operations):
        for name, tensor_type in op.outputs:
            if tensor_type is not None:
                yield name, tensor_type


# ---------------------------------------------------------------- checks

def _layers_per_shard(subject: Subject) -> list:
    if subject.layers is not None and subject.layers > MAX_LAYERS_PER_SHARD:
        return [f"{subject.layers} layers in one package (ceiling ~{MAX_LAYERS_PER_SHARD}); split the shard"]
    return []


def _package_size(subject: Subject) -> list:
    size = subject.package.file_bytes
    if size > MAX_ANE_PACKAGE_BYTES:
        return [f"{size / 1e9:.2f} GB on disk (limit ~{MAX_ANE_PACKAGE_BYTES / 1e9:.1f} GB); use more shards "
                "or fewer bits"]
    return []


def _states_per_package(subject: Subject) -> list:
    states = _all_states(subject)
    if len(states) > MAX_STATES_PER_PACKAGE:
        return [f"{len(states)} states ({', '.join(sorted(states))}); at most {MAX_STATES_PER_PACKAGE} are "
                "reliable; merge them into one buffer"]
    return []


def _state_dims(subject: Subject) -> list:
    found = []
    for name, tensor_type in sorted(_all_states(subject).items()):
        odd = [d for d in tensor_type.shape[-STATE_DIMS_CHECKED:] if d is None or d % STATE_DIM_MULTIPLE]
        if odd:
            found.append(f"state {name} {tensor_type.describe()}: {', '.join(map(str, odd))} not a multiple "
                         f"of {STATE_DIM_MULTIPLE}")
    return found


def _dynamic_gathers(subject: Subject) -> list:
    items = []
    for function_name, function in subject.audited():
        for op in walk(function.operations):
            if op.type not in GATHER_OPS:
                continue
            indices = op.argument("indices")
            if not (is_runtime(indices) and indices not in function.constants):
                continue
            x = op.argument("x")
            x_type = x.type if isinstance(x, Constant) else (
                function.constants[x].type if x in function.constants else function.types.get(x))
            table = f"{x if isinstance(x, str) else 'a constant'} {x_type.describe() if x_type else ''}".strip()
            items.append(f"{_prefix(subject, function_name)}{op.name} ({op.type} of {table})")
    return _examples(items, "gather(s) at a runtime index")


def _dtype_compute(subject: Subject, wanted) -> list:
    """One finding: the compute ops whose output dtype `wanted` accepts, counted by dtype and type."""
    counts, names = Counter(), []
    for function_name, function in subject.audited():
        for op in walk(function.operations):
            if op.type.startswith(CONSTEXPR_PREFIX) or op.type in VIEW_OPS:
                continue
            for name, tensor_type in op.outputs[:1]:
                if tensor_type is not None and wanted(tensor_type.dtype):
                    counts[(tensor_type.short_dtype, op.type)] += 1
                    names.append(f"{_prefix(subject, function_name)}{name}")
    if not counts:
        return []
    kinds = ", ".join(f"{dtype} {op_type} x{n}" for (dtype, op_type), n in sorted(counts.items()))
    return [f"{len(names)} ops ({kinds}): {', '.join(names[:EXAMPLES_PER_FLAG])}"
            + (f" and {len(names) - EXAMPLES_PER_FLAG} more" if len(names) > EXAMPLES_PER_FLAG else "")]


def _float_not_fp16(subject: Subject) -> list:
    return _dtype_compute(subject, lambda dtype: dtype in FLOAT_DATA_TYPES and dtype not in ANE_DATA_TYPES)


def _integer_compute(subject: Subject) -> list:
    return _dtype_compute(subject, lambda dtype: dtype not in FLOAT_DATA_TYPES and dtype not in ANE_DATA_TYPES)


def _rank(subject: Subject) -> list:
    items = []
    for function_name, function in subject.audited():
        seen = set()
        for name, tensor_type in _values(function):
            if tensor_type.rank > MAX_ANE_RANK and name not in seen:
                seen.add(name)
                items.append(f"{_prefix(subject, function_name)}{name} {tensor_type.describe()}")
        for label, constant in _constant_values(function):
            if constant.type.rank > MAX_ANE_RANK and constant.key not in seen:
                seen.add(constant.key)
                items.append(f"{_prefix(subject, function_name)}{label} {constant.type.describe()}")
    return _examples(items, f"tensor(s) of rank > {MAX_ANE_RANK}")


def _mask_constants(subject: Subject) -> list:
    """Float constants (LUT entries included) beyond +-MASK_MAGNITUDE_LIMIT or not finite;
    projection weights are skipped (they are not added to scores)."""
    items, seen = [], set()
    for function_name, function in subject.audited():
        producers = _producers(function)
        weights = set()
        for op in walk(function.operations):
            for parameter in WEIGHT_PARAMETERS.get(op.type, ()):
                weights |= _constant_keys(function, op.argument(parameter), producers)
        for label, constant in _constant_values(function):
            if constant.key in seen or constant.key in weights:
                continue
            seen.add(constant.key)
            values = constant.float_values()
            if values is None or values.size == 0:
                continue
            finite = np.isfinite(values)
            worst = float(np.max(np.abs(values[finite]))) if finite.any() else math.inf
            if not finite.all() or worst > MASK_MAGNITUDE_LIMIT:
                smallest = float(np.min(values))
                items.append(f"{_prefix(subject, function_name)}{label} {constant.type.describe()} holds "
                             f"{smallest:g}" + ("" if finite.all() else " (not finite)"))
    return _examples(items, f"constant(s) beyond +-{MASK_MAGNITUDE_LIMIT:g}")


def _square_tables(subject: Subject) -> list:
    if not subject.seq_len:
        return []
    items, seen = [], set()
    for function_name, function in subject.audited():
        candidates = [(name, c.type, c.stored_bytes) for name, c in function.constants.items()]
        for op in walk(function.operations):
            if op.type.startswith(CONSTEXPR_PREFIX):
                stored = sum(c.stored_bytes for args in op.inputs.values() for c in args if isinstance(c, Constant))
                stored += sum(function.constants[a].stored_bytes for a in op.input_names()
                              if a in function.constants)
                candidates.extend((name, t, stored) for name, t in op.outputs if t is not None)
        for name, tensor_type, stored in candidates:
            if name in seen or sum(1 for d in tensor_type.shape if d == subject.seq_len) < 2:
                continue
            seen.add(name)
            items.append(f"{_prefix(subject, function_name)}{name} {tensor_type.describe()} "
                         f"({stored / 1e6:.2f} MB stored)")
    return _examples(items, f"S x S table(s) (S = {subject.seq_len})")


def _full_state_writes(subject: Subject) -> list:
    items = []
    for function_name, _ in subject.audited():
        traffic: Traffic = subject.traffic[function_name]
        if traffic.full_state_writes:
            items.append(f"{_prefix(subject, function_name)}{traffic.full_state_writes} state write(s) of the whole "
                         "buffer per token instead of the new rows")
    return items


def _shift_updates(subject: Subject) -> list:
    items = []
    for function_name, function in subject.audited():
        producers = _producers(function)
        state_views = set(function.states)
        for op in walk(function.operations):   # values that are (parts of) a state buffer
            if op.type in VIEW_OPS | {"slice_by_index", "slice_by_size"} and op.argument(
                    "input" if op.type == "read_state" else "x") in state_views:
                state_views.update(name for name, _ in op.outputs)
        for op in walk(function.operations):
            if op.type not in STATE_WRITE_OPS:
                continue
            value = producers.get(op.argument(STATE_WRITE_OPS[op.type][1]))
            if value is not None and value.type in ("concat", "stack") and any(
                    a in state_views for a in value.input_names()):
                items.append(f"{_prefix(subject, function_name)}{value.type} {value.name} shifts the state it writes")
    return items


def _last_axis_padding(subject: Subject) -> list:
    items, seen = [], set()
    for function_name, function in subject.audited():
        for name, tensor_type in _values(function):
            if name in seen or not tensor_type.shape or tensor_type.shape[-1] is None:
                continue
            seen.add(name)
            width = max(1, tensor_type.shape[-1])
            rows = tensor_type.numel // width                   # every index of the leading axes
            row_bytes = tensor_type.nbytes / max(1, rows)
            if row_bytes < LAST_AXIS_BYTES and rows * LAST_AXIS_BYTES - tensor_type.nbytes >= PADDING_FLAG_BYTES:
                items.append(f"{_prefix(subject, function_name)}{name} {tensor_type.describe()} "
                             f"(pads {tensor_type.nbytes / 1e3:.0f} KB to {rows * LAST_AXIS_BYTES / 1e3:.0f} KB)")
    return _examples(items, f"tensor(s) with a last axis under {LAST_AXIS_BYTES} bytes")


def _dynamic_shapes(subject: Subject) -> list:
    items = []
    for function_name, function in subject.audited():
        items.extend(f"{_prefix(subject, function_name)}{name} {t.describe()}"
                     for name, t in _values(function) if not t.static)
    return _examples(items, "value(s) without a static shape")


# ---------------------------------------------------------------- the table
# Sources: CoreML-LLM = https://github.com/john-rocky/CoreML-LLM (docs/); Apple ANE rules =
# https://github.com/apple/coreai-models skills/skills/model-authoring/references/neural_engine_rules.md
CORE_ML_LLM = "https://github.com/john-rocky/CoreML-LLM/blob/main/docs/"
APPLE_ANE_RULES = ("https://github.com/apple/coreai-models/blob/main/skills/skills/model-authoring/references/"
                   "neural_engine_rules.md")
ANEMLL_QWEN = "https://github.com/Anemll/Anemll/blob/main/anemll/models/qwen_model.py"

RULES = (
    # CoreML-LLM: ">15 layers per chunk can hang the compiler" (AUDIO.md); "ANE compiler hangs with
    # 15+ layers per chunk" (LITERT_RUNTIME_ANALYSIS.md); "~15 layers historically" (CHUNK_CONSOLIDATION_BENCH.md).
    Rule("layers-per-shard", "warn", "ane", f"more than {MAX_LAYERS_PER_SHARD} decoder layers in one package",
         f"{CORE_ML_LLM}AUDIO.md; {CORE_ML_LLM}LITERT_RUNTIME_ANALYSIS.md; {CORE_ML_LLM}CHUNK_CONSOLIDATION_BENCH.md",
         _layers_per_shard),
    # CoreML-LLM DECODE_STATE_LAYOUTS.md section 2: "if du -sh model.mlpackage > ~1.0-1.4 GB, you will hit
    # silent GPU fallback on iPhone ANE"; QWEN35_LESSONS.md 3.2: single-mlpackage ANE budget ~1.4 GB.
    Rule("package-size", "warn", "ane", f"package above {MAX_ANE_PACKAGE_BYTES / 1e9:.1f} GB on disk",
         f"{CORE_ML_LLM}DECODE_STATE_LAYOUTS.md; {CORE_ML_LLM}QWEN35_LESSONS.md", _package_size),
    # CoreML-LLM QWEN35_LESSONS.md 9.1: 3 StateTypes per chunk compiled, 100% ANE in the plan, then
    # "ANEProgramProcessRequestDirect Error=(11)" at predict; 1 (Qwen3-VL) and 2 (Gemma 4) ran.
    Rule("states-per-package", "warn", "ane", f"more than {MAX_STATES_PER_PACKAGE} states in one package",
         f"{CORE_ML_LLM}QWEN35_LESSONS.md; {CORE_ML_LLM}LFM2_CONVERSION_FINDINGS.md", _states_per_package),
    # coremltools#2631: a stateful model fails on the ANE when a state dimension is not a multiple of
    # 32 (the report varies the width: 270 failed, 256 worked). The last two axes are checked.
    Rule("state-dim-32", "warn", "ane", f"a state's last {STATE_DIMS_CHECKED} dimensions not multiples of "
         f"{STATE_DIM_MULTIPLE}", "https://github.com/apple/coremltools/issues/2631", _state_dims),
    # Apple ANE rules, RoPE: "Do not index a 2D table inside the graph with position_ids"; CoreML-LLM
    # RELEASE_v1_1_0.md keeps the embedding gather out of Core ML ("CoreML never loads the 1 GB gather").
    Rule("dynamic-gather", "warn", "ane", "gather from a table at a runtime index",
         f"{APPLE_ANE_RULES}; {CORE_ML_LLM}RELEASE_v1_1_0.md", _dynamic_gathers),
    # Apple ANE rules: "Supported dtypes: fp16, int8, int16. fp32 falls back to GPU/CPU."
    Rule("non-fp16-compute", "warn", "ane", "floating-point compute at a precision other than fp16",
         APPLE_ANE_RULES, _float_not_fp16),
    # Same rule: int32 / bool ops (index arithmetic on the position) are not ANE types either; they are
    # tiny, but each run of them is a CPU segment between ANE segments.
    Rule("int-compute", "info", "ane", "integer or bool compute (not an ANE data type)",
         APPLE_ANE_RULES, _integer_compute),
    # Apple ANE rules: "Max tensor rank: 5. Rank-6+ intermediates are rejected." (a LUT's rank is its
    # indices' rank + 2: coreai-models segmentation/pipeline.py met rank-6 LUTs).
    Rule("rank", "warn", "ane", f"a tensor or constant of rank above {MAX_ANE_RANK}", APPLE_ANE_RULES, _rank),
    # Apple ANE rules, causal mask: -40000.0, "NOT float('-inf')", because the ANE "does not handle IEEE
    # -inf correctly in softmax" (common_issues.md). -65504 + any negative score overflows fp16 to -inf.
    Rule("mask-overflow", "warn", "ane", f"float constant beyond +-{MASK_MAGNITUDE_LIMIT:g} or not finite",
         f"{APPLE_ANE_RULES}; https://github.com/apple/coreai-models/blob/main/skills/skills/model-authoring/"
         "references/common_issues.md", _mask_constants),
    # This project (docs/audit.md): a decode step reads one row of an S x S mask / write table, but the
    # package stores S^2 entries; ANEMLL passes causal_mask and current_pos as inputs instead.
    Rule("sxs-table", "warn", "all", "constant table with two axes of length SEQ_LEN",
         f"docs/audit.md; {ANEMLL_QWEN}", _square_tables),
    # ANEMLL writes only the new K/V rows (kv_cache[idx:idx+1, :, pos:pos+1, :] = ...); coremltools'
    # canonicalize_inplace_pattern / prefer_state_in_downstream passes exist to keep such writes in place.
    Rule("full-state-write", "warn", "all", "state rewritten whole every token (not just the new rows)",
         f"{ANEMLL_QWEN}; https://github.com/apple/coremltools/blob/main/coremltools/converters/mil/mil/passes/"
         "defs/optimize_state.py", _full_state_writes),
    # CoreML-LLM DECODE_STATE_LAYOUTS.md section 3: a shift-based cat([K[:, :, 1:], k]) state update was
    # rejected by the ANE compiler (error -14) for Qwen3 with state.
    Rule("shift-state-update", "warn", "ane", "state written from a concat/stack of its own slices (shift)",
         f"{CORE_ML_LLM}DECODE_STATE_LAYOUTS.md", _shift_updates),
    # Apple ANE rules, tensor memory alignment: the last axis is padded to 64 bytes ("A singleton last axis
    # ... 32x memory cost at fp16").
    Rule("last-axis-padding", "info", "ane", f"last axis under {LAST_AXIS_BYTES} bytes on a large tensor",
         APPLE_ANE_RULES, _last_axis_padding),
    # Apple ANE rules: "Fully static shapes"; CoreML-LLM SPEED_8K.md: "RangeDim falls back to GPU/CPU".
    Rule("dynamic-shape", "warn", "ane", "a value without a static shape",
         f"{APPLE_ANE_RULES}; {CORE_ML_LLM}SPEED_8K.md", _dynamic_shapes),
)
RULE_IDS = tuple(rule.id for rule in RULES)
assert len(set(RULE_IDS)) == len(RULE_IDS), "rule ids must be unique"


def check(subject: Subject) -> list[dict]:
    """Every finding of every rule that applies to the package, in table order."""
    flags = []
    for rule in RULES:
        if not rule.applies(subject):
            continue
        for what in rule.check(subject):
            flags.append({"rule": rule.id, "severity": rule.severity, "package": subject.name, "what": what})
    return flags
