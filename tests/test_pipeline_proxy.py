"""`clipray pipeline` with HTTP_PROXY set fetches through the proxy (issue 15 acceptance), end to end:
the CLI in its own process starts its own Ray, whose download actors inherit the environment.

The URLs point at a loopback address where nothing listens (127.0.0.9, port 9): fetched directly,
every row would be a connection error. The proxy is a loopback server that answers the
absolute-form requests a client sends to a proxy, so a row is accepted only through it, and the
proxy's log shows each URL it was asked for. A URL listed in NO_PROXY goes direct (and fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.support.http_server import HTTPTestServer, jpeg_bytes

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_clipray_pipeline_fetches_through_the_proxy_named_by_http_proxy(tmp_path):
    images = {f"http://127.0.0.9:9/{i}.jpg": jpeg_bytes(48, 40, seed=i) for i in range(3)}
    with HTTPTestServer(images) as proxy:
        rows = [*images, "http://127.0.0.10:9/direct.jpg"]
        (tmp_path / "list.tsv").write_text("url\tcaption\n" + "".join(f"{u}\timage {i}\n" for i, u in enumerate(rows)))
        data = {
            "input": str(tmp_path / "list.tsv"),
            "output": str(tmp_path / "out"),
            "allow_private_addresses": True,
            "image_size": 32,
            "retries": 0,
            "timeout_s": 5,
            "progress": False,
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({"data": data, "ray": {"num_cpus": 4}}))
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env.update(
            HTTP_PROXY=f"http://127.0.0.1:{proxy.port}",
            NO_PROXY="127.0.0.10",
            NO_ALBUMENTATIONS_UPDATE="1",
            PYTHONPATH=str(PROJECT),
            RAY_ADDRESS="",
        )
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "--config", str(tmp_path / "job.yaml")],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # Only our URLs: Ray's dashboard, which inherits HTTP_PROXY too, probes the cloud metadata
        # endpoints (169.254.169.254, metadata.google.internal) at start, whatever
        # RAY_USAGE_STATS_ENABLED says (ray/dashboard/modules/usage_stats): through the proxy here.
        asked = sorted(p for p in proxy.paths() if p.startswith("http://127.0.0."))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["accepted"], manifest["rejected"]) == (3, 1)
    assert manifest["reasons"] == {"connection_error": 1}  # the NO_PROXY host, fetched directly
    assert asked == sorted(images), "the proxy saw exactly the proxied URLs, in absolute form"
    stored = {}
    for f in sorted((tmp_path / "out" / "shards").glob("*.parquet")):
        for row in pq.read_table(f, columns=["url", "width", "height", "original_width"]).to_pylist():
            stored[row["url"]] = row
    assert sorted(stored) == sorted(images)
    assert all(row["original_width"] == 48 for row in stored.values())
