"""Worker processes of `doit -n N` live and die with the build.

doit starts workers (fork on Linux, spawn on macOS) that wait on a queue for tasks. Two
things it does not handle, and a build must:
- The build is killed (kill -9, the terminal closed): its workers would wait forever,
  and forked workers would keep the tree lock's open file alive. Workers close their
  copy of the lock (lock.py) and watch their parent: when it is gone, they exit.
- A worker is killed (out of memory, kill -9): doit would wait forever for its result.
  The build watches its workers: a worker that died of a signal ends the build with one
  line and exit 1, before anything is published (publishing is the last task).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# Temporary directories this process is writing (work dirs, cache staging): an orphaned
# worker removes them before it exits.
in_flight: set = set()
_watching_parent = False
_watching_workers = False


def in_worker() -> bool:
    import multiprocessing
    return multiprocessing.parent_process() is not None


def watch_parent(force: bool = False) -> None:
    """In a worker: exit as soon as the build process that started it is gone. Forked
    workers start watching at once (at fork: they hold the queue's pipe open, so they would
    wait on it forever); spawned ones when they run their first task (their queue reaches
    end of file when the build dies)."""
    global _watching_parent
    if _watching_parent or not (force or in_worker()):
        return
    _watching_parent = True
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(POLL_SECONDS)
            if os.getppid() != parent:
                for path in list(in_flight):  # the build is gone: leave nothing half-made behind
                    shutil.rmtree(path, ignore_errors=True)
                os._exit(1)

    threading.Thread(target=watch, name="qwen3build-parent-watch", daemon=True).start()


def watch_workers() -> None:
    """In the build process: end the build if a worker dies of a signal."""
    global _watching_workers
    if _watching_workers or in_worker():
        return
    _watching_workers = True

    def watch():
        while True:
            time.sleep(POLL_SECONDS)
            for child in _children():
                code = child.exitcode  # polls; does not reap what doit will join
                if code is not None and code < 0:
                    name = signal.Signals(-code).name
                    print(f"qwen3build: a build worker (pid {child.pid}) was killed by {name}"
                          f"{' (out of memory?)' if name == 'SIGKILL' else ''}; nothing was published, the "
                          "stack is as it was; run the build again (QWEN3BUILD_JOBS=1 uses less memory)",
                          file=sys.stderr, flush=True)
                    for other in _children():
                        if other.exitcode is None:
                            other.kill()
                    os._exit(1)

    threading.Thread(target=watch, name="qwen3build-worker-watch", daemon=True).start()


def _children() -> list:
    """This process's multiprocessing children, finished ones included (CPython keeps them
    in multiprocessing.process._children until they are joined)."""
    import multiprocessing.process as mp_process
    return list(getattr(mp_process, "_children", ()))


def _after_fork_in_child() -> None:
    global _watching_parent, _watching_workers
    _watching_parent = _watching_workers = False  # threads do not survive a fork
    if _workers_expected:
        watch_parent(force=True)


_workers_expected = False


def expect_workers() -> None:
    """Called in the build process before doit starts workers: forked children watch it."""
    global _workers_expected
    _workers_expected = True


os.register_at_fork(after_in_child=_after_fork_in_child)
