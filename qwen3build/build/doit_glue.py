"""doit glue: picklable task actions, up-to-date checks, and a one-line failure reporter.

Actions are module-level functions called with plain data (the settings the dodo run
was given), so `doit -n N -P process` can send them to worker processes, which start by
spawning on macOS: a worker rebuilds the plan from those settings, cheaply.

Actions turn a BuildError (bad input: the user can fix it) into doit's TaskFailed with a
message starting "qwen3build:"; the reporter prints that line alone, without doit's
"TaskFailed - taskid:..." frame. Anything else (a bug) keeps the full report.
"""
from __future__ import annotations

import errno
import logging
import functools
import os
import sqlite3

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from ..errors import BuildError
from .memory import available_memory

log = logging.getLogger(__name__)
PREFIX = "qwen3build:"


class OneLineFailureReporter(ConsoleReporter):
    desc = "console; user errors as one line"

    def add_failure(self, task, fail):
        message = fail.get_msg().strip() if isinstance(fail, TaskFailed) else ""
        if message.startswith(PREFIX):
            # Parallel workers can fail at once for one cause (a full disk): the first
            # line names it; the build stops there, so later ones add nothing new.
            if not any(f.get("one_line") for f in self.failures):
                self.write(f"{message.splitlines()[0]}\n")
            self.failures.append({"task": task, "exception": fail, "one_line": True})
            return
        super().add_failure(task, fail)


# ---------------------------------------------------------------- worker processes

START_METHOD_ENV = "QWEN3BUILD_START_METHOD"  # fork / spawn / forkserver: how `doit -n N` starts workers


def configure_workers() -> None:
    """Let QWEN3BUILD_START_METHOD choose how worker processes start (macOS spawns by
    default; setting spawn on Linux tests what macOS users get)."""
    import multiprocessing
    method = os.environ.get(START_METHOD_ENV)
    if method:
        if method not in multiprocessing.get_all_start_methods():
            raise SystemExit(f"qwen3build: {START_METHOD_ENV}={method!r}: use one of "
                             f"{', '.join(multiprocessing.get_all_start_methods())}")
        multiprocessing.set_start_method(method, force=True)
    from .workers import expect_workers, watch_workers
    expect_workers()
    watch_workers()


JOBS_ENV = "QWEN3BUILD_JOBS"  # workers when `doit build` is run without -n (default: decided here)
GIB = 1 << 30
# A worker's peak memory: about this much for the interpreter and coremltools, plus this
# many times the fp16 bytes of the largest single artifact it builds (measured at the 1.7B
# shape: a 4-layer-heavier shard or the io_model peak at ~3-3.5x their fp16 weights).
WORKER_BASE_BYTES = 1 * GIB
WORKER_BYTES_PER_WEIGHT_BYTE = 3


def default_jobs(plan) -> int:
    """Workers for a build: every core, as long as each worker's estimated peak fits in the
    memory available (QWEN3BUILD_JOBS overrides; `doit -n N` overrides both)."""
    raw = os.environ.get(JOBS_ENV)
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise BuildError(f"{JOBS_ENV}={raw!r} must be a whole number >= 1")
        return int(raw)
    cores = os.cpu_count() or 1
    config = plan.config
    layer_params = (2 * config.hidden_size * (config.q_dim + config.kv_dim)
                    + 3 * config.hidden_size * config.intermediate_size)
    largest = max(max(len(spec.layers) for spec in plan.layout) * layer_params,
                  config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2))
    per_worker = WORKER_BASE_BYTES + WORKER_BYTES_PER_WEIGHT_BYTE * 2 * largest
    memory = available_memory()
    fits = cores if memory is None else max(1, int(memory // per_worker))
    return max(1, min(cores, fits))


# ---------------------------------------------------------------- the builder of a run

def source_of(overrides: dict, environ) -> tuple:
    """Plain, hashable data that reproduces the plan in any process."""
    from ..settings.settings import SETTING_KEYS
    env = tuple((k, environ[k]) for k in SETTING_KEYS if k in environ)
    return (tuple(sorted(overrides.items())), env)


@functools.lru_cache(maxsize=4)
def builder(source: tuple):
    from ..logs import configure
    from .workers import watch_parent
    configure()  # a spawned worker starts without dodo.py's logging
    watch_parent()  # a worker ends with the build that started it
    from ..build.actions import Builder
    from ..build.plan import make_plan
    overrides, env = source
    return Builder(make_plan(dict(overrides), dict(env)))


# A write that fails for one of these reasons is the user's to fix (disk full, read-only
# location), not a bug: it becomes one line naming the path.
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def location_error(exc: OSError) -> BuildError | None:
    """A one-line BuildError for a write to a full or unwritable location, else None."""
    where = exc.filename or "a build output"
    if exc.errno in _SPACE_ERRNOS:
        return BuildError(f"{where}: {exc.strerror}; free space (e.g. `qwen3build cache gc --max-size 10G`) or "
                          "point CACHE_DIR / OUT_DIR / TMP_DIR at another disk")
    if exc.errno in _PERMISSION_ERRNOS:
        return BuildError(f"{where}: {exc.strerror}; make it a writable directory or point OUT_DIR / MIL_DIR / "
                          "TMP_DIR / CACHE_DIR elsewhere")
    return None


def _one_line(function, *args):
    try:
        result = function(*args)
    except BuildError as error:
        return TaskFailed(f"{PREFIX} {error}")
    except OSError as exc:
        error = location_error(exc)
        if error is None:
            raise
        return TaskFailed(f"{PREFIX} {error}")
    except sqlite3.OperationalError as exc:  # the digest store in CACHE_DIR
        return TaskFailed(f"{PREFIX} the weight digest store in CACHE_DIR cannot be written ({exc}); "
                          "make CACHE_DIR a writable directory or point it elsewhere")
    return None if result is None or result is True else result


def weights_action(source):
    return _one_line(lambda: builder(source).weights())


def artifact_action(source, artifact):
    return _one_line(lambda: builder(source).ensure(artifact))


def build_action(source, show_table=True):
    def publish():
        from .summary import format_table, summary_rows
        b = builder(source)
        statuses = b.publish()
        b.sweep()  # again: leftovers of a build killed just before this one, now surely gone
        if b.plan.settings.CACHE_MAX_SIZE is not None:
            from .cache_admin import collect_garbage, human
            removed, freed = collect_garbage(b, b.plan.settings.CACHE_MAX_SIZE)
            if removed:
                log.info("cache: removed %d least recently used entries (%s) to stay within CACHE_MAX_SIZE",
                         removed, human(freed))
        if show_table:
            print(format_table(summary_rows(b, statuses)))
            print(f"packages in {b.tree.out_dir}")
    return _one_line(publish)


class KeyCheck:
    """doit up-to-date check: the cache holds an entry for the artifact's current key."""

    def __init__(self, source, artifact):
        self.source, self.artifact = source, artifact

    def __call__(self):
        try:
            return builder(self.source).uptodate(self.artifact)
        except BuildError:
            return False

    def __repr__(self):
        return f"content key of {self.artifact} (declared inputs, code, tools) is in the cache"


class WeightsCheck:
    """doit up-to-date check of the weights manifest: the checkpoint files' stat unchanged."""

    def __init__(self, source):
        self.source = source

    def __call__(self):
        try:
            return builder(self.source).weights_uptodate()
        except BuildError:
            return False

    def __repr__(self):
        return "checkpoint files unchanged (inode, size, mtime_ns)"


def clean_action(source):
    """`doit clean`: remove the published links and generations (the cache stays)."""
    def clean():
        from . import publish
        from .cache import remove_path
        b = builder(source)
        b.lock()
        for link in publish.links(b.tree).values():
            if link.is_symlink() or link.exists():
                remove_path(link)
                print(f"removed {link}")
        if b.tree.generations_dir.exists():
            remove_path(b.tree.generations_dir)
            print(f"removed {b.tree.generations_dir}")
    return _one_line(clean)


def _verify_request(source, variables):
    from ..verify.options import request_from_vars
    return request_from_vars(builder(source).plan, variables)


def verify_action(source, variables):
    def verify():
        from ..verify import format_report, run_verify
        b = builder(source)
        b.lock()
        request = _verify_request(source, variables)
        report = run_verify(b.plan, request.text_path, request.report_path, request.options)
        print(format_report(report))
        if not report["passed"]:
            return TaskFailed(f"{PREFIX} verify failed: " + "; ".join(report["failures"]))
    return _one_line(verify)


class VerifyCheck:
    """doit up-to-date check of verify: a passing report made from exactly these inputs."""

    def __init__(self, source, variables):
        self.source, self.variables = source, variables

    def __call__(self):
        from ..verify.keys import report_is_current
        try:
            return report_is_current(builder(self.source).plan, _verify_request(self.source, self.variables))
        except BuildError:
            return False

    def __repr__(self):
        return "a passing verify report of exactly these packages, text, options and thresholds"


def check_variables(given, known) -> None:
    """Refuse a NAME=value doit variable nobody reads (a typo would be ignored otherwise)."""
    from ..settings.settings import closest_name
    for name in given:
        if name not in known:
            raise BuildError(f"unknown variable {name}={given[name]}{closest_name(name, known)}; "
                             f"settings: {', '.join(known)}")
