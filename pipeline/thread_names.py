"""The download actor's threads carry their Python names in the operating system too (Linux:
`/proc/<pid>/task/<tid>/comm`, what `top -H`, `ps -L` and `benchmarks/download_internet.py
--cpu-breakdown` show), so the network thread's CPU can be told from the decoders'. Python 3.14
does this itself; before it, threads are all named after the process."""

from __future__ import annotations

import sys
import threading

_PR_SET_NAME = 15
_prctl = None


def name_os_thread() -> None:
    """Give the calling thread's Python name (its first 15 bytes) to the OS thread; a no-op where
    that cannot be done."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return
    try:
        if _prctl is None:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        _prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: the names are only a convenience
        pass
