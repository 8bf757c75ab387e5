"""The download actor's threads carry their names into the OS (what `--cpu-breakdown` reads)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from pipeline.thread_names import name_os_thread


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are read from /proc (Linux)")
def test_the_os_thread_takes_the_python_name_cut_to_15_bytes():
    seen = {}

    def body():
        name_os_thread()
        seen["comm"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    thread = threading.Thread(target=body, name="decode-0-and-a-long-tail")
    thread.start()
    thread.join()
    assert seen["comm"] == "decode-0-and-a-"
