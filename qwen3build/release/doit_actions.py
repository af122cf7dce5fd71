"""doit glue of `doit release`: a picklable action and an up-to-date check, called with
plain data like the build's own (qwen3build.build.doit_glue)."""
from __future__ import annotations

from ..build.doit_glue import _one_line, builder
from ..errors import BuildError


def _request(source, variables):
    from .options import request_from_vars
    return request_from_vars(builder(source).tree, variables)


def release_action(source, variables):
    def release():
        from .bundle import format_result, make_release
        b = builder(source)
        b.lock()  # no build may swap the published stack while it is zipped
        result = make_release(b.plan, _request(source, variables))
        print(format_result(result))
    return _one_line(release)


class ReleaseCheck:
    """doit up-to-date check of release: the folder holds what a release of exactly these
    packages, reports, checkpoint files, card template, code and variables wrote."""

    def __init__(self, source, variables):
        self.source, self.variables = source, variables

    def __call__(self):
        from .bundle import is_current
        try:
            return is_current(builder(self.source).plan, _request(self.source, self.variables))
        except BuildError:
            return False

    def __repr__(self):
        return "a release folder written from exactly these packages, reports, card template and variables"
