"""qwen3build task graph. `doit list` shows the tasks; `doit build` makes everything.

This file only wires: settings come from qwen3build.toml < environment < doit variables
(`doit build SEQ_LEN=2048`), and every action is a function in the qwen3build package.
Nothing heavy is imported here, so a no-op build stays fast.
"""
import os
import sys
import uuid

from doit import get_var

from qwen3build.cache import RUN_ID_ENV
from qwen3build.config import SETTING_KEYS
from qwen3build.doit_reporter import OneLineFailureReporter
from qwen3build.errors import BuildError
from qwen3build.logs import configure as configure_logging
from qwen3build.plan import IO_MODEL, SAMPLER, make_plan

configure_logging()
os.environ.setdefault(RUN_ID_ENV, uuid.uuid4().hex)

try:
    PLAN = make_plan({key: get_var(key) for key in SETTING_KEYS if get_var(key) is not None})
except BuildError as error:
    print(f"qwen3build: {error}", file=sys.stderr)
    sys.exit(2)

DOIT_CONFIG = {
    "default_tasks": ["build"],
    "backend": "sqlite3",
    "dep_file": str(PLAN.settings.CACHE_DIR / "doit.sqlite3"),
    "verbosity": 2,
    "action_string_formatting": "new",
    "reporter": OneLineFailureReporter,
}
PLAN.settings.CACHE_DIR.mkdir(parents=True, exist_ok=True)


def _artifacts():
    from qwen3build.tasks import Artifacts  # imported on first use, not at load
    global _ARTIFACTS
    if "_ARTIFACTS" not in globals():
        _ARTIFACTS = Artifacts(PLAN)
    return _ARTIFACTS


def _reporting_user_errors(function):
    """A doit action: a BuildError becomes a one-line TaskFailed (see doit_reporter)."""
    def action():
        try:
            return function()
        except BuildError as error:
            from doit.exceptions import TaskFailed
            return TaskFailed(f"qwen3build: {error}")
    return action


def _run(artifact_id):
    def run():
        _artifacts().run(artifact_id)
    return _reporting_user_errors(run)


class _KeyCheck:
    """doit uptodate check: the artifact's content key equals the one it was made from."""

    def __init__(self, artifact_id):
        self.artifact_id = artifact_id

    def __call__(self):
        return _artifacts().uptodate(self.artifact_id)

    def __repr__(self):
        return f"content key of {self.artifact_id} (inputs, settings, code, tools)"


def _clean(paths):
    def clean():
        from qwen3build.cache import remove_path
        for path in paths:
            if path.exists():
                remove_path(path)
                print(f"removed {path}")
    return clean


def _keyed_task(artifact_id, doc, task_dep, outputs):
    return {"actions": [_run(artifact_id)], "uptodate": [_KeyCheck(artifact_id)], "task_dep": task_dep,
            "targets": [str(p) for p in outputs], "clean": [_clean(outputs)], "doc": doc}


def task_weights():
    """Per-tensor digests of the checkpoint (re-hashes only files whose stat changed)."""
    action = _reporting_user_errors(lambda: _artifacts().weights_action())
    return {"actions": [action], "uptodate": [lambda: _artifacts().weights_uptodate()],
            "targets": [str(PLAN.manifest_path)], "clean": [_clean([PLAN.manifest_path])]}


def task_slanc():
    """SLaNC fp16 pre-scales for every RMSNorm (artifacts/numerics/slanc_scales.npy)."""
    return _keyed_task("slanc", task_slanc.__doc__, ["weights"], [PLAN.scales_path])


def _quant_ids():
    ids = [f"quant:layer{layer:02d}" for layer in PLAN.quantized_layers()]
    return ids + (["quant:embed"] if PLAN.recipe.embed_bits else [])


def task_quant():
    """Quantization packs of the RECIPE: quant:layerNN (GS128 LUT) and quant:embed (blockwise)."""
    yield {"name": None, "doc": f"quantization packs of RECIPE={PLAN.recipe.name} (fp16 recipe: none)"}
    for artifact_id in _quant_ids():
        name = artifact_id.split(":", 1)[1]
        outputs = [PLAN.quant_dir / name]
        doc = ("blockwise embedding/head packs" if name == "embed"
               else f"LUT packs of layer {int(name[5:])}: " + ", ".join(
                   f"{k} {b}b" for k, b in PLAN.recipe.layer_allocation(int(name[5:]), PLAN.config.num_hidden_layers).items() if b))
        yield {"name": name, **_keyed_task(artifact_id, doc, ["weights"], outputs)}


def task_io_model():
    """io_model.mlpackage: token embedding and LM head (functions embed, lm_head)."""
    return _keyed_task(IO_MODEL, task_io_model.__doc__, ["weights"] + [i for i in _quant_ids() if i == "quant:embed"],
                       [PLAN.package_path(IO_MODEL), PLAN.mil_path(IO_MODEL)])


def task_shard():
    """Decoder shards, one subtask per shard of the layout (shard:left, shard:mid, ...)."""
    for spec in PLAN.layout:
        outputs = [PLAN.package_path(spec.package_name), PLAN.mil_path(spec.package_name)]
        doc = f"{spec.package_name}.mlpackage: layers {spec.first}-{spec.last} ({spec.role}) with KV state"
        packs = [f"quant:layer{layer:02d}" for layer in PLAN.quantized_layers(spec.layers)]
        task = _keyed_task(f"shard:{spec.name}", doc, ["weights", "slanc", *packs], outputs)
        yield {"name": spec.name, **task}


def task_sampler():
    """sampler_model.mlpackage: next token from logits (greedy argmax for now)."""
    return _keyed_task(SAMPLER, task_sampler.__doc__, [], [PLAN.package_path(SAMPLER), PLAN.mil_path(SAMPLER)])


def task_mil():
    """MIL text dumps of every package (artifacts/coreml/mil/, written with each package)."""
    return {"actions": None, "task_dep": ["io_model", "shard", "sampler"], "doc": task_mil.__doc__}


def task_build():
    """Build the whole split Core ML stack and print what was rebuilt, restored or up to date."""
    def summary():
        from qwen3build.summary import format_table, summary_rows
        from qwen3build.tasks import finalize_stack
        finalize_stack(_artifacts())
        ids = [(IO_MODEL, IO_MODEL)] + [(s.package_name, f"shard:{s.name}") for s in PLAN.layout] + [(SAMPLER, SAMPLER)]
        print(format_table(summary_rows(_artifacts().cache, ids)))
        print(f"packages in {PLAN.settings.OUT_DIR}")
    return {"actions": [summary], "task_dep": ["io_model", "shard", "sampler", "mil"], "uptodate": [False]}


def _verify_request():
    from qwen3build.verify import VERIFY_VARS, request_from_vars
    return request_from_vars(PLAN, {k: get_var(k) for k in VERIFY_VARS if get_var(k) is not None})


def task_verify():
    """Parity gate: HF fp32 oracle vs torch reference vs the saved packages (docs/verify.md)."""
    def verify():
        from doit.exceptions import TaskFailed
        from qwen3build.verify import format_report, run_verify
        request = _verify_request()
        report = run_verify(PLAN, request.text_path, request.report_path, request.options)
        print(format_report(report))
        if not report["passed"]:
            return TaskFailed("qwen3build: verify failed: " + "; ".join(report["failures"]))
    action = _reporting_user_errors(verify)

    def uptodate():
        from qwen3build.verify import report_is_current
        try:
            return report_is_current(PLAN, _verify_request())
        except BuildError:
            return False
    return {"actions": [action], "task_dep": ["build"], "uptodate": [uptodate]}
