"""One run at a time per output folder: `FolderLock`.

Two runs writing one folder would interleave their files, and each run's clean-up would delete the
other's work in progress. A run takes the folder's lock before it writes anything; a second run on
the same folder fails at once with an error naming the holder.

The lock is a small JSON file (`.clipray.lock`) in the folder: who holds it (host, boot id, pid and
the process's start time, the command), and a heartbeat the holder refreshes every `heartbeat_s`.
A lock left by a run that died is taken over: on the same machine as soon as its process is gone
(checked by pid and start time, so a reused pid does not count), from another machine when its
heartbeat is older than `ttl_s`. A killed run can therefore always be resumed by rerunning it.

Creating the lock is atomic on a local disk (a hard link that fails if the file exists). Object
stores have no such primitive here: the lock is written, then read back after `settle_s`, and the
run that does not find itself there gives way; two runs starting within the same fraction of a
second against one bucket prefix are not excluded with certainty.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from storage.folder import Folder, temporary_name
from storage.redact import redact_userinfo

log = logging.getLogger(__name__)

LOCK_NAME = ".clipray.lock"


class FolderInUse(RuntimeError):
    """Another live run holds the folder's lock."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # The command name (field 2) may hold spaces and ')': split after its last ')'.
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


class FolderLock:
    """The lock of `folder` for one run; use as a context manager (see the module docstring).

    what: the command, for the error a second run sees (e.g. "clipray pipeline").
    """

    def __init__(
        self, folder: Folder, what: str, *, ttl_s: float = 120.0, heartbeat_s: float = 30.0, settle_s: float = 1.0
    ):
        self.folder, self.what = folder, what
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = time.time()

    # --- what the lock file holds
    def _info(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "owner": self.owner,
            "what": self.what,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": pid,
            "pid_start": _start_ticks(pid),
            "started": self._started,
            "heartbeat": time.time(),
        }

    def _read(self) -> Optional[dict[str, Any]]:
        """The current lock's content; None when there is none. An unreadable lock counts as held
        by a live run until its file is older than the TTL."""
        text = self.folder.read_text(LOCK_NAME)
        if text is None:
            return None
        try:
            info = json.loads(text)
            if not isinstance(info, dict):
                raise ValueError("not an object")
            return info
        except ValueError:
            return {"owner": "?", "what": "an unknown run (unreadable lock file)", "heartbeat": self._mtime()}

    def _mtime(self) -> float:
        try:
            info = self.folder.fs.info(self.folder.path(LOCK_NAME))
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            return mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
        except (OSError, TypeError, ValueError):
            return time.time()

    def stale(self, info: dict[str, Any]) -> bool:
        """True when the run that wrote `info` is gone (see the module docstring)."""
        same_machine = info.get("host") == socket.gethostname() and info.get("boot_id") == _boot_id() != ""
        if same_machine and isinstance(info.get("pid"), int):
            return not _alive(info["pid"], info.get("pid_start"))
        heartbeat = info.get("heartbeat")
        return not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > self.ttl_s

    def _in_use(self, info: dict[str, Any]) -> FolderInUse:
        age = time.time() - info["heartbeat"] if isinstance(info.get("heartbeat"), (int, float)) else float("nan")
        holder = f"{info.get('what', '?')} (host {info.get('host', '?')}, pid {info.get('pid', '?')})"
        return FolderInUse(
            f"{redact_userinfo(self.folder.url)} is in use by another run: {holder}, last seen {age:.0f} s ago. Two runs must not "
            f"write one folder: wait for it to finish or give this run another folder. If that run is dead on "
            f"another machine, its lock expires {self.ttl_s:.0f} s after its last heartbeat (or delete "
            f"{redact_userinfo(self.folder.full_url(LOCK_NAME))})"
        )

    # --- taking and giving back
    def check(self) -> None:
        """Raise FolderInUse if a live run holds the folder now (a cheap early check; `acquire`
        is what excludes)."""
        current = self._read()
        if current is not None and current.get("owner") != self.owner and not self.stale(current):
            raise self._in_use(current)

    def acquire(self) -> "FolderLock":
        self.folder.makedirs()
        for _ in range(3):
            current = self._read()
            if current is not None:
                if current.get("owner") == self.owner:
                    break
                if not self.stale(current):
                    raise self._in_use(current)
                log.warning(
                    "%s: taking over the lock of a run that is gone (%s, pid %s)",
                    redact_userinfo(self.folder.url),
                    current.get("what"),
                    current.get("pid"),
                )
                self.folder.remove([LOCK_NAME])
            if self._create():
                break
        else:
            raise self._in_use(self._read() or {})
        self._thread = threading.Thread(target=self._beat, name="folder-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Write our lock if there is none; True when it is ours."""
        data = json.dumps(self._info()).encode()
        if self.folder.local:
            path = self.folder.path(LOCK_NAME)
            tmp = temporary_name(path)
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)  # fails if a lock exists: atomic create-with-content
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        self.folder.write_bytes(LOCK_NAME, data)
        time.sleep(self.settle_s)
        return (self._read() or {}).get("owner") == self.owner

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self._read()
                if current is None or current.get("owner") != self.owner:
                    log.error(
                        "%s: the folder lock was taken by another run (%s); this run's heartbeat stops",
                        redact_userinfo(self.folder.url),
                        None if current is None else current.get("what"),
                    )
                    return
                self.folder.write_bytes(LOCK_NAME, json.dumps(self._info()).encode())
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried at the next beat
                log.warning("%s: could not refresh the folder lock: %s", redact_userinfo(self.folder.url), exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            current = self._read()
            if current is not None and current.get("owner") == self.owner:
                self.folder.remove([LOCK_NAME])
        except Exception as exc:  # noqa: BLE001 - a lock left behind is taken over by the next run
            log.warning("%s: could not remove the folder lock: %s", redact_userinfo(self.folder.url), exc)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
