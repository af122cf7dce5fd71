"""One build at a time per tree: an exclusive lock on artifacts/.lock.

The first task of a doit run that reads or writes the tree takes the lock (so `doit list`
never waits) and holds it until the process exits; the kernel drops it when the process
dies, kill -9 included. A second build waits, saying which process holds it, or with
QWEN3BUILD_LOCK_WAIT=0 refuses in one line. Worker processes of `doit -n N` inherit the
holder's environment and share its lock.

Taking the lock also sweeps what dead builds left: work dirs in TMP_DIR, staging in the
cache and unfinished generations (only those whose owning process is gone).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import BuildError

log = logging.getLogger(__name__)

HELD_ENV = "QWEN3BUILD_TREE_LOCK"      # set to the lock path while this process tree holds it
WAIT_ENV = "QWEN3BUILD_LOCK_WAIT"      # seconds to wait for another build; 0 = refuse at once
DEFAULT_WAIT_SECONDS = 24 * 3600
POLL_SECONDS = 0.2

_held: dict[str, int] = {}  # lock path -> fd, for this process


def _close_in_child() -> None:
    """A forked worker closes its copy of the lock's file: the lock is the build process's
    alone, and is released when that process dies, whatever its workers do."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} ({info.get('command', '?')}, since {info.get('started', '?')})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _owner_pid(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def acquire(path: Path, sweep=None) -> bool:
    """Hold the tree lock for the rest of this process. Returns True when this call took it
    (and ran `sweep`), False when this process (tree) already held it."""
    key = str(path)
    if key in _held or os.environ.get(HELD_ENV) == key:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if _owner_pid(path) == os.getppid():  # a worker of the build that holds it (doit -n N)
            os.close(fd)
            return False
        wait = _wait_seconds()
        owner = _owner(path)
        if wait <= 0:
            os.close(fd)
            raise BuildError(f"another build holds {path}: {owner}; wait for it to finish "
                             f"(or set {WAIT_ENV} to a number of seconds to wait)") from None
        log.warning("waiting for the build that holds %s: %s", path, owner)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise BuildError(f"gave up after {wait:.0f} s waiting for {owner} to release {path}") from None
                time.sleep(POLL_SECONDS)
        log.info("%s is free: building", path)
    record = json.dumps({"pid": os.getpid(), "command": " ".join(os.path.basename(a) for a in sys.argv[:3]),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _held[key] = fd
    os.environ[HELD_ENV] = key
    if sweep is not None:
        sweep()
    return True


def _wait_seconds() -> float:
    raw = os.environ.get(WAIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_WAIT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise BuildError(f"{WAIT_ENV}={raw!r} is not a number of seconds") from None
    return value


def held(path: Path) -> bool:
    return str(path) in _held or os.environ.get(HELD_ENV) == str(path)
