"""Run saved .mlpackage files with numpy, on any OS, to check the bytes the build emits.

    from qwen3build.evaluator import PackageEvaluator
    evaluator = PackageEvaluator("build/decoder_shard_left.mlpackage")
    state = evaluator.new_state()
    outputs = evaluator.predict({"hidden_states": x, "position": p}, state)

See docs/evaluator.md for the semantics (fp32 compute, rounding to each op's declared
dtype) and the limits.
"""

from .engine import PackageEvaluator
from .loader import LoadedFunction, PackageInterface, load_function, read_interface
from .ops import KERNELS

__all__ = ["PackageEvaluator", "LoadedFunction", "PackageInterface", "load_function", "read_interface", "KERNELS"]
