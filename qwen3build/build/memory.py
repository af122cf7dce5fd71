"""This process's memory, as the build records and plans it (Linux /proc; macOS fallbacks)."""
from __future__ import annotations

import os


def proc_kb(path: str, field: str) -> int | None:
    """A "Field:   N kB" line of a /proc file, in bytes; None where there is none."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS counter (Linux: /proc/self/clear_refs), so that the
    peak read after a build body is that body's, not the worker's lifetime high."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def current_rss() -> int | None:
    """Resident bytes of this process now (Linux VmRSS), else None."""
    return proc_kb("/proc/self/status", "VmRSS")


def peak_rss() -> int | None:
    """Peak resident bytes of this process since reset_peak_rss (Linux VmHWM), else the
    lifetime peak (getrusage; bytes on macOS, KB on Linux), or None."""
    peak = proc_kb("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable, macOS physical memory), or None."""
    available = proc_kb("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
