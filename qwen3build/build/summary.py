"""The table a build ends with: each package rebuilt, restored from the cache, or up to date."""
from __future__ import annotations

from .plan import AIMODEL


def human_size(num_bytes) -> str:
    if not num_bytes:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def summary_rows(builder, statuses: dict) -> list[tuple]:
    rows = []
    for artifact in builder.plan.format_ids():
        twin = artifact.removeprefix(f"{AIMODEL}:")
        label = f"decoder_shard_{twin[6:]}" if twin.startswith("shard:") else twin
        label += ".aimodel" if twin != artifact else ""
        state = builder.read_state(artifact)
        status = statuses.get(artifact, "missing")
        seconds = f"{state['seconds']:.2f}s" if status in ("rebuilt", "restored") and "seconds" in state else "-"
        key = builder.key(artifact)
        meta = builder.cache.read_meta(key) if key else None
        bpw = (meta or {}).get("extra", {}).get("bpw")
        peak = (meta or {}).get("peak_rss")
        rows.append((label, status, seconds, human_size((meta or {}).get("bytes")), f"{bpw:.2f}" if bpw else "-",
                     human_size(peak) if peak else "-"))
    return rows


def format_table(rows) -> str:
    header = ("package", "status", "time", "size", "bits/weight", "build peak RSS")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
