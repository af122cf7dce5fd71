"""Named crash points, for the kill -9 tests.

With QWEN3BUILD_CRASH_AT=<name> in the environment, the build kills itself with SIGKILL
when it reaches that point, exactly as an external `kill -9` at that moment would: no
exception handler, finally block or atexit runs. Unset (always, outside the tests), a
crash point is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "QWEN3BUILD_CRASH_AT"
# Every point the build has, in the order a build passes them.
POINTS = ("weights:hashed", "artifact:built", "cache:sealed", "cache:stored", "publish:assembled",
          "publish:renamed", "publish:between-links", "publish:linked")


def crash_point(name: str) -> None:
    """In a worker of `doit -n N`, the build process is killed first: the test means
    "kill -9 the build at this moment", whichever process reached it."""
    if os.environ.get(ENV) == name:
        import multiprocessing
        if multiprocessing.parent_process() is not None:
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
