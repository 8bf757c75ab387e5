"""The storage layer on local disk and an in-memory fsspec store: URIs, atomic writes, names that stay
inside their folder, and the one-run-per-folder lock."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from storage import (
    Folder,
    FolderInUse,
    FolderLock,
    StorageConfig,
    absolute,
    is_temporary,
    join,
    pyarrow_filesystem,
    safe_relative,
)
from storage.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]


def test_local_paths_become_absolute_and_remote_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute(f"file://{tmp_path}/a") == str(tmp_path / "a")
    assert absolute("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert join("s3://b/p/", "run", "/final") == "s3://b/p/run/final"
    fs, path = pyarrow_filesystem("runs/x")
    assert path == str(tmp_path / "runs" / "x") and type(fs).__name__ == "LocalFileSystem"


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "s3://b/k", "", ".", "a\x00b", "\\x"])
def test_names_outside_the_folder_are_refused(name):
    with pytest.raises(ValueError, match="refusing"):
        safe_relative(name)


def test_writes_outside_the_folder_are_refused_and_nothing_is_written(tmp_path):
    out = Folder(str(tmp_path / "out"))
    for name in ("../escape.parquet", "/etc/passwd", "shards/../../x", "s3://other/x", ""):
        with pytest.raises(ValueError, match="refusing"):
            out.write_bytes(name, b"x")
    out.write_bytes("shards/ok.parquet", b"x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "out/shards/ok.parquet"
    ]


def test_write_is_atomic_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    folder = Folder(str(tmp_path / "out"))
    folder.write_json("a/b.json", {"x": 1})
    assert folder.read_json("a/b.json") == {"x": 1}
    assert folder.list("a") == ["a/b.json"]

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        folder.write_bytes("a/c.json", b"half")
    monkeypatch.undo()
    assert not folder.exists("a/c.json")
    assert folder.list("a", hidden=True) == ["a/b.json"], "no temporary file left behind"


def test_parquet_appears_only_when_closed(tmp_path):
    folder = Folder(str(tmp_path))
    table = pa.table({"key": ["a", "b"], "jpg": [b"\xff\xd8", b"\xff\xd8"]})
    sink = folder.parquet_sink("shards/0.parquet", table.schema)
    sink.write(table)
    assert folder.list("shards") == [] and any(is_temporary(n) for n in folder.list("shards", hidden=True))
    assert sink.close() > 0
    assert folder.read_parquet("shards/0.parquet").to_pydict() == table.to_pydict()
    assert folder.list("shards", hidden=True) == ["shards/0.parquet"]


def test_folder_pickles_with_its_options_and_works_on_memory_stores(tmp_path):
    config = StorageConfig(storage_options={"skip_instance_cache": False})
    folder = pickle.loads(pickle.dumps(Folder("memory://clipray-test/x", config)))
    assert folder.config == config and not folder.local
    folder.write_bytes("f.bin", b"abc")
    assert folder.read_bytes("f.bin") == b"abc" and folder.read_text("missing") is None
    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "m.txt").write_text("model")
    folder.upload(str(local), "final")
    assert folder.read_bytes("final/sub/m.txt") == b"model"
    assert folder.download("final/sub/m.txt", str(tmp_path / "down.txt"))
    assert (tmp_path / "down.txt").read_text() == "model"


def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_holder(tmp_path):
    folder = Folder(str(tmp_path / "out"))
    with FolderLock(folder, "clipray pipeline"):
        started = time.monotonic()
        with pytest.raises(FolderInUse, match=r"in use by another run: clipray pipeline \(host .*pid \d+"):
            FolderLock(folder, "clipray train").acquire()
        assert time.monotonic() - started < 1.0
    with FolderLock(folder, "clipray train"):  # released: the next run may go
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["what"] == "clipray train"
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    """SIGKILL leaves the lock file behind; the same machine sees its process is gone."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from storage import Folder, FolderLock
        FolderLock(Folder({str(out)!r}), "killed run").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match="killed run"):
            FolderLock(Folder(str(out)), "second").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert (out / LOCK_NAME).exists()
    with FolderLock(Folder(str(out)), "rerun"):
        assert json.loads((out / LOCK_NAME).read_text())["what"] == "rerun"


def test_a_remote_lock_expires_only_after_its_heartbeat_goes_stale():
    folder = Folder("memory://clipray-lock-test/out")
    other_host = {
        "owner": "x",
        "what": "run on node-7",
        "host": "node-7",
        "boot_id": "b",
        "pid": 1,
        "heartbeat": time.time(),
    }
    folder.write_json(LOCK_NAME, other_host)
    with pytest.raises(FolderInUse, match="run on node-7"):
        FolderLock(folder, "here", settle_s=0.0).acquire()
    folder.write_json(LOCK_NAME, {**other_host, "heartbeat": time.time() - 600})
    lock = FolderLock(folder, "here", settle_s=0.0, ttl_s=120).acquire()
    try:
        assert folder.read_json(LOCK_NAME)["owner"] == lock.owner
    finally:
        lock.release()
    assert not folder.exists(LOCK_NAME)


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    folder = Folder(str(tmp_path))
    with FolderLock(folder, "beating", heartbeat_s=0.05):
        first = folder.read_json(LOCK_NAME)["heartbeat"]
        deadline = time.monotonic() + 5
        while folder.read_json(LOCK_NAME)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert folder.read_json(LOCK_NAME)["heartbeat"] > first


def test_an_unreadable_lock_counts_as_held_until_it_is_old(tmp_path):
    folder = Folder(str(tmp_path))
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(FolderInUse, match="unreadable lock file"):
        FolderLock(folder, "x").acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    FolderLock(folder, "x").acquire().release()
