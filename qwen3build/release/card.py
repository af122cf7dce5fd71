"""The model card (README.md of a release): card.md filled from the reports.

Every number comes from a report the build wrote about exactly these packages: the verify
report (parity), the audit report (sizes, states, functions, traffic, dispatches), the
stack description (architecture, layout, compute units, recipe allocation) and the
packages' own declared interfaces. Prose is in card.md; this module only renders data.
Nothing here may print a path of this machine or a cache key: the bundle is checked for
both before it is published (bundle.py).
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path

from ..errors import BuildError
from ..settings.model_config import PROJECTIONS
from .inputs import OTHER_LICENSE, UNKNOWN_LICENSE, UNVERIFIED_BECAUSE, ReleaseInputs

TEMPLATE_PATH = Path(__file__).with_name("card.md")
MB = 1e6
PIPELINE_TAG = "text-generation"
BASE_TAGS = ("coreml", "apple-neural-engine", "qwen3", "mlstate", "split-model")
SWIFT_UNITS = {"CPU_AND_GPU": ".cpuAndGPU", "CPU_AND_NE": ".cpuAndNeuralEngine", "ALL": ".all",
               "CPU_ONLY": ".cpuOnly"}
UNIT_NAMES = {"CPU_AND_GPU": "CPU + GPU", "CPU_AND_NE": "CPU + Neural Engine", "ALL": "all", "CPU_ONLY": "CPU"}
SHORT_DTYPES = {"float16": "fp16", "float32": "fp32", "float64": "fp64"}
BACKEND_TEXT = {
    "evaluator": ("qwen3build's numpy evaluator of the saved ML Programs (the packages' bytes and fp16 "
                  "numerics, not a device)"),
    "coreml": "Apple's Core ML runtime on a Mac, with the compute units listed above",
}
# The runtime contract the Swift snippet (and qwen3build run) relies on: function -> names.
CONTRACT = {
    "embed": ({"input_ids"}, {"hidden_states"}),
    "lm_head": ({"hidden_states"}, {"logits"}),
    "shard": ({"hidden_states", "position"}, {"output_hidden_states"}),
}


def template_text() -> str:
    return TEMPLATE_PATH.read_text()


# ---------------------------------------------------------------- number formats

def _count(value: int) -> str:
    return f"{int(value):,}"


def _mb(value: float) -> str:
    return f"{value / MB:.2f} MB" if value >= 0.1 * MB else f"{value / MB:.4f} MB"


def _bytes(value: int) -> str:
    return f"{_count(value)} ({_mb(value)})"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _theta(value: float) -> str:
    return _count(value) if float(value).is_integer() else f"{value:g}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _dtype(dtype) -> str:
    name = str(getattr(dtype, "name", dtype))
    return SHORT_DTYPES.get(name, name)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# ---------------------------------------------------------------- the parts

def package_rows(inputs: ReleaseInputs) -> list[dict]:
    """One entry per package in decode order, joined with its audit figures."""
    stack = inputs.stack
    audited = {p["name"]: p for p in inputs.audit["packages"]}
    rows = [{"package": stack.info["io_model"], "artifact": "io_model", "role": "embedding + LM head", "layers": None}]
    for shard in stack.shards:
        rows.append({"package": shard["package"], "artifact": f"shard:{shard['name']}",
                     "role": f"decoder shard ({shard['role']})", "layers": (shard["first"], shard["last"])})
    rows.append({"package": stack.info["sampler"], "artifact": "sampler_model", "role": "sampler", "layers": None})
    for row in rows:
        if row["package"] not in audited:
            raise BuildError(f"the audit report has no figures for {row['package']}; run `doit audit` again")
        row["audit"] = audited[row["package"]]
        row["units"] = stack.info.get("compute_units", {}).get(row["package"], row["audit"]["compute_units"])
    return rows


def front_matter(inputs: ReleaseInputs) -> str:
    license_ = inputs.license
    lines = [f"license: {license_.id}"]
    if license_.id == OTHER_LICENSE and license_.files:
        # The Hub asks a name and a link for a licence outside its list: the file shipped here.
        name = re.sub(r"[^a-z0-9]+", "-", f"{inputs.model_name}-license".lower()).strip("-")
        lines += [f"license_name: {name}", f"license_link: {json.dumps(license_.files[0])}"]
    if inputs.base_model:
        lines.append(f"base_model: {json.dumps(inputs.base_model)}")
    lines.append(f"pipeline_tag: {PIPELINE_TAG}")
    tags = list(BASE_TAGS)
    if any(bits for layer in inputs.stack.info["quantization"]["layers"].values() for bits in layer.values()):
        tags.append("palettized")
    if inputs.stack.info["quantization"].get("embed_bits"):
        tags.append("quantized")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    return "\n".join(lines)


def banner(inputs: ReleaseInputs) -> str:
    if inputs.verified:
        return ""
    because = UNVERIFIED_BECAUSE[inputs.unverified[0]]
    return ("\n> **These packages were not verified.** This release was made with RELEASE_UNVERIFIED=1 "
            f"because {because}. No parity figure below vouches for them; run `doit verify` on the build and "
            "release again.\n")


def intro(inputs: ReleaseInputs) -> str:
    stack = inputs.stack
    named = f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})" if inputs.base_model else \
        f"The Qwen3 checkpoint `{inputs.model_name}`"
    shards = ", ".join(f"`{s['package'].removesuffix('.mlpackage')}` (layers {s['first']}-{s['last']}, "
                       f"{s['role']})" for s in stack.shards)
    return (f"{named}, built by qwen3build into a split Core ML deployment for Apple devices with the Neural "
            f"Engine as the target: {len(stack.package_names)} ML Program packages that run one after another "
            f"for every token. `io_model` holds the token embedding and the LM head (two functions); "
            f"{len(stack.shards)} decoder shard(s), {shards}, each hold their layers and their own KV cache as "
            f"an `MLState`; `sampler_model` turns the logits into the next token. A host loop calls them in "
            f"order, batch 1, one token per call, with up to {_count(stack.seq_len)} tokens of context.")


def files_table(inputs: ReleaseInputs, sizes: dict[str, int]) -> str:
    roles = {row["package"]: row["role"] for row in package_rows(inputs)}
    what = {"config.json": "the checkpoint's config.json (Hugging Face Qwen3 configuration)",
            "tokenizer.json": "the checkpoint's tokenizer (Hugging Face `tokenizers`)",
            "tokenizer_config.json": "the checkpoint's tokenizer configuration",
            "generation_config.json": "the checkpoint's generation configuration (for reference; see below)",
            "stack.json": ("what a runner reads: package order, roles, layers, compute units, SEQ_LEN, the "
                           "recipe's allocation, and every unzipped file's size and xxh3 digest")}
    rows = []
    for name in sorted(sizes):
        if name.endswith(".mlpackage.zip"):
            description = f"Core ML package: {roles.get(name.removesuffix('.zip'), 'package')}"
        elif name.endswith(".mlmodelc.zip"):
            description = ("the same package compiled (`xcrun coremlcompiler compile`), for apps that bundle "
                           "compiled models")
        elif name in what:
            description = what[name]
        else:
            description = "copied unchanged from the checkpoint (licence terms)"
        rows.append([f"`{name}`", _count(sizes[name]), description])
    rows.append(["`README.md`", "", "this model card"])
    rows.append(["`SHA256SUMS`", "", "SHA-256 of every other file"])
    return _table(["file", "bytes", "what"], rows)


def envelope_table(inputs: ReleaseInputs) -> str:
    model, stack = inputs.stack.model, inputs.stack
    heads, kv_heads = model["num_attention_heads"], model["num_key_value_heads"]
    attention = (f"{heads} query heads, {kv_heads} KV heads"
                 + (f" (GQA: {heads // kv_heads} query heads share each KV head)" if kv_heads < heads else " (MHA)")
                 + f", head_dim {model['head_dim']}")
    architectures = inputs.checkpoint_config.get("architectures") or ["Qwen3ForCausalLM"]
    audit_stack = inputs.audit["stack"]
    rows = [
        ["architecture", ", ".join(str(a) for a in architectures)],
        ["layers", _count(model["num_hidden_layers"])],
        ["hidden size", _count(model["hidden_size"])],
        ["attention", attention],
        ["MLP", f"SwiGLU, intermediate size {_count(model['intermediate_size'])}"],
        ["vocabulary", _count(model["vocab_size"])],
        ["RoPE", f"theta {_theta(model['rope_theta'])}, rotate-half, positions from static tables"],
        ["RMSNorm epsilon", f"{model['rms_norm_eps']:g}"],
        ["LM head", "tied to the token embedding (one table)" if model["tie_word_embeddings"]
         else "its own matrix (untied)"],
        ["context capacity", f"{_count(stack.seq_len)} tokens (SEQ_LEN, the deployed capacity: fixed at build time, "
                             f"positions 0-{stack.seq_len - 1})"],
        ["batch", "1 (one token per call)"],
        ["shard layout", f"`{stack.layout_text}` ({len(stack.shards)} shard(s))"],
        ["dispatches per token", f"{audit_stack['dispatches_per_token']} (audit report)"],
    ]
    return _table(["", ""], rows)


def chain_text(inputs: ReleaseInputs) -> str:
    return " -> ".join(f"`{step.replace('.mlpackage', '')}`" for step in inputs.audit["stack"]["decode_chain"])


def packages_table(inputs: ReleaseInputs) -> str:
    rows = []
    for row in package_rows(inputs):
        audit = row["audit"]
        layers = f"{row['layers'][0]}-{row['layers'][1]}" if row["layers"] else "-"
        functions = ", ".join(f"`{f['name']}`" for f in audit["functions"])
        states = "; ".join(f"`{s['name']}` {_shape(s['shape'])} {s['dtype']}, {_mb(s['bytes'])}"
                           for s in audit["states"]) or "none"
        rows.append([f"`{row['package']}`", row["role"], layers, UNIT_NAMES.get(row["units"], row["units"]),
                     functions, states, _count(audit["package_bytes"])])
    return _table(["package", "role", "layers", "compute units", "functions", "states (MLState)", "bytes"], rows)


def read_interfaces(inputs: ReleaseInputs) -> list[tuple[str, str, object]]:
    """(package, function, PackageInterface) for every function of every package, from the
    saved packages themselves; refuses packages that break the runtime contract."""
    from ..evaluator.loader import read_interface
    found = []
    for row in package_rows(inputs):
        path = inputs.stack.package(row["package"])
        for function in row["audit"]["functions"]:
            interface = read_interface(path, function["name"])
            found.append((row["package"], function["name"], interface))
            kind = function["name"] if row["package"] == inputs.stack.info["io_model"] else (
                "shard" if row["layers"] else None)
            if kind in CONTRACT:
                want_in, want_out = CONTRACT[kind]
                missing = sorted((want_in - set(interface.inputs)) | (want_out - set(interface.outputs)))
                if missing:
                    raise BuildError(f"{row['package']}:{function['name']} does not declare {', '.join(missing)}, "
                                     "which runners use: it comes from another qwen3build; run `doit build` again")
    return found


def interfaces_table(interfaces) -> str:
    def features(table: dict) -> str:
        return ", ".join(f"`{name}` {_shape(shape)} {_dtype(dtype)}" for name, (shape, dtype) in table.items())
    rows = [[f"`{package.removesuffix('.mlpackage')}:{function}`", features(i.inputs), features(i.outputs),
             features(i.states) or "-"] for package, function, i in interfaces]
    return _table(["function", "inputs", "outputs", "states"], rows)


def _layer_parameters(model: dict) -> dict[str, int]:
    hidden, inter = model["hidden_size"], model["intermediate_size"]
    q_dim = model["num_attention_heads"] * model["head_dim"]
    kv_dim = model["num_key_value_heads"] * model["head_dim"]
    return {"q_proj": hidden * q_dim, "k_proj": hidden * kv_dim, "v_proj": hidden * kv_dim, "o_proj": q_dim * hidden,
            "gate_proj": hidden * inter, "up_proj": hidden * inter, "down_proj": inter * hidden}


def weight_bits(inputs: ReleaseInputs) -> dict[str, tuple[int, float | None]]:
    """package -> (parameters, parameter-weighted bits per weight the recipe stores them at:
    LUT index bits, blockwise element bits, else 16 for fp16)."""
    model, quant = inputs.stack.model, inputs.stack.info["quantization"]
    projections = _layer_parameters(model)
    norms = 2 * model["hidden_size"] + 2 * model["head_dim"]          # input/post norms, q/k norms
    out = {}
    table = model["vocab_size"] * model["hidden_size"]
    tables = 1 if model["tie_word_embeddings"] else 2
    embed_bits = quant.get("embed_bits") or 16
    out[inputs.stack.info["io_model"]] = (tables * table, float(embed_bits))
    for shard in inputs.stack.shards:
        params = bits = 0
        for layer in range(shard["first"], shard["last"] + 1):
            allocation = quant["layers"][str(layer)]
            for kind, count in projections.items():
                params += count
                bits += count * (allocation.get(kind) or 16)
            params += norms
            bits += norms * 16
        if shard["role"] in ("exit", "entry+exit"):
            params += model["hidden_size"]                             # the final norm
            bits += model["hidden_size"] * 16
        out[shard["package"]] = (params, bits / params)
    out[inputs.stack.info["sampler"]] = (0, None)
    return out


def _allocation_rows(quant: dict) -> list[list]:
    groups: dict[tuple, list[int]] = {}
    for layer, allocation in sorted(quant["layers"].items(), key=lambda item: int(item[0])):
        groups.setdefault(tuple(allocation.get(kind) or 16 for kind in PROJECTIONS), []).append(int(layer))
    rows = []
    for bits, layers in sorted(groups.items(), key=lambda item: item[1][0]):
        rows.append([_ranges(layers)] + [str(b) if b != 16 else "16 (fp16)" for b in bits])
    return rows


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def quantization(inputs: ReleaseInputs) -> str:
    quant, recipe = inputs.stack.info["quantization"], inputs.stack.recipe
    description = getattr(inputs.plan.recipe, "description", "") or ""
    embed = (f"blockwise int{quant['embed_bits']} (blocks of {quant.get('embed_block_size')}, fp16 scales)"
             if quant.get("embed_bits") else "fp16")
    bits = weight_bits(inputs)
    rows = []
    for row in package_rows(inputs):
        params, nominal = bits[row["package"]]
        built = inputs.build_records.get(row["artifact"], {}).get("bpw")
        rows.append([f"`{row['package']}`", _count(params), _num(built, ".2f") if params else "-",
                     _num(nominal, ".2f"), _bytes(row["audit"]["weights_stored_bytes"])])
    palettized = any(bits for layer in quant["layers"].values() for bits in layer.values())
    projections = (f"grouped-LUT palettization (groups of up to {quant.get('group_size')} output channels share "
                   "one codebook of fp16 values; bits per layer below)" if palettized else "fp16")
    lines = [f"Recipe `{recipe}`" + (f": {description.rstrip('.')}." if description else "."),
             f"Projections: {projections}; embedding"
             f"{'' if inputs.stack.model['tie_word_embeddings'] else ' and head'}: "
             f"{embed}; norms fp16; compute fp16. Mask and KV-write tables palettized: "
             f"{'yes' if inputs.stack.info.get('palettize_masks') else 'no'}.",
             "",
             "Bits per weight, per package. *As built*: what the build recorded when it made the package, for its "
             "projection weights (shards) or its embedding table (io_model) as stored, LUT codebooks and block scales "
             "included (`-`: that record is no longer in the build's cache). *Recipe*: the element bits the recipe "
             "gives each model weight of the package (LUT index bits, blockwise element bits, 16 for fp16; norms "
             "included), weighted by parameters. The last column is every constant of the package as stored, from "
             "the audit report: codebooks, scales, RoPE and mask tables included.",
             "",
             _table(["package", "parameters", "bits per weight, as built", "bits per weight, recipe",
                     "constants as stored (bytes)"], rows),
             "",
             "Projection bits per layer:",
             "",
             _table(["layers"] + [f"`{kind}`" for kind in PROJECTIONS], _allocation_rows(quant))]
    return "\n".join(lines)


# ---------------------------------------------------------------- parity

def _greedy(greedy: dict) -> str:
    if not greedy.get("prompts"):
        return "-"
    parts = [f"{greedy['identical'] + greedy['knife_edge']}/{greedy['prompts']} pass"]
    if greedy["knife_edge"]:
        parts.append(f"{greedy['knife_edge']} at a knife-edge tie")
    if greedy["hard"]:
        parts.append(f"{greedy['hard']} hard divergence(s)")
    return ", ".join(parts) + f" ({greedy['prompt_tokens']} prompt + {greedy['new_tokens']} new tokens)"


def parity(inputs: ReleaseInputs) -> str:
    if not inputs.verified:
        return ("Not measured: these packages have no passing verify report (see the note at the top). Nothing "
                "here vouches for their numerics.")
    report = inputs.verify
    rungs = report["rungs"]
    packages = rungs["packages"]
    runs = report["windows"]["runs"]
    positions = sum(length for _start, length in runs)
    options = report.get("options", {})
    text_name = Path(report["text"]["path"]).name
    backend = packages["backend"]
    lines = [
        f"Source: the `doit verify` report of exactly these packages (matched by their build keys; report format "
        f"{report.get('format')}), measured on `{report.get('platform')}`. Oracle: transformers' `Qwen3ForCausalLM` "
        "in fp32 on the checkpoint's own weights. The `packages` rung ran the saved packages on the "
        f"`{backend}` backend: {BACKEND_TEXT.get(backend, backend)}; its greedy rollouts picked tokens with "
        f"`{packages.get('sampler')}`."
        + (" The `reference` rung is qwen3build's fp32 torch graph with the weights exactly as packed."
           if "reference" in rungs else ""),
        "",
        f"Text: `{text_name}`, {_count(report['text']['tokens'])} tokens; {len(runs)} run(s), "
        f"{_count(positions)} teacher-forced positions per rung (MAX_WINDOWS={options.get('max_windows')})"
        + (f"; the packages rung limited to {_count(packages['budget'])} positions (PACKAGE_POSITIONS)"
           if packages.get("budget") else "")
        + f". Top-1 counts only positions where the oracle's top-2 logit margin is >= "
        f"{report['knife_edge_margin']} (qualified positions); top-5: the oracle's top-1 is among the rung's five "
        "largest logits; KL(oracle || rung) in nats.",
        "",
        f"Gate `[verify.{report['recipe']}]`: **passed**, every rung within every threshold below.",
        "",
    ]
    rows = []
    for name, rung in rungs.items():
        tf = rung["teacher_forced"]
        rows.append([f"`{name}`", rung["backend"], f"{_num(tf['top1'], '.4f')} ({_count(tf['qualified'])} of "
                     f"{_count(tf['positions'])})", _num(tf["top5"], ".4f"), _num(tf["mean_kl"], ".2e"),
                     _num(tf["max_kl"], ".2e"), _num(tf["min_cosine"], ".5f"), _greedy(rung["greedy"])])
    lines.append(_table(["rung", "backend", "top-1 (qualified of positions)", "top-5", "KL mean", "KL max",
                         "cosine min", "greedy rollouts"], rows))
    lines += ["", "Perplexity drift per window size (paired: the same windows of the text; drift = PPL_rung / "
                  "PPL_oracle - 1):", ""]
    sizes = sorted(report["windows"]["sizes"])
    rows = []
    for size in sizes:
        oracle = report["oracle"]["perplexity"].get(str(size), {})
        row = [_count(size), oracle.get("windows", 0), _num(oracle.get("ppl"), ".3f")]
        for name, rung in rungs.items():
            entry = rung["perplexity"].get(str(size), {})
            row.append("-" if not entry.get("windows") else
                       f"{entry['rung']:.3f} ({entry['drift']:+.3%}, {entry['windows']} window(s))")
        rows.append(row)
    lines.append(_table(["window (tokens)", "windows", "oracle PPL"] + [f"`{n}` PPL (drift)" for n in rungs], rows))
    by_depth = packages["teacher_forced"].get("by_depth") or []
    if by_depth:
        lines += ["", "The packages by context depth (tokens before the predicted one):", ""]
        lines.append(_table(["depth", "positions", "qualified", "top-1", "KL mean"],
                            [[f"{d['from']}-{d['to'] - 1}", _count(d["positions"]), _count(d["qualified"]),
                              _num(d["top1"], ".4f"), _num(d["mean_kl"], ".2e")] for d in by_depth]))
    thresholds = report["thresholds"]
    lines += ["", f"Thresholds `[verify.{report['recipe']}]` the gate held every rung to:", "",
              _table(list(thresholds), [[f"{v:g}" if isinstance(v, float) else v for v in thresholds.values()]])]
    return "\n".join(lines)


# ---------------------------------------------------------------- audit

def audit(inputs: ReleaseInputs) -> str:
    report = inputs.audit
    stack = report["stack"]
    rows = []
    for row in package_rows(inputs):
        p = row["audit"]
        rows.append([f"`{row['package']}`", _count(p["package_bytes"]), _count(p["weights_stored_bytes"]),
                     _count(p["decode_bytes_per_token"]), _count(p["minimum_bytes_per_token"]),
                     _num(p["ratio"], ".2f"), p["dispatches_per_token"]])
    rows.append(["whole stack", _count(stack["package_bytes"]), _count(stack["weights_stored_bytes"]),
                 _count(stack["decode_bytes_per_token"]), _count(stack["minimum_bytes_per_token"]),
                 _num(stack["ratio"], ".2f"), stack["dispatches_per_token"]])
    traffic = stack["traffic"]
    plan = report.get("compute_plan") or {}
    if "skipped" in plan:
        placement = f"Core ML compute plan (Neural Engine placement): not measured ({plan['skipped']})."
    else:
        placement = "Core ML compute plan, share of compute ops placed on the Neural Engine: " + ", ".join(
            f"`{name}` {entry['share']:.1%}" for name, entry in plan.items()) + "."
    by_rule = ", ".join(f"{rule} x{n}" for rule, n in stack.get("flags_by_rule", {}).items()) or "none"
    return "\n".join([
        f"Source: the `doit audit` report of exactly these packages (report format {report.get('format')}), read "
        "from the saved ML Programs. Modeled bytes per token: what one decode token moves under the audit's "
        "traffic model (weights as stored, state read and rows written, intermediates, inputs); minimum: every "
        "constant once, one read of each state and the new KV rows.",
        "",
        _table(["package", "bytes on disk", "constants as stored", "modeled bytes per token",
                "minimum bytes per token", "ratio", "dispatches per token"], rows),
        "",
        f"Per decode token: {stack['dispatches_per_token']} dispatches; modeled {_mb(stack['decode_bytes_per_token'])} "
        f"moved (weights {_mb(traffic['weights_read'])}, KV state read {_mb(traffic['state_read'])}, KV state "
        f"written {_mb(traffic['state_written'])}, intermediates {_mb(traffic['intermediate_written'])} written + "
        f"{_mb(traffic['intermediate_read'])} read); minimum {_mb(stack['minimum_bytes_per_token'])}. KV state "
        f"held: {_mb(stack['state_bytes'])}.",
        "",
        placement,
        "",
        f"Audit rule flags: {stack.get('flags', 0)} ({by_rule}).",
    ])


# ---------------------------------------------------------------- running it

def swift(inputs: ReleaseInputs) -> str:
    stack = inputs.stack
    units = stack.info.get("compute_units", {})
    io_name, vocab = stack.info["io_model"], stack.vocab_size
    io_units = SWIFT_UNITS.get(units.get(io_name, "ALL"), ".all")
    shard_lines = ",\n".join(
        f'    try await load("{s["package"]}", {SWIFT_UNITS.get(units.get(s["package"], "ALL"), ".all")})'
        for s in stack.shards)
    return f'''import CoreML

let folder = URL(fileURLWithPath: "{inputs.folder_name}")   // the unzipped release

func load(_ package: String, _ units: MLComputeUnits, function: String? = nil) async throws -> MLModel {{
    let configuration = MLModelConfiguration()
    configuration.computeUnits = units
    configuration.functionName = function               // io_model holds two functions
    let compiled = try await MLModel.compileModel(at: folder.appendingPathComponent(package))
    return try await MLModel.load(contentsOf: compiled, configuration: configuration)
}}

let embed = try await load("{io_name}", {io_units}, function: "embed")
let lmHead = try await load("{io_name}", {io_units}, function: "lm_head")
let shards = [
{shard_lines}
]
var kvCaches = shards.map {{ $0.makeState() }}           // one KV cache per shard; a new text: new states

func step(token: Int32, position: Int32) throws -> MLMultiArray {{
    let ids = try MLMultiArray(shape: [1, 1], dataType: .int32)
    ids[0] = NSNumber(value: token)
    let pos = try MLMultiArray(shape: [1], dataType: .int32)
    pos[0] = NSNumber(value: position)
    var hidden = try embed.prediction(from: MLDictionaryFeatureProvider(dictionary: ["input_ids": ids]))
        .featureValue(for: "hidden_states")!
    for (shard, kvCache) in zip(shards, kvCaches) {{
        let inputs = try MLDictionaryFeatureProvider(dictionary: ["hidden_states": hidden, "position": pos])
        hidden = try shard.prediction(from: inputs, using: kvCache).featureValue(for: "output_hidden_states")!
    }}
    return try lmHead.prediction(from: MLDictionaryFeatureProvider(dictionary: ["hidden_states": hidden]))
        .featureValue(for: "logits")!.multiArrayValue!   // (1, {vocab}) fp16
}}
// Feed the prompt's tokens (tokenizer.json) at positions 0, 1, 2, ...; the next token is the argmax of
// the last logits (greedy), or sampler_model's choice; feed it at the next position, up to {stack.seq_len - 1}.'''


def preserved(inputs: ReleaseInputs) -> str:
    stack, model = inputs.stack, inputs.stack.model
    states = [s for p in inputs.audit["packages"] for s in p["states"]]
    state_text = "; ".join(f"{p['name'].removesuffix('.mlpackage')} {_shape(s['shape'])} {s['dtype']}"
                           for p in inputs.audit["packages"] for s in p["states"])
    kv_write = stack.info.get("kv_write")
    write_text = {"slice": "each token's K/V rows are written in place at their slot (`slice_update`)",
                  "blend": "each token's K/V rows are blended into the whole cache with a one-hot mask"}.get(
                      kv_write, f"KV_WRITE={kv_write}")
    tied = model["tie_word_embeddings"]
    quantized = bool(stack.info["quantization"].get("embed_bits")) or any(
        bits for layer in stack.info["quantization"]["layers"].values() for bits in layer.values())
    return "\n".join([
        "Preserved (parity above measures it against transformers' own implementation):",
        "",
        "- **Decoder semantics**: the Qwen3 layer as transformers computes it: RMSNorm before attention and MLP, "
        "RMSNorm on each query and key head (QK-norm) before RoPE, causal softmax attention, SwiGLU MLP, residual "
        "adds, the final RMSNorm once, in the exit shard.",
        f"- **GQA**: {model['num_attention_heads']} query heads over {model['num_key_value_heads']} KV heads, as "
        "in the checkpoint; the KV cache stores only the KV heads.",
        f"- **RoPE**: theta {_theta(model['rope_theta'])}, rotate-half, head_dim {model['head_dim']}; the angles come "
        "from static tables indexed by position.",
        "- **Tied head**: " + ("the LM head is the token embedding, as in the checkpoint: one table, stored once in "
                               "`io_model` and used by both of its functions." if tied else
                               "the checkpoint's own untied LM head matrix, stored in `io_model` beside the "
                               "embedding."),
        "",
        "Intentionally not preserved:",
        "",
        "- **Storage format**: not the checkpoint's tensors. " + (
            f"Weights are stored as recipe `{stack.recipe}` says (see Quantization)" if quantized else
            "Weights are stored in fp16") + ", as constants of Core ML ML Programs, and static SLaNC pre-scales "
        "on the norm inputs keep fp16 sums of squares from overflowing (RMSNorm's output is unchanged up to its "
        "epsilon). Compute is fp16 on device, fp32 in the oracle.",
        f"- **KV-cache implementation**: not transformers' growing cache. Each shard holds one fixed-size `MLState` "
        f"({state_text}; {_mb(sum(s['bytes'] for s in states))} in all) in a reversed ring layout: position p "
        f"lives in slot SEQ_LEN-1-p, read through static causal-mask tables; {write_text}. The capacity is SEQ_LEN "
        f"= {_count(stack.seq_len)} tokens, set at build time: no sliding window, no eviction, no growth.",
        "- **Sampler behavior**: `sampler_model` applies qwen3build's rules, in order: repetition penalty over a "
        "window of recent tokens, greedy argmax at temperature 0, else coherence-modulated temperature, min-p, and "
        "Gumbel-max with noise the host supplies (a seed reproduces a run). Not transformers' `generate()`: no "
        "top-k or top-p, and `generation_config.json` is shipped for reference only, its sampling settings are "
        "not applied.",
        f"- **Single-graph deployment**: there is no single model file. The network is split into "
        f"{len(stack.package_names)} packages called in sequence by the host, one dispatch each per token "
        f"({inputs.audit['stack']['dispatches_per_token']} per token), batch 1, prompts read one token per step "
        "(no batched prefill function).",
    ])


def license_section(inputs: ReleaseInputs) -> str:
    license_ = inputs.license
    if not license_.files:
        declared = ("" if license_.id == UNKNOWN_LICENSE
                    else f" The licence id `{license_.id}` comes from {license_.source}.")
        return ("**The checkpoint has no LICENSE or NOTICE file, and this release ships none.**" + declared
                + (" Nothing in the checkpoint says under which terms its weights may be redistributed "
                   "(front matter `license: unknown`)." if license_.id == UNKNOWN_LICENSE else "")
                + " The packages are derived from the checkpoint's weights: find its terms before redistributing "
                  "them.")
    files = ", ".join(f"`{name}`" for name in license_.files)
    return (f"Copied unchanged from the checkpoint: {files}. Licence id `{license_.id}`, from {license_.source}. "
            "The packages are derived from the checkpoint's weights and are distributed under its terms.")


# ---------------------------------------------------------------- the card

def render(inputs: ReleaseInputs, sizes: dict[str, int], template: str | None = None) -> str:
    """The card's text. `sizes`: bundle file name -> bytes (every file but README.md and SHA256SUMS)."""
    stack = inputs.stack
    interfaces = read_interfaces(inputs)
    values = {
        "front_matter": front_matter(inputs),
        "banner": banner(inputs),
        "title": f"{inputs.model_name} for Core ML: {len(stack.package_names)} packages, recipe {stack.recipe}, "
                 f"SEQ_LEN {stack.seq_len}",
        "intro": intro(inputs),
        "files_table": files_table(inputs, sizes),
        "envelope_table": envelope_table(inputs),
        "chain": chain_text(inputs),
        "packages_table": packages_table(inputs),
        "interfaces_table": interfaces_table(interfaces),
        "quantization": quantization(inputs),
        "parity": parity(inputs),
        "audit": audit(inputs),
        "folder": inputs.folder_name,
        "seq_len": str(stack.seq_len),
        "swift": swift(inputs),
        "preserved": preserved(inputs),
        "license_section": license_section(inputs),
    }
    try:
        text = string.Template(template if template is not None else template_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise BuildError(f"the card template {TEMPLATE_PATH.name} is broken ({exc!r}): every $name must be one of "
                         f"{', '.join(sorted(values))}; write $$ for a dollar sign") from None
    return text.rstrip() + "\n"
