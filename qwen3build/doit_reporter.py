"""doit console reporter that prints a user-facing failure as its one line.

Actions turn a BuildError (bad input: the user can fix it) into doit's TaskFailed with
a message starting "qwen3build:"; this reporter prints that line alone, without doit's
"TaskFailed - taskid:..." frame. Anything else (a bug) keeps the full report.
"""
from __future__ import annotations

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

PREFIX = "qwen3build:"


class OneLineFailureReporter(ConsoleReporter):
    desc = "console; user errors as one line"

    def add_failure(self, task, fail):
        message = fail.get_msg().strip() if isinstance(fail, TaskFailed) else ""
        if message.startswith(PREFIX):
            self.failures.append({"task": task, "exception": fail})
            self.write(f"{message.splitlines()[0]}\n")
            return
        super().add_failure(task, fail)
