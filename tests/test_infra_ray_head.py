"""tests/support/ray_head.py stops exactly the processes of its own clusters (without starting
Ray: stand-in processes play the cluster's daemons)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.ray_head import OWNER_FILE, TEMP_PREFIX, LocalRayCluster, _alive, reap_orphaned_clusters


def stand_in(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """A sleeping Python process whose command line carries `args` (as a daemon's flags do)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *args], cwd=cwd, start_new_session=True
    )


def fake_cluster_dir(owner_pid: int, started: str = "1") -> Path:
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))
    (folder / OWNER_FILE).write_text(f"{owner_pid} {started}")
    return folder


def as_cluster(folder: Path) -> LocalRayCluster:
    cluster = LocalRayCluster.__new__(LocalRayCluster)
    cluster.temp_dir, cluster.marker, cluster._sessions = folder, folder.name, set()
    return cluster


def wait_dead(proc: subprocess.Popen, timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.1)
    return False


def test_orphaned_cluster_processes_are_stopped_and_others_are_left_alone():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    folder = fake_cluster_dir(int(dead))
    (folder / "head").mkdir()
    by_flag = stand_in(f"--temp-dir={folder}/head")  # as gcs_server, raylet, dashboard
    by_cwd = stand_in(cwd=folder / "head")  # as a job driver in its working dir
    bystander = stand_in("--temp-dir=/tmp/ray")  # another Ray on the machine
    try:
        assert {by_flag.pid, by_cwd.pid} <= set(as_cluster(folder).owned_pids())
        assert bystander.pid not in as_cluster(folder).owned_pids()
        reap_orphaned_clusters()
        assert wait_dead(by_flag) and wait_dead(by_cwd)
        assert bystander.poll() is None and _alive(bystander.pid)
        assert not folder.exists()
    finally:
        for proc in (by_flag, by_cwd, bystander):
            proc.kill()
            proc.wait()


def test_a_cluster_whose_owner_still_runs_is_not_reaped():
    started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    folder = fake_cluster_dir(os.getpid(), started)
    daemon = stand_in(f"--temp-dir={folder}")
    try:
        reap_orphaned_clusters()
        time.sleep(0.5)
        assert daemon.poll() is None and folder.exists()
    finally:
        as_cluster(folder).stop(grace_s=5)
        assert wait_dead(daemon)
        assert not folder.exists()


@pytest.mark.parametrize("folder", [Path("."), Path("/tmp"), Path("/tmp/ray"), Path("/home/clipray-ray-x")])
def test_it_refuses_to_look_for_processes_outside_its_own_temp_dirs(folder: Path):
    with pytest.raises(ValueError, match="not a temp dir of this helper"):
        as_cluster(folder).owned_pids()
