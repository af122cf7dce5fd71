"""The Hugging Face release bundle of a built, verified stack (`doit release`, docs/release.md).

    from qwen3build.release import make_release, request_from_vars
    result = make_release(plan, request_from_vars(plan.tree, {"BASE_MODEL": "Qwen/Qwen3-1.7B"}))
    result.destination, result.files

Importing this package is cheap; the bundle code is loaded when a release starts.
"""
from .options import RELEASE_VARS, ReleaseRequest, request_from_vars


def make_release(plan, request):
    from .bundle import make_release as make
    return make(plan, request)


__all__ = ["RELEASE_VARS", "ReleaseRequest", "make_release", "request_from_vars"]
