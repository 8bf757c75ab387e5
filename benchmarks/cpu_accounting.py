"""CPU accounting for the download benchmarks: the machine may be shared, so besides wall-clock
rates the benchmark counts the CPU-seconds each tool spent (all its processes, Ray's included,
found by walking this process's descendants in /proc) and the server spent for it."""

from __future__ import annotations

import os
import time
from typing import Optional


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (e.g. Ray workers outliving their raylet) are re-parented to this
    process, so they stay in the process tree the CPU sampler walks."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stat_fields(text: str) -> list[str]:
    """The fields of a /proc/<pid>/stat (or .../task/<tid>/stat) text after the command name:
    state, ppid, ... (field 3 of proc(5) on, so utime is [11], stime [12], starttime [19])."""
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(fields: list[str]) -> float:
    """utime + stime in seconds from `stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_table() -> dict[int, tuple[int, float, int]]:
    """pid -> (ppid, utime + stime in seconds, start time in ticks) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = stat_fields(open(f"/proc/{entry}/stat").read())
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), cpu_seconds(fields), int(fields[19]))
    return table


def descendants(table: dict[int, tuple[int, float, int]], exclude: int = -1) -> list[int]:
    """This process's descendants in a `proc_table()` snapshot, leaving out `exclude`'s subtree."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if pid != exclude:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def cmdline(pid: int) -> Optional[str]:
    """The process's command line (NUL-separated), None once it has exited."""
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return None


class CpuSampler:
    """CPU seconds used by this process's descendants (not `exclude`'s subtree) between start()
    and stop(), sampled every `interval` s so processes that exit in between still count (up to
    their last sample). The sampler thread's own CPU (`own_cpu`, walking /proc) is left out of
    this process's."""

    def __init__(self, exclude: int, interval: float = 0.2):
        import threading

        self.exclude, self.interval = exclude, interval
        self.first: dict[tuple[int, int], float] = {}
        self.names: dict[int, str] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        table = proc_table()
        for pid in descendants(table, self.exclude):
            _, cpu, started = table[pid]
            if (pid, started) not in self.first:
                command = cmdline(pid)
                self.names[pid] = "?" if command is None else command.replace("\0", " ").strip()[:60]
            self.first.setdefault((pid, started), cpu)
            self.last[(pid, started)] = cpu

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self.own_cpu = time.thread_time()  # the sampler's own CPU: not the tool's

    def start(self) -> "CpuSampler":
        self.first_self = time.process_time()
        self._sample()
        self.baseline = dict(self.first)  # processes alive at start count from here, new ones from 0
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.by_process = {"this process (driver)": time.process_time() - self.first_self - self.own_cpu}
        for (pid, started), cpu in self.last.items():
            self.by_process[f"{pid} {self.names.get(pid, '?')}"] = cpu - self.baseline.get((pid, started), 0.0)
        return sum(self.by_process.values())


def measured(run, server_pid: int, sampler_class=None) -> dict:
    """Run `run(mark)`, which calls `mark()` right before and right after the timed call; the result
    gains the CPU the tool used in between (all its processes) and the CPU the server used.
    sampler_class: a CpuSampler subclass to use (kept in the result as `sampler`, with the marks'
    epoch times as `marks`)."""
    state = {"marks": []}

    def server_cpu() -> float:
        return proc_table()[server_pid][1]

    def mark():
        state["marks"].append(time.time())
        if "sampler" not in state:
            state["server0"] = server_cpu()
            state["sampler"] = (sampler_class or CpuSampler)(exclude=server_pid).start()
        else:
            state["cpu_s"] = state["sampler"].stop()
            state["by_process"] = state["sampler"].by_process
            state["server_cpu_s"] = server_cpu() - state["server0"]

    result = run(mark)
    result["cpu_s"] = round(state["cpu_s"], 2)
    result["server_cpu_s"] = round(state["server_cpu_s"], 2)
    result["sampler_cpu_s"] = round(state["sampler"].own_cpu, 2)
    result["images_per_cpu_s"] = result["accepted"] / (result["cpu_s"] + result["server_cpu_s"])
    top = sorted(state["by_process"].items(), key=lambda kv: -kv[1])[:8]
    # the busiest N processes are the N download workers (img2dataset's pool, our actors)
    workers = sorted(
        (cpu for name, cpu in state["by_process"].items() if name != "this process (driver)"), reverse=True
    )[: result.pop("workers")]
    result["worker_cpu_s"] = round(sum(workers), 2)
    result["top_processes"] = {name: round(cpu, 1) for name, cpu in top if cpu >= 0.1}
    if sampler_class is not None:
        result["sampler"], result["marks"] = state["sampler"], state["marks"]
    return result
