"""The table a build ends with: each package rebuilt, restored from cache, or up to date."""
from __future__ import annotations

import os

from .cache import RUN_ID_ENV, ActionCache


def _size(num_bytes) -> str:
    if not num_bytes:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def summary_rows(cache: ActionCache, artifact_ids: list[tuple[str, str]]) -> list[tuple]:
    run_id = os.environ.get(RUN_ID_ENV, "")
    rows = []
    for label, artifact_id in artifact_ids:
        state = cache.read_state(artifact_id) or {}
        if not state:
            status, seconds = "missing", "-"
        elif state.get("run_id") == run_id and run_id:
            status, seconds = state["status"], f"{state['seconds']:.2f}s"
        else:
            status, seconds = "up to date", "-"
        bpw = f"{state['bpw']:.2f}" if state.get("bpw") is not None else "-"
        rows.append((label, status, seconds, _size(state.get("bytes")), bpw))
    return rows


def format_table(rows) -> str:
    header = ("package", "status", "time", "size", "bits/weight")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
