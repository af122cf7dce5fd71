"""qwen3build task graph. `doit list` shows the tasks; `doit build` makes everything.

This file only wires: settings come from qwen3build.toml < environment < doit variables
(`doit build SEQ_LEN=2048`), and every action is a function in qwen3build.build, called
with plain data so worker processes (`doit -n N`) can run it. Nothing heavy is imported
here, so a no-op build stays fast.
"""
import os
import sys

from doit import doit_cmd, get_var

from qwen3build.build import doit_glue as glue
from qwen3build.build.actions import run_id
from qwen3build.errors import BuildError
from qwen3build.logs import configure as configure_logging
from qwen3build.settings.settings import SETTING_KEYS
from qwen3build.verify.options import VERIFY_VARS
from qwen3build.audit.options import AUDIT_VARS
from qwen3build.release.options import RELEASE_VARS, VERIFY_REPORT_VARS

configure_logging()
run_id()
glue.configure_workers()

OVERRIDES = {key: get_var(key) for key in SETTING_KEYS if get_var(key) is not None}
SOURCE = glue.source_of(OVERRIDES, os.environ)
try:
    glue.check_variables(doit_cmd._CMDLINE_VARS or {}, SETTING_KEYS + VERIFY_VARS + AUDIT_VARS + RELEASE_VARS)
    BUILDER = glue.builder(SOURCE)
    JOBS = glue.default_jobs(BUILDER.plan)
except BuildError as error:
    print(f"qwen3build: {error}", file=sys.stderr)
    sys.exit(2)
PLAN, TREE = BUILDER.plan, BUILDER.tree

DOIT_CONFIG = {
    "default_tasks": ["build"],
    "backend": "sqlite3",
    "dep_file": str(TREE.doit_db),
    "verbosity": 2,
    "action_string_formatting": "new",
    "reporter": glue.OneLineFailureReporter,
    # Workers for independent tasks (quant packs, shards, io_model side by side): every
    # core while each worker's estimated peak memory fits (doit_glue.default_jobs).
    "num_process": JOBS,
}
try:
    TREE.state_dir.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    print(f"qwen3build: {glue.location_error(exc) or exc}", file=sys.stderr)
    sys.exit(2)


def _artifact_task(artifact, doc, task_dep):
    return {"actions": [(glue.artifact_action, (SOURCE, artifact))], "uptodate": [glue.KeyCheck(SOURCE, artifact)],
            "task_dep": ["weights", *task_dep], "doc": doc}


def _upstream(artifact):
    return PLAN.upstream_ids(artifact)


def task_weights():
    """Per-tensor digests of the checkpoint (re-hashes only files whose stat changed)."""
    return {"actions": [(glue.weights_action, (SOURCE,))], "uptodate": [glue.WeightsCheck(SOURCE)]}


def task_slanc():
    """SLaNC fp16 pre-scales for every RMSNorm (artifacts/numerics/slanc_scales.npy)."""
    return _artifact_task("slanc", task_slanc.__doc__, [])


def task_quant():
    """Quantization packs of the RECIPE: quant:layerNN (GS128 LUT) and quant:embed (blockwise)."""
    yield {"name": None, "doc": f"quantization packs of RECIPE={PLAN.recipe.name} (fp16 recipe: none)"}
    for artifact in PLAN.quant_ids():
        name = artifact.split(":", 1)[1]
        doc = ("blockwise embedding/head packs" if name == "embed"
               else f"LUT packs of layer {int(name[5:])}: " + ", ".join(
                   f"{k} {b}b" for k, b in PLAN.allocation(int(name[5:])).items() if b))
        yield {"name": name, **_artifact_task(artifact, doc, [])}


def task_io_model():
    """io_model.mlpackage: token embedding and LM head (functions embed, lm_head)."""
    return _artifact_task("io_model", task_io_model.__doc__, _upstream("io_model"))


def task_shard():
    """Decoder shards, one subtask per shard of the layout (shard:left, shard:mid, ...)."""
    for spec in PLAN.layout:
        doc = f"{spec.package_name}.mlpackage: layers {spec.first}-{spec.last} ({spec.role}) with KV state"
        artifact = f"shard:{spec.name}"
        yield {"name": spec.name, **_artifact_task(artifact, doc, _upstream(artifact))}


def task_sampler():
    """sampler_model.mlpackage: next token from logits, recent tokens and settings."""
    return _artifact_task("sampler_model", task_sampler.__doc__, [])


def task_aimodel():
    """Core AI twins of the packages (FORMATS=coreai): aimodel:io_model, aimodel:shard:<name>, ..."""
    yield {"name": None, "doc": "Core AI (.aimodel) packages under artifacts/coreai (docs/coreai.md)"}
    for artifact in PLAN.aimodel_ids():
        twin = artifact.split(":", 1)[1]
        yield {"name": twin, **_artifact_task(artifact, f"{twin}, as a Core AI .aimodel", _upstream(artifact))}


FORMAT_TASKS = {"coreml": ["io_model", "shard", "sampler"], "coreai": ["aimodel"]}


def task_build():
    """Build the whole stack in the FORMATS requested, publish it at once, and print what
    was rebuilt, restored from the cache or up to date."""
    formats = [task for fmt in PLAN.settings.FORMATS for task in FORMAT_TASKS[fmt]]
    return {"actions": [(glue.build_action, (SOURCE,))], "task_dep": ["slanc", "quant", *formats],
            "uptodate": [False], "targets": [str(TREE.out_dir), str(TREE.mil_dir)],
            "clean": [(glue.clean_action, (SOURCE,))]}


def task_mil():
    """MIL text dumps of every package (MIL_DIR, published with the packages by `build`)."""
    return {"actions": None, "task_dep": ["build"], "doc": task_mil.__doc__}


def task_verify():
    """Parity gate: HF fp32 oracle vs torch reference vs the saved packages (docs/verify.md)."""
    variables = {k: get_var(k) for k in VERIFY_VARS if get_var(k) is not None}
    # MODELS_DIR: verify packages that exist already (e.g. an unzipped release), build nothing.
    return {"actions": [(glue.verify_action, (SOURCE, variables))],
            "task_dep": [] if variables.get("MODELS_DIR") else ["build"],
            "uptodate": [glue.VerifyCheck(SOURCE, variables)]}


def task_audit():
    """Audit the packages: bytes a decode token moves vs the minimum, ANE rule flags (docs/audit.md).

    Writes artifacts/audit/audit.json (AUDIT_REPORT) and prints a table; on macOS the compute
    plan's Neural Engine share, gated by ANE_MIN_RESIDENCY."""
    from qwen3build.audit import doit_actions as audit_glue
    variables = {k: get_var(k) for k in AUDIT_VARS if get_var(k) is not None}
    return {"actions": [(audit_glue.audit_action, (SOURCE, variables))], "task_dep": ["build"],
            "uptodate": [audit_glue.AuditCheck(SOURCE, variables)]}


def task_release():
    """Hugging Face release folder of the verified stack, with its model card (docs/release.md).

    Zipped packages, tokenizer and config, licence files, a card with the parity and audit figures
    of exactly these packages, SHA256SUMS; under artifacts/release/ (RELEASE_DIR). Refused without
    a passing verify report of these packages unless RELEASE_UNVERIFIED=1."""
    from qwen3build.release import doit_actions as release_glue
    variables = {k: get_var(k) for k in RELEASE_VARS + VERIFY_REPORT_VARS + AUDIT_VARS if get_var(k) is not None}
    return {"actions": [(release_glue.release_action, (SOURCE, variables))], "task_dep": ["audit"],
            "uptodate": [release_glue.ReleaseCheck(SOURCE, variables)]}
