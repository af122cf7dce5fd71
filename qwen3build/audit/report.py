"""The audit's table: one row per package and one for the stack, then the flags."""
from __future__ import annotations

MB = 1e6
COLUMNS = (("package", "<"), ("role", "<"), ("layers", "<"), ("MB", ">"), ("states", ">"), ("flags", ">"),
           ("MB/token", ">"), ("min MB/token", ">"), ("ratio", ">"), ("prefill MB/prompt token", ">"))


def _mb(value: float) -> str:
    """Megabytes: one decimal from 10 MB, else three significant digits (tiny test stacks)."""
    return f"{value / MB:.1f}" if value >= 10 * MB else f"{value / MB:.3g}"


def _layers(package: dict) -> str:
    layers = package.get("layers")
    return f"{layers['first']}-{layers['last']}" if layers else "-"


RATIO_SHOWN_BELOW = 1000   # a package with next to nothing it must move (the sampler) shows ">999"


def _ratio(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < RATIO_SHOWN_BELOW else f">{RATIO_SHOWN_BELOW - 1}"


def _warnings(flags: list) -> str:
    warn = sum(1 for f in flags if f["severity"] == "warn")
    info = len(flags) - warn
    return f"{warn}" + (f" (+{info} info)" if info else "")


def _prefill(entry) -> str:
    return _mb(entry["bytes_per_prompt_token"]) if entry and entry.get("bytes_per_prompt_token") is not None else "-"


def table_rows(report: dict) -> list[tuple]:
    rows = []
    for p in report["packages"]:
        rows.append((p["name"], p["role"], _layers(p), _mb(p['package_bytes']), str(len(p["states"])),
                     _warnings(p["flags"]), _mb(p['decode_bytes_per_token']),
                     _mb(p['minimum_bytes_per_token']), _ratio(p["ratio"]), _prefill(p.get("prefill"))))
    s = report["stack"]
    rows.append(("stack", "", "", _mb(s['package_bytes']),
                 str(sum(len(p["states"]) for p in report["packages"])), _warnings(report["flags"]),
                 _mb(s['decode_bytes_per_token']), _mb(s['minimum_bytes_per_token']),
                 _ratio(s["ratio"]), _prefill(s.get("prefill"))))
    return rows


def format_table(rows: list[tuple]) -> str:
    header = tuple(name for name, _ in COLUMNS)
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(COLUMNS))]

    def line(row):
        return "  ".join(f"{str(cell):{align}{width}}" for cell, (_, align), width in zip(row, COLUMNS, widths))

    body = [line(r) for r in rows]
    return "\n".join([line(header), *body[:-1], "-" * len(body[-1]), body[-1]])


def format_report(report: dict) -> str:
    s = report["stack"]
    t = s["traffic"]
    lines = [f"audit of {s['models_dir']} (SEQ_LEN {s['seq_len']}, RECIPE {s['recipe']}, SHARDS {s['layout']})",
             format_table(table_rows(report)),
             f"per token: {s['dispatches_per_token']} dispatches ({', '.join(s['decode_chain'])})",
             f"modeled MB/token: weights {_mb(t['weights_read'])}, state read {_mb(t['state_read'])}, "
             f"state written {_mb(t['state_written'])}, intermediates {_mb(t['intermediate_written'])} "
             f"written + {_mb(t['intermediate_read'])} read, inputs {_mb(t['io'])}",
             f"minimum MB/token: weights as stored {_mb(s['weights_stored_bytes'])} + state "
             f"{_mb(s['state_bytes'])} + new rows {_mb(s['rows_bytes'])}"
             f" (traffic model: docs/audit.md)"]
    prefill = s.get("prefill") or {}
    if prefill.get("prefill_len"):
        lines.append(f"per prompt token (prefill blocks of {prefill['prefill_len']}): "
                     f"{prefill['dispatches_per_prompt_token']:.4g} dispatches ({', '.join(prefill['chain'])} per block), "
                     f"modeled {_mb(prefill['bytes_per_prompt_token'])} MB; plus one "
                     f"{prefill['per_prompt']['function']} call per prompt")
    else:
        lines.append("prefill: none (PREFILL_LEN=0: prompts take one decode dispatch chain per token)")
    updates = sorted({(p["name"], p["state_update"]) for p in report["packages"] if p["states"]})
    if updates:
        lines.append("state updates: " + ", ".join(f"{name} {how}" for name, how in updates))
    if report["flags"]:
        lines.append(f"flags ({len(report['flags'])}; rules and sources in audit.json and docs/audit.md):")
        width_rule = max(len(f["rule"]) for f in report["flags"])
        width_package = max(len(f["package"]) for f in report["flags"])
        for f in report["flags"]:
            mark = "warn" if f["severity"] == "warn" else "info"
            lines.append(f"  {mark}  {f['rule']:<{width_rule}}  {f['package']:<{width_package}}  {f['what']}")
    else:
        lines.append("flags: none")
    plan = report.get("compute_plan") or {}
    if "skipped" in plan:
        lines.append(f"compute plan: skipped ({plan['skipped']})")
    else:
        for name, entry in plan.items():
            off = [op for f in entry["functions"].values() for op in f["off_ane"]]
            lines.append(f"compute plan: {name} {entry['share']:.1%} of {entry['compute_ops']} compute ops on the "
                         f"Neural Engine" + (f"; not: {', '.join(sorted({o['op'] for o in off}))}" if off else ""))
    for failure in report.get("failures", []):
        lines.append(f"FAILED: {failure}")
    lines.append(f"audit took {report['seconds']:.1f} s")
    return "\n".join(lines)
