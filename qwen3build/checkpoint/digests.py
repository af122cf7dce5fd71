"""Per-tensor content digests of a checkpoint, remembered per file under its stat.

xxh3_128 of each tensor's bytes (with its dtype and shape), computed from the safetensors
header offsets, stored in sqlite under the file's (path, inode, size, mtime_ns): a no-op
build reads no weight bytes, and a `touch` costs one re-hash, never more.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import xxhash

from ..errors import BuildError
from .reader import Checkpoint

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 16 << 20  # hashing reads this much at a time


def tensor_hasher(entry):
    """A hasher primed with the tensor's dtype and shape; feed it the tensor's bytes."""
    hasher = xxhash.xxh3_128()
    hasher.update(f"{entry.dtype}{entry.shape}".encode())
    return hasher


class DigestStore:
    """Per-file tensor digests keyed on (path, inode, size, mtime_ns), in sqlite."""

    def __init__(self, db_path: Path):
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(db_path, timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, inode INTEGER, size INTEGER, mtime_ns INTEGER, digests TEXT)")
        self.bytes_hashed = 0

    def file_digests(self, checkpoint: Checkpoint, path: Path) -> dict[str, str]:
        st = path.stat()
        row = self.db.execute("SELECT inode, size, mtime_ns, digests FROM files WHERE path=?", (str(path),)).fetchone()
        if row and tuple(row[:3]) == (st.st_ino, st.st_size, st.st_mtime_ns):
            return json.loads(row[3])
        digests = {}
        buffer = bytearray(HASH_CHUNK_BYTES)
        with open(path, "rb", buffering=0) as handle:
            for name, entry in sorted(checkpoint.entries.items(), key=lambda item: item[1].begin):
                if entry.file != path:
                    continue
                hasher = tensor_hasher(entry)
                handle.seek(entry.begin)
                remaining = entry.end - entry.begin
                while remaining:
                    got = handle.readinto(memoryview(buffer)[:min(remaining, HASH_CHUNK_BYTES)])
                    if not got:
                        raise BuildError(f"{path}: ends inside tensor {name}; the file is truncated")
                    hasher.update(memoryview(buffer)[:got])
                    remaining -= got
                self.bytes_hashed += entry.end - entry.begin
                digests[name] = hasher.hexdigest()
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                            (str(path), st.st_ino, st.st_size, st.st_mtime_ns, json.dumps(digests)))
        log.info("hashed %s: %d tensors, %.1f MB", path.name, len(digests), sum(
            checkpoint.entries[n].end - checkpoint.entries[n].begin for n in digests) / 1e6)
        return digests

    def close(self):
        self.db.close()


def stat_signature(paths: list[Path]) -> list:
    out = []
    for path in paths:
        st = path.stat()
        out.append([str(path), st.st_ino, st.st_size, st.st_mtime_ns])
    return out
