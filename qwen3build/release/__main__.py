"""python -m qwen3build.release [SETTING=value ...] [RELEASE_DIR=... BASE_MODEL=... ...]

Same settings as `doit build` plus the release variables (and TEXT / REPORT /
AUDIT_REPORT naming the reports it reads); writes the release folder without doit (the
build, `doit verify` and `doit audit` must have run). Exits 0 on success, 2 on a usage or
input error (one line on stderr)."""
from __future__ import annotations

import sys

from ..errors import BuildError
from ..logs import configure
from ..settings.settings import split_assignments


def main(argv: list[str] | None = None) -> int:
    from ..audit.options import AUDIT_VARS
    from .options import RELEASE_VARS, VERIFY_REPORT_VARS
    configure()
    known = RELEASE_VARS + VERIFY_REPORT_VARS + AUDIT_VARS
    try:
        settings, variables = split_assignments(sys.argv[1:] if argv is None else argv, known)
    except BuildError as error:
        print(f"qwen3build release: {error}", file=sys.stderr)
        return 2
    try:
        from ..build.actions import Builder
        from ..build.plan import make_plan
        from .bundle import format_result, make_release
        from .options import request_from_vars
        builder = Builder(make_plan(settings))
        builder.lock()
        result = make_release(builder.plan, request_from_vars(builder.tree, variables))
    except BuildError as error:
        print(f"qwen3build release: {error}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
