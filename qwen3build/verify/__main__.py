"""python -m qwen3build.verify [SETTING=value ...] [TEXT=... WINDOWS=... ...]

Same settings as `doit build` (CONFIG, SEQ_LEN, SHARDS, RECIPE, OUT_DIR, ...) plus the
verify variables; prints the table and exits 0 when the gate passes, 1 when a threshold
fails, 2 on a usage or input error (one line on stderr)."""
from __future__ import annotations

import sys

from ..settings.settings import split_assignments
from ..errors import BuildError
from ..logs import configure
from .report import format_report
from .ladder import run_verify
from .options import VERIFY_VARS, request_from_vars


def main(argv: list[str] | None = None) -> int:
    configure()
    try:
        settings, variables = split_assignments(sys.argv[1:] if argv is None else argv, VERIFY_VARS)
    except BuildError as error:
        print(f"qwen3build verify: {error}", file=sys.stderr)
        return 2
    try:
        from ..build.plan import make_plan
        plan = make_plan(settings)
        request = request_from_vars(plan, variables)
        report = run_verify(plan, request.text_path, request.report_path, request.options)
    except BuildError as error:
        print(f"qwen3build verify: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
