"""The short terminal table of a verify report (the JSON report holds everything)."""
from __future__ import annotations


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _ppl(entry: dict, rung: bool) -> str:
    if not entry or not entry.get("windows"):
        return "-"
    if not rung:
        return f"{entry['oracle'] if 'oracle' in entry else entry['ppl']:.3f} x{entry['windows']}"
    return f"{entry['rung']:.3f} {entry['drift']:+.2%}"


def format_report(report: dict) -> str:
    sizes = [str(s) for s in sorted(report["windows"]["sizes"])]
    header = ["rung", "backend", "top-1 (n)", "top-5", "KL mean", "cos min"] + [f"PPL {s}" for s in sizes] + ["greedy", "tok/s"]
    rows = [["oracle", "HF fp32", "-", "-", "-", "-"]
            + [_ppl(report["oracle"]["perplexity"].get(s), rung=False) for s in sizes] + ["-", "-"]]
    for name, fig in report["rungs"].items():
        tf, greedy = fig["teacher_forced"], fig["greedy"]
        top1 = f"{_num(tf['top1'], '.4f')} ({tf['qualified']})"
        greedy_text = (f"{greedy['identical'] + greedy['knife_edge']}/{greedy['prompts']}"
                       + (f" ({greedy['knife_edge']} tie)" if greedy["knife_edge"] else "")) if greedy["prompts"] else "-"
        rows.append([name, fig["backend"], top1, _num(tf["top5"], ".4f"), _num(tf["mean_kl"], ".2e"),
                     _num(tf["min_cosine"], ".5f")]
                    + [_ppl(fig["perplexity"].get(s), rung=True) for s in sizes]
                    + [greedy_text, _num(fig["tokens_per_second"], ".1f")])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    text = report["text"]
    out = [f"verify RECIPE={report['recipe']}: {text['path'].rsplit('/', 1)[-1]} ({text['tokens']} tokens), "
           f"SEQ_LEN {report['seq_len']}, runs {len(report['windows']['runs'])}; "
           f"top-1 counts positions with oracle margin >= {report['knife_edge_margin']}",
           line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    for note in report["windows"].get("notes", []):
        out.append(f"note: {note}")
    parity = report.get("prefill_parity")
    if parity and "skipped" in parity:
        out.append(f"prefill parity: skipped ({parity['skipped']})")
    elif parity:
        worst_kl = max(max(p["prompt"]["max_kl"], p["continuation"]["max_kl"]) for p in parity["prompts"])
        worst_cos = min(min(p["prompt"]["min_cosine"], p["continuation"]["min_cosine"]) for p in parity["prompts"])
        verdicts = ", ".join(f"{p['length']} tokens {p['continuation']['verdict']}" for p in parity["prompts"])
        out.append(f"prefill parity (PREFILL_LEN {parity['prefill_len']}, packages): max KL {worst_kl:.2e}, "
                   f"min cosine {worst_cos:.6f} vs decode alone; continuations: {verdicts}"
                   + ("" if not parity["failures"] else f"; {len(parity['failures'])} failure(s)"))
    budget = report["rungs"].get("packages", {}).get("budget")
    if budget:
        out.append(f"note: packages limited to {budget} teacher-forced positions (PACKAGE_POSITIONS)")
    coreai = report["rungs"].get("coreai")
    if coreai:
        out.append(f"note: coreai limited to {coreai['budget'] or 'all'} teacher-forced positions (COREAI_POSITIONS) "
                   f"and {coreai['greedy']['prompts']} greedy rollout(s) (COREAI_ROLLOUTS)")
    if report["passed"]:
        out.append(f"PASSED: every rung within [verify.{report['recipe']}]")
    else:
        out.append(f"FAILED: {len(report['failures'])} threshold(s) of [verify.{report['recipe']}] or of the prefill "
                   "parity missed")
        out += [f"  - {failure}" for failure in report["failures"]]
    if report.get("report_path"):
        out.append(f"report: {report['report_path']}")
    return "\n".join(out)
