"""One pipeline run per output folder: while a run downloads into `data.output`, a second
`clipray pipeline` on the same folder stops at once (before it starts Ray) naming the holder, and
its files are left alone; once the first run ends, the folder is free again. (A run killed with
SIGKILL leaves its lock behind; tests/test_pipeline_run.py's resume test reruns over it.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import DataConfig
from pipeline.run import run_pipeline
from storage.lock import LOCK_NAME
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_second_run_on_a_busy_output_fails_at_once_and_touches_nothing(ray_local, tmp_path):
    n = 4
    routes = {f"/{i}.jpg": Route(body=jpeg_bytes(40, 30, seed=i)) for i in range(n)}
    routes["/hang.jpg"] = Route(hang=True)  # holds the first run until the server stops
    server = HTTPTestServer(routes).start()
    try:
        (tmp_path / "list.tsv").write_text(
            "url\tcaption\n" + "".join(f"{server.url(f'/{i}.jpg')}\timage {i}\n" for i in [*range(n), "hang"])
        )
        common = dict(
            input=str(tmp_path / "list.tsv"),
            output=str(tmp_path / "out"),
            allow_private_addresses=True,
            rows_per_shard=5,
            num_download_actors=1,
            threads_per_actor=1,
            image_size=32,
            retries=0,
            timeout_s=300,
            progress=False,
        )
        result: dict = {}
        first = threading.Thread(target=lambda: result.update(run_pipeline(DataConfig(**common))))
        first.start()
        try:
            lock = tmp_path / "out" / LOCK_NAME
            deadline = time.time() + 120
            while not lock.exists() and time.time() < deadline and first.is_alive():
                time.sleep(0.05)
            assert lock.exists(), "the first run never took the folder's lock"
            while not any(r.path == "/hang.jpg" for r in server.requests) and time.time() < deadline:
                time.sleep(0.05)  # busy downloading: its four images are in, the fifth hangs
            before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out").rglob("*"))

            (tmp_path / "job.yaml").write_text(yaml.safe_dump({"data": common}))
            env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(PROJECT)}
            started = time.monotonic()
            second = subprocess.run(
                [sys.executable, "-m", "pipeline", "--config", str(tmp_path / "job.yaml")],
                cwd=PROJECT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            took = time.monotonic() - started
            assert first.is_alive(), "the first run ended before the second one was tried"
            assert second.returncode == 2, second.stderr[-2000:]
            assert "is in use by another run: clipray pipeline" in second.stderr
            assert f"pid {os.getpid()}" in second.stderr  # the holder: this test process
            assert "Started a local Ray instance" not in second.stderr + second.stdout
            assert took < 60, f"the refusal took {took:.0f} s"
            after = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out").rglob("*"))
            assert set(before) <= set(after), "the refused run removed files of the running one"
        finally:
            server.stop()  # the hanging request fails: the first run finishes
            first.join(timeout=300)
    finally:
        server.stop()
    assert result["accepted"] == n, result["reasons"]
    assert result["accepted"] + result["rejected"] == result["input_rows"] == n + 1
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    again = run_pipeline(DataConfig(**common))  # free again: a rerun of the finished job
    assert again["run"]["shards_already_done"] == 1 and again["accepted"] == n
