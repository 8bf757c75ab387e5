"""A real Ray cluster on 127.0.0.1 for end-to-end tests: `ray start --head` (+ worker nodes).

The cluster lives in its own short temp dir (`/tmp/clipray-ray-*`, one sub-folder per node),
runs with the project's venv first on PATH (the entrypoint of a `ray job submit` runs `python`
from the head's PATH), and is stopped by ending exactly the processes it started, by PID (see
`owned_pids`). Never a machine-wide `ray stop`: other Ray instances on the machine are left alone.
A test process killed before its teardown leaves its cluster behind; the next cluster this helper
starts stops such orphans (`reap_orphaned_clusters`: their temp dir names a dead owner).

Three things Ray 2.60 does by default that a shared test machine must not get:
- it replaces `--node-ip-address=127.0.0.1` by the machine's routable address and binds its
  servers to every interface. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps every node on
  127.0.0.1; `ray start` then refuses worker nodes (a guard meant for laptops), so worker nodes
  are started through `ray.scripts.scripts` with only that CLI guard lifted (`ray_compat.LOOPBACK_WORKER_NODE_START`).
- `ray start --head` turns token authentication on with the machine-wide `~/.ray/auth_token`.
  The cluster gets its own random token instead (`RAY_AUTH_TOKEN`); clients use `self.env`.
- `ray start --head --temp-dir=X` records its address in `X/ray_current_cluster`, not in
  `/tmp/ray`, so a plain `ray.init()` elsewhere on the machine never joins this cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from ray_compat import LOOPBACK_WORKER_NODE_START

MARKER_VAR = "CLIPRAY_TEST_RAY_SESSION"
TEMP_PREFIX = "clipray-ray-"
OWNER_FILE = "owner.pid"  # the test process that started the cluster


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayClusterError(RuntimeError):
    pass


class LocalRayCluster:
    """`ray start` processes on 127.0.0.1, owned by one test session.

    Use as a context manager. `dashboard_url` is the address for `ray job submit --address`,
    `gcs_address` the one for `ray start --address`; run clients with `env=cluster.env` (it
    carries the cluster's auth token and the venv's PATH).
    """

    def __init__(
        self, num_cpus: int = 8, env: Optional[dict[str, str]] = None, object_store_memory: int = 300 * 1024 * 1024
    ):
        # Short path: Ray's unix sockets live under it and must stay below ~107 characters.
        # Each node gets a folder of its own below it, as each machine of a real cluster has its
        # own disk: nodes sharing one temp dir would unpack a job's working dir into the same
        # folder, and one node's unpacking pulls the directory from under the other's processes.
        reap_orphaned_clusters()
        self.temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))
        (self.temp_dir / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}")
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.marker = self.temp_dir.name
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            **(env or {}),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            MARKER_VAR: self.marker,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(var, None)
        self.gcs_port: Optional[int] = None
        self.dashboard_port: Optional[int] = None
        self.nodes = 0
        self._sessions: set[int] = set()

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_dir(self, index: int) -> Path:
        """The temp dir of node `index` (0: the head)."""
        return self.temp_dir / ("head" if index == 0 else f"node{index}")

    @property
    def logs_dir(self) -> Path:
        return self.node_dir(0) / "session_latest" / "logs"

    def _start(self, argv: list[str], timeout: float = 180) -> None:
        # A session of its own: every daemon that `ray start` leaves behind stays in it.
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.temp_dir,
            start_new_session=True,
        )
        self._sessions.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise RayClusterError(f"`{' '.join(argv[-12:])}` exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}")

    def _node_ports(self) -> list[str]:
        # Every node on this machine needs its own agent ports; the defaults (52365, 10001, ...)
        # would collide with other Ray instances running tests at the same time.
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]

    def start(self, attempts: int = 2) -> "LocalRayCluster":
        """Start the head; on a loaded machine `ray start` may give up on a raylet that is merely
        slow (it waits 30 s), so a failed start is cleaned up and tried once more."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_head()
            except RayClusterError:
                if attempt == attempts:
                    raise
                self.stop()
                self.temp_dir.mkdir(parents=True)
                (self.temp_dir / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}")
                self.nodes = 0
        raise AssertionError("unreachable")

    def _start_head(self) -> "LocalRayCluster":
        self.dashboard_port, self.gcs_port = free_port(), free_port()
        self.node_dir(0).mkdir(parents=True, exist_ok=True)
        ray_cli = str(Path(sys.executable).parent / "ray")
        try:
            self._start(
                [
                    ray_cli,
                    "start",
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={self.gcs_port}",
                    f"--temp-dir={self.node_dir(0)}",
                    f"--num-cpus={self.num_cpus}",
                    "--num-gpus=0",
                    f"--object-store-memory={self.object_store_memory}",
                    "--disable-usage-stats",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}",
                    *self._node_ports(),
                ]
            )
        except RayClusterError as exc:
            # As for worker nodes: a raylet slower than `ray start`'s 30 s may still come up.
            if "timed out during startup" not in str(exc):
                raise
        self.nodes = 1
        try:
            self._wait_for_job_server()
            self.wait_for_nodes(1, timeout=180)
        except RayClusterError as exc:
            raise RayClusterError(f"{exc}\n{_log_tails(self.node_dir(0))}") from None
        address_file = self.node_dir(0) / "ray_current_cluster"
        if address_file.exists() and address_file.read_text().strip() != self.gcs_address:
            raise RayClusterError(f"the head came up on {address_file.read_text().strip()}, not on {self.gcs_address}")
        return self

    def add_node(self, num_cpus: int, resources: Optional[dict[str, float]] = None) -> None:
        """Join one more node (its own raylet and object store) on 127.0.0.1."""
        node_dir = self.node_dir(self.nodes)
        node_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-c",
            LOOPBACK_WORKER_NODE_START,
            "start",
            f"--address={self.gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={node_dir}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
            "--disable-usage-stats",
            *self._node_ports(),
        ]
        if resources:
            argv.append(f"--resources={json.dumps(resources)}")
        self.nodes += 1
        start_output = ""
        try:
            self._start(argv)
        except RayClusterError as exc:
            # `ray start` waits only 30 s for its raylet to register and then gives up, leaving
            # the raylet running: on a loaded machine it registers a little later.
            if "timed out during startup" not in str(exc):
                raise
            start_output = str(exc)
        try:
            self.wait_for_nodes(self.nodes, timeout=180)
        except RayClusterError as exc:
            raise RayClusterError(f"{exc}\n{start_output[-2000:]}\n{_log_tails(node_dir)}") from None

    def get_json(self, path: str) -> dict:
        """GET `path` from the dashboard, with the cluster's auth token."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)

    def alive_nodes(self) -> list[dict]:
        summary = self.get_json("/nodes?view=summary")["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RayClusterError(
            f"the cluster in {self.temp_dir} did not reach {count} alive nodes in {timeout}s; logs: {self.logs_dir}"
        )

    def _wait_for_job_server(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self.get_json("/api/version")
                return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RayClusterError(
            f"the job server at {self.dashboard_url} did not answer in {timeout}s; logs: {self.logs_dir}"
        )

    def raylet_pid(self, index: int) -> int:
        """The PID of node `index`'s raylet (a process of this cluster whose command line names
        that node's temp dir), to take the node away in a test: SIGKILL it and its workers go too."""
        node = str(self.node_dir(index))
        for pid in self.owned_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/raylet") and any(node.encode() + b"/" in a for a in argv):
                return pid
        raise RayClusterError(f"no raylet of node {index} ({node}) is running")

    # --- stopping exactly what we started ---------------------------------------------------

    def owned_pids(self) -> list[int]:
        """PIDs of the live processes this cluster started, and their descendants.

        A process is ours when it runs in a session that our `ray start` calls opened, or names
        our temp dir in its command line, environment, working dir or open files (Ray retitles
        its agents and workers, so the command line alone misses them; job drivers open their
        own session but log into our temp dir), or descends from one of those.
        """
        temp = str(self.temp_dir)
        if not (
            self.temp_dir.is_absolute()
            and self.temp_dir.parent == Path("/tmp")
            and self.temp_dir.name.startswith(TEMP_PREFIX)
        ):
            raise ValueError(f"{temp} is not a temp dir of this helper; refusing to look for its processes")
        protected = {os.getpid(), os.getppid(), 1}
        marker = f"{MARKER_VAR}={self.marker}".encode()
        owned, parents = set(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                state, ppid, sid = fields[0], int(fields[1]), int(fields[3])
                if state == "Z":
                    continue
                parents[pid] = ppid
                if pid in protected:
                    continue
                if sid in self._sessions or _names_dir(entry, temp, marker):
                    owned.add(pid)
            except (OSError, IndexError, ValueError):  # gone, or not ours to read
                continue
        grew = True
        while grew:  # descendants of our processes are ours too
            grew = False
            for pid, ppid in parents.items():
                if ppid in owned and pid not in owned and pid not in protected:
                    owned.add(pid)
                    grew = True
        return sorted(owned)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM our processes, SIGKILL what is left after `grace_s`, remove the temp dir."""
        pids = self.owned_pids()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for _ in range(5):  # late children (workers forked while we were stopping) are ours too
            left = [p for p in set(pids) | set(self.owned_pids()) if _alive(p)]
            if not left:
                break
            for pid in left:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _log_tails(node_dir: Path, lines: int = 15) -> str:
    """The last lines of a node's raylet and agent logs, for an error message (the temp dir
    goes away with the cluster)."""
    out = []
    for log in sorted(node_dir.glob("session_*/logs/*")):
        if log.name.startswith(("raylet.", "gcs_server.", "dashboard_agent.", "runtime_env_agent.")) and log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                out.append(f"--- {log.name} ---\n" + "\n".join(tail))
    return "\n".join(out) or f"(no logs under {node_dir})"


def reap_orphaned_clusters() -> None:
    """Stop clusters of this helper whose test process died without stopping them (killed, or a
    closed pipe): their temp dir names an owner PID that no longer runs (or is another process)."""
    for folder in Path("/tmp").glob(f"{TEMP_PREFIX}*"):
        try:
            pid, started = (folder / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if _alive(int(pid)) and _start_time(int(pid)) == started:
            continue
        orphan = LocalRayCluster.__new__(LocalRayCluster)
        orphan.temp_dir, orphan.marker, orphan._sessions = folder, folder.name, set()
        orphan.stop()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (with the PID, a unique identity)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _names_dir(proc: Path, temp: str, marker: bytes) -> bool:
    def inside(path: str) -> bool:
        return path == temp or path.startswith(temp + "/")

    if temp.encode() in (proc / "cmdline").read_bytes():
        return True
    if marker in (proc / "environ").read_bytes().split(b"\0"):
        return True
    try:
        if inside(os.readlink(proc / "cwd")):
            return True
        for fd in (proc / "fd").iterdir():
            try:
                if inside(os.readlink(fd)):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
