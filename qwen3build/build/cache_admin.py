"""Looking after the action cache: status, verification and least-recently-used eviction.

    qwen3build cache status [NAME=value ...]       entries and bytes by kind, what the settings use
    qwen3build cache verify                        check every entry's files against their digests
    qwen3build cache gc --max-size 20G             evict least recently used entries down to 20 GB

An entry in use is never evicted: the keys of every published generation of the tree
(the current one and the one kept before it) and, when the weights manifest is there, the
keys the given settings declare. A 1.7B setting costs gigabytes, and users flip settings;
CACHE_MAX_SIZE applies the same eviction after every build.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from .cache import ActionCache, Damaged, list_files, remove_path

log = logging.getLogger(__name__)

def human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1024 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


@dataclasses.dataclass
class Entry:
    key: str
    kind: str          # artifact kind: slanc, quant, shard, io_model, sampler_model, ...
    artifact: str
    bytes: int
    last_used: float


def entries(cache: ActionCache) -> list[Entry]:
    out = []
    for key in cache.keys():
        meta = cache.read_meta(key) or {}
        artifact = meta.get("artifact", "?")
        size = sum(p.stat().st_size for p in list_files(cache.entry(key)))
        out.append(Entry(key, artifact.split(":")[0], artifact, size, cache.last_used(key)))
    return out


def keys_in_use(builder) -> set[str]:
    """Keys of every published generation of the tree, and of the current settings."""
    used = set()
    root = builder.tree.generations_dir
    if root.is_dir():
        for generation in root.iterdir():
            try:
                used.update(json.loads((generation / "generation.json").read_text())["artifacts"].values())
            except (OSError, ValueError, KeyError, TypeError):
                continue
    for artifact in builder.plan.artifact_ids():
        key = builder.key(artifact)
        if key:
            used.add(key)
    return used


def status(builder) -> dict:
    cache = builder.cache
    used = keys_in_use(builder)
    listed = entries(cache)
    by_kind: dict[str, dict] = {}
    for entry in listed:
        row = by_kind.setdefault(entry.kind, {"entries": 0, "bytes": 0, "in_use": 0, "in_use_bytes": 0})
        row["entries"] += 1
        row["bytes"] += entry.bytes
        if entry.key in used:
            row["in_use"] += 1
            row["in_use_bytes"] += entry.bytes
    quarantined = sum(p.stat().st_size for p in list_files(cache.quarantine_dir)) if cache.quarantine_dir.is_dir() else 0
    return {"cache": str(cache.root), "entries": len(listed), "bytes": sum(e.bytes for e in listed),
            "in_use": sum(1 for e in listed if e.key in used), "by_kind": by_kind, "quarantine_bytes": quarantined}


def format_status(report: dict) -> str:
    lines = [f"cache {report['cache']}: {report['entries']} entries, {human(report['bytes'])} "
             f"({report['in_use']} in use by the published stacks and these settings)"]
    header = ("kind", "entries", "size", "in use", "in-use size")
    rows = [(kind, str(r["entries"]), human(r["bytes"]), str(r["in_use"]), human(r["in_use_bytes"]))
            for kind, r in sorted(report["by_kind"].items())]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if report["quarantine_bytes"]:
        lines.append(f"quarantine: {human(report['quarantine_bytes'])} of damaged entries "
                     f"(kept for inspection; `qwen3build cache gc` removes them)")
    return "\n".join(lines)


def verify_all(cache: ActionCache) -> tuple[int, list[str]]:
    """(entries checked, one line per damaged entry); damaged entries are quarantined."""
    damaged = []
    keys = cache.keys()
    for key in keys:
        try:
            cache.check(key)
        except Damaged as damage:
            meta = cache.read_meta(key) or {}
            damaged.append(f"{key[:16]} ({meta.get('artifact', '?')}): {damage}")
            cache.quarantine(key, f"{meta.get('artifact', 'entry')}: {damage}")
    return len(keys), damaged


def collect_garbage(builder, max_bytes: int) -> tuple[int, int]:
    """Evict least recently used entries not in use until the cache is at most max_bytes;
    empty the quarantine. Returns (entries removed, bytes freed)."""
    cache = builder.cache
    if cache.quarantine_dir.is_dir():
        remove_path(cache.quarantine_dir)
    used = keys_in_use(builder)
    listed = entries(cache)
    total = sum(e.bytes for e in listed)
    removed = freed = 0
    for entry in sorted(listed, key=lambda e: e.last_used):
        if total <= max_bytes:
            break
        if entry.key in used:
            continue
        cache.remove(entry.key)
        total -= entry.bytes
        freed += entry.bytes
        removed += 1
    if total > max_bytes:
        log.warning("cache %s: %s in use by the published stacks and these settings, above the %s asked for",
                    cache.root, human(total), human(max_bytes))
    return removed, freed
