"""A pipeline run killed with SIGKILL halfway (the CLI in its own process group, Ray's processes
with it) resumes to exactly the keys an uninterrupted run produces, without fetching what was
committed; the killed run's folder lock is taken over by the rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import DataConfig
from pipeline.run import run_pipeline
from storage.lock import LOCK_NAME
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes
from tests.test_pipeline_run import read_table, write_tsv

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (the unique RAY_TMPDIR of our subprocess)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_run_killed_halfway_resumes_to_the_same_keys(ray_local, tmp_path):
    n = 48
    routes = {f"/{i}.jpg": Route(body=jpeg_bytes(64, 48, seed=i), delay_s=0.1) for i in range(n)}
    routes.update({f"/gone{i}.jpg": Route(status=404, delay_s=0.1) for i in range(n)})
    with HTTPTestServer(routes) as server:

        def row(i: int):
            if i % 12 == 3:  # a line with 3 fields: a malformed row
                return b"http://127.0.0.1/ragged\tmore", b"fields", "malformed"
            if i % 12 == 7:  # the same url and caption as row i - 6: a duplicate, never fetched
                return row(i - 6)[:2] + ("duplicate",)
            return server.url(f"/{i}.jpg" if i % 5 else f"/gone{i}.jpg").encode(), f"image {i}".encode(), "fetched"

        rows = [row(i) for i in range(n)]
        write_tsv(tmp_path / "list.tsv", rows)
        common = dict(
            input=str(tmp_path / "list.tsv"),
            allow_private_addresses=True,
            rows_per_shard=4,
            num_download_actors=1,
            threads_per_actor=2,
            image_size=32,
            timeout_s=5,
            retries=0,
            progress=False,
            filters={"dedup_url_caption": True},
        )

        # An uninterrupted run for reference.
        reference = run_pipeline(DataConfig(output=str(tmp_path / "reference"), **common))
        assert len(server.requests) == sum(kind == "fetched" for *_, kind in rows)  # duplicates not fetched
        assert reference["reasons"]["malformed_row"] == n // 12
        assert reference["reasons"]["duplicate"] == n // 12

        # The same job from the CLI, killed with SIGKILL once some shards are committed.
        out = tmp_path / "killed"
        (tmp_path / "job.yaml").write_text(
            yaml.safe_dump({"data": {**common, "output": str(out)}, "ray": {"num_cpus": 2}})
        )
        ray_tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # short: Ray's socket paths must fit
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(PROJECT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--config", str(tmp_path / "job.yaml")],
            cwd=PROJECT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        markers = out / "_state" / "download"
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                if markers.exists() and len(list(markers.glob("*.json"))) >= 3:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the job finished (or failed) before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            # Ray's own processes die with their driver (fate sharing); wait for that, and end any
            # that did not -- they are ours: they carry our subprocess's RAY_TMPDIR.
            leftovers = _pids_with_env(ray_tmp)
            for _ in range(300):  # generous: a loaded 2-core machine is slow to reap
                if not leftovers:
                    break
                time.sleep(0.1)
                leftovers = _pids_with_env(ray_tmp)
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        assert not leftovers, f"Ray processes outlived the killed job: {leftovers}"
        done = sorted(p.stem for p in markers.glob("*.json"))
        assert 3 <= len(done) < n // 4, f"{len(done)} of {n // 4} shards were committed at the kill"
        assert not (out / "manifest.json").exists()
        assert (out / LOCK_NAME).exists(), "the killed run's lock is left behind (and taken over below)"
        committed_urls = {
            rows[int(name) * 4 + r][0].decode()
            for name in done
            for r in range(4)
            if rows[int(name) * 4 + r][2] == "fetched"
        }
        seen_before = len(server.requests)

        # The rerun finishes without redoing committed shards.
        resumed = run_pipeline(DataConfig(output=str(out), **common))
        refetched = {r.path for r in server.requests[seen_before:]}
        assert not {u.split(str(server.port), 1)[1] for u in committed_urls} & refetched
        assert resumed["run"]["shards_already_done"] == len(done)

    def keys(folder: Path, sub: str) -> list[str]:
        return sorted(read_table(folder / sub).column("key").to_pylist())

    assert keys(out, "shards") == keys(tmp_path / "reference", "shards")
    assert keys(out, "rejects") == keys(tmp_path / "reference", "rejects")
    assert len(keys(out, "shards")) == len(set(keys(out, "shards")))
    assert resumed["accepted"] + resumed["rejected"] == resumed["input_rows"] == n
    assert (resumed["accepted"], resumed["reasons"]) == (reference["accepted"], reference["reasons"])
