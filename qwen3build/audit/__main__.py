"""Audit a published stack without building: `python -m qwen3build.audit --models-dir OUT_DIR`.

`doit audit` is the keyed task (it builds first); this audits whatever OUT_DIR holds, e.g. a
stack built by another checkout, and writes the same report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import BuildError
from ..logs import configure as configure_logging
from ..paths import BuildTree
from .options import AuditRequest, default_report_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3build.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, required=True, help="a published OUT_DIR (holds stack.json)")
    parser.add_argument("--report", type=Path, default=None,
                        help="where audit.json goes (default: <artifacts>/audit/audit.json of that tree)")
    parser.add_argument("--ane-min-residency", default=None,
                        help="macOS: the least share of compute ops on the Neural Engine per ANE package")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        from .report import format_report
        from .run import run_audit
        out = args.models_dir.expanduser().absolute()   # not resolved: OUT_DIR is a link into a generation
        # Only the tree's artifacts root is derived here (BuildTree's rule); the other dirs are unused.
        report_path = args.report or default_report_path(BuildTree(out, out, out, out))
        report = run_audit(out, AuditRequest(report_path.expanduser().resolve(), args.ane_min_residency))
    except BuildError as error:
        print(f"qwen3build: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"report: {report_path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
