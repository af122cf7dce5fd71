"""doit glue of `doit audit`: a picklable action and an up-to-date check, called with plain
data like the build's own (qwen3build.build.doit_glue)."""
from __future__ import annotations

from doit.exceptions import TaskFailed

from ..build.doit_glue import PREFIX, _one_line, builder
from ..errors import BuildError


def _request(source, variables):
    from .options import request_from_vars
    return request_from_vars(builder(source).tree, variables)


def audit_action(source, variables):
    def audit():
        from .report import format_report
        from .run import run_audit
        b = builder(source)
        b.lock()
        report = run_audit(b.tree.out_dir, _request(source, variables))
        print(format_report(report))
        if not report["passed"]:
            return TaskFailed(f"{PREFIX} audit failed: " + "; ".join(report["failures"]))
    return _one_line(audit)


class AuditCheck:
    """doit up-to-date check of audit: a passing report of exactly these packages, code and variables."""

    def __init__(self, source, variables):
        self.source, self.variables = source, variables

    def __call__(self):
        from .run import report_is_current
        try:
            return report_is_current(builder(self.source).tree.out_dir, _request(self.source, self.variables))
        except BuildError:
            return False

    def __repr__(self):
        return "a passing audit report of exactly these packages, audit code and variables"
