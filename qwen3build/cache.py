"""Content-addressed action cache and atomic publication of artifacts.

cache/actions/<key>/ holds the outputs of one action exactly as built, plus meta.json.
An artifact is published into artifacts/ by building (or restoring) it aside and renaming
it into place, so an interrupted build never leaves half a package. Entries are never
modified after they are written, which lets a restore hard-link instead of copying.
A small state file per artifact (artifacts/.state/<id>.json) records the key it was made
from; doit's up-to-date check compares that key with the one computed now.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

RUN_ID_ENV = "QWEN3BUILD_RUN_ID"


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Recreate src at dst, hard-linking files (fast, no extra space) or copying."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(src, dst)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_atomically(new: Path, dest: Path) -> None:
    """Move new (file or dir) to dest; dest is never seen half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.is_dir():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
        os.rename(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


class ActionCache:
    def __init__(self, root: Path, tmp_dir: Path, state_dir: Path):
        self.root = root / "actions"
        self.tmp_dir = tmp_dir
        self.state_dir = state_dir

    # -- state stamps -------------------------------------------------------
    def state_path(self, artifact_id: str) -> Path:
        return self.state_dir / f"{artifact_id.replace(':', '__')}.json"

    def read_state(self, artifact_id: str) -> dict | None:
        try:
            return json.loads(self.state_path(artifact_id).read_text())
        except (OSError, ValueError):
            return None

    def is_current(self, artifact_id: str, key: str, outputs: list[Path]) -> bool:
        state = self.read_state(artifact_id)
        return bool(state) and state.get("key") == key and all(p.exists() for p in outputs)

    def write_state(self, artifact_id: str, record: dict) -> None:
        path = self.state_path(artifact_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)

    # -- the action ---------------------------------------------------------
    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def run(self, artifact_id: str, key: str, outputs: list[Path],
            build: Callable[[list[Path]], dict | None]) -> dict:
        """Make outputs for key: restore them from the cache, or build and store them.

        build(tmp_outputs) writes each output at the given temporary path and may return
        extra metadata (e.g. bytes saved) that is kept in the cache entry and the state.
        """
        started = time.perf_counter()
        entry = self.entry(key)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        work = self.tmp_dir / f"{artifact_id.replace(':', '__')}-{uuid.uuid4().hex[:8]}"
        work.mkdir(parents=True)
        try:
            if (entry / "meta.json").is_file():
                status = "restored"
                meta = json.loads((entry / "meta.json").read_text())
            else:
                status = "rebuilt"
                built = [work / f"out{i}" / out.name for i, out in enumerate(outputs)]
                for path in built:
                    path.parent.mkdir(parents=True)
                extra = build(built) or {}
                meta = {"artifact": artifact_id, "key": key, "outputs": [p.name for p in outputs],
                        "build_seconds": round(time.perf_counter() - started, 3),
                        "bytes": sum(tree_size(p) for p in built), **extra}
                self._store(entry, built, meta)
            staged = []
            for i, out in enumerate(outputs):
                stage = out.parent / f".{out.name}.new-{uuid.uuid4().hex[:8]}"
                out.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy_tree(entry / f"out{i}", stage)
                staged.append((stage, out))
            for stage, out in staged:
                replace_atomically(stage, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record = {**meta, "status": status, "seconds": round(time.perf_counter() - started, 3),
                  "run_id": os.environ.get(RUN_ID_ENV, ""), "key": key}
        self.write_state(artifact_id, record)
        log.info("%s: %s in %.2fs (%s)", artifact_id, status, record["seconds"], key[:12])
        return record

    def _store(self, entry: Path, built: list[Path], meta: dict) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = entry.parent / f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for i, path in enumerate(built):
                shutil.move(path, staging / f"out{i}")  # a rename when TMP_DIR and cache share a disk
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            try:
                os.rename(staging, entry)
            except OSError:  # another process stored the same key first: theirs is as good
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
