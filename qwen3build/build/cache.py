"""The action cache: one verified, immutable entry per key.

cache/actions/<kk>/<key>/ holds the outputs of one action exactly as built (out/<name>)
and meta.json, which records every file's size and xxh3_128 digest. An entry is written
in a staging directory, every file and meta.json are fsynced, and only then is it renamed
into place: a reader never sees a half-written entry, and a crash leaves staging that the
next build sweeps. Cache files are made read-only; nothing ever writes into an entry.

Reading trusts nothing: `open` checks every file's size and digest (xxh3 runs at several
GB/s) and treats a damaged or incomplete entry as missing: one warning line naming it,
the entry moved to cache/quarantine/, and the caller rebuilds. `has` is the cheap check
(meta.json and file sizes) that doit's up-to-date test uses.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

import xxhash

from .faults import crash_point
from .keys import digest_json

log = logging.getLogger(__name__)

META = "meta.json"
OUT = "out"
READ_CHUNK = 8 << 20
STAGING_MARK = ".staging-"
TMP_MARK = ".tmp-"


# ---------------------------------------------------------------- files

def file_digest(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as handle:
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def list_files(root: Path) -> list[Path]:
    """Every regular file under root (root itself if it is a file), sorted."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def describe_tree(root: Path) -> dict[str, list]:
    """relative path -> [size, xxh3] for every file under root ("" for a single file)."""
    out = {}
    for path in list_files(root):
        rel = "" if path == root else path.relative_to(root).as_posix()
        out[rel] = [path.stat().st_size, file_digest(path)]
    return out


def tree_digest(files: dict[str, list]) -> str:
    """The content digest of one output: its files' relative paths, sizes and digests."""
    return digest_json(files)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in list_files(path)) if path.exists() else 0


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (root included)."""
    paths = list_files(root)
    dirs = {root} if root.is_dir() else {root.parent}
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        dirs.add(path.parent)
    for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_read_only(root: Path) -> None:
    for path in list_files(root):
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def remove_path(path: Path) -> None:
    """Remove a file, link or tree (read-only files included)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        def writable_then_retry(function, target, _exc):
            os.chmod(os.path.dirname(target), 0o755)
            os.chmod(target, 0o644) if not os.path.isdir(target) else None
            function(target)
        shutil.rmtree(path, onerror=writable_then_retry)


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a killed process stays visible to kill(0) until its new parent reaps it
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def owner_name(mark: str) -> str:
    """The tail of a temporary name that says which process made it: <mark><pid>-<random>."""
    return f"{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_pid(name: str, mark: str) -> int | None:
    """The pid in a name ending with owner_name(mark), or None."""
    if mark not in name:
        return None
    pid = name.rsplit(mark, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def sweep_orphans(places, mark: str) -> list[Path]:
    """Remove the temporaries named with owner_name(mark) in `places` whose process is gone."""
    removed = []
    for place in places:
        if not place.is_dir():
            continue
        for path in place.iterdir():
            pid = owner_pid(path.name, mark)
            if pid is not None and not pid_alive(pid):
                remove_path(path)
                removed.append(path)
    return removed


# ---------------------------------------------------------------- the cache

class Damaged(Exception):
    """An entry failed verification (the message says how)."""


class ActionCache:
    def __init__(self, root: Path):
        self.root = root
        self.actions = root / "actions"
        self.quarantine_dir = root / "quarantine"

    def entry(self, key: str) -> Path:
        return self.actions / key[:2] / key

    def output_path(self, key: str, name: str) -> Path:
        return self.entry(key) / OUT / name

    def read_meta(self, key: str) -> dict | None:
        try:
            return json.loads((self.entry(key) / META).read_text())
        except (OSError, ValueError):
            return None

    # -- checks ---------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Cheap: meta.json is readable and every file it lists exists with its size."""
        meta = self.read_meta(key)
        if not meta or meta.get("key") != key:
            return False
        out = self.entry(key) / OUT
        try:
            for name, files in meta["files"].items():
                for rel, (size, _digest) in files.items():
                    path = out / name / rel if rel else out / name
                    if path.stat().st_size != size:
                        return False
        except (OSError, KeyError, TypeError, ValueError):
            return False
        return True

    def check(self, key: str) -> dict:
        """Full verification (every file's size and digest); returns meta or raises Damaged."""
        entry = self.entry(key)
        if not entry.is_dir():
            raise Damaged("missing")
        meta = self.read_meta(key)
        if meta is None:
            raise Damaged(f"no readable {META}")
        if meta.get("key") != key:
            raise Damaged(f"{META} names key {meta.get('key')!r}")
        out = entry / OUT
        try:
            listed = meta["files"]
            for name, files in listed.items():
                root = out / name
                present = {"" if path == root else path.relative_to(root).as_posix()
                           for path in (list_files(root) if root.exists() else [])}
                if present != set(files):
                    extra = sorted(set(present) - set(files))
                    lost = sorted(set(files) - set(present))
                    raise Damaged(f"output {name}: files {'missing ' + ', '.join(lost) if lost else ''}"
                                  f"{' unexpected ' + ', '.join(extra) if extra else ''}".strip())
                for rel, (size, digest) in files.items():
                    path = out / name / rel if rel else out / name
                    if path.stat().st_size != size:
                        raise Damaged(f"{name}/{rel}: size {path.stat().st_size}, recorded {size}")
                    if file_digest(path) != digest:
                        raise Damaged(f"{name}/{rel}: content differs from its recorded digest")
        except (OSError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, Damaged):
                raise
            raise Damaged(f"unreadable ({exc})") from None
        return meta

    def open(self, key: str, artifact: str = "") -> dict | None:
        """meta of a verified entry, or None when there is none (a damaged one is quarantined)."""
        if not self.entry(key).exists():
            return None
        try:
            meta = self.check(key)
        except Damaged as damage:
            self.quarantine(key, f"{artifact or 'entry'}: {damage}")
            return None
        self.touch(key)
        return meta

    def quarantine(self, key: str, reason: str) -> None:
        entry = self.entry(key)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{key}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(entry, target)
        except FileNotFoundError:
            return
        except OSError:
            remove_path(entry)
            target = None
        log.warning("cache entry %s is damaged (%s): %s; rebuilding it", key[:12], reason,
                    f"moved to {target}" if target else "removed")

    def touch(self, key: str) -> None:
        """Record a use (for least-recently-used gc) beside the entry, never inside it."""
        marker = self.entry(key).with_name(f"{key}.used")
        try:
            marker.touch()
        except OSError:
            pass

    def last_used(self, key: str) -> float:
        for path in (self.entry(key).with_name(f"{key}.used"), self.entry(key) / META):
            try:
                return path.stat().st_mtime
            except OSError:
                continue
        return 0.0

    # -- writing ---------------------------------------------------------------
    def staging(self, key: str) -> Path:
        """A fresh staging directory for key, on the cache's filesystem."""
        parent = self.entry(key).parent
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / f"{key}{owner_name(STAGING_MARK)}"
        (path / OUT).mkdir(parents=True)
        return path

    def store(self, key: str, staging: Path, meta: dict) -> dict:
        """Seal staging/out/* as the entry for key and return its meta (with file digests).

        If a valid entry for key appeared meanwhile (another build), ours is dropped."""
        out = staging / OUT
        files = {name: describe_paths(out / name) for name in meta["outputs"]}
        meta = {**meta, "key": key, "files": files,
                "digests": {name: tree_digest(f) for name, f in files.items()}}
        make_read_only(out)
        (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        fsync_tree(staging)
        crash_point("cache:sealed")
        entry = self.entry(key)
        if entry.exists():
            try:
                self.check(key)
                remove_path(staging)
                return self.read_meta(key)
            except Damaged as damage:
                self.quarantine(key, str(damage))
        try:
            os.rename(staging, entry)
        except OSError:  # another process stored the same key between our check and rename
            remove_path(staging)
            return self.check(key)
        fsync_dir(entry.parent)
        crash_point("cache:stored")
        self.touch(key)
        return meta

    # -- housekeeping ----------------------------------------------------------
    def sweep(self) -> list[Path]:
        """Remove staging directories of processes that no longer run."""
        prefixes = [p for p in self.actions.iterdir() if p.is_dir()] if self.actions.is_dir() else []
        return sweep_orphans(prefixes, STAGING_MARK)

    def keys(self) -> list[str]:
        if not self.actions.is_dir():
            return []
        return sorted(p.name for prefix in self.actions.iterdir() if prefix.is_dir()
                      for p in prefix.iterdir() if p.is_dir() and STAGING_MARK not in p.name)

    def remove(self, key: str) -> None:
        remove_path(self.entry(key))
        self.entry(key).with_name(f"{key}.used").unlink(missing_ok=True)


def describe_paths(root: Path) -> dict[str, list]:
    return describe_tree(root) if root.exists() else {}
