"""Where a run's CPU-seconds go (`download_internet.py --cpu-breakdown`): every process the run
started (found as `cpu_accounting.CpuSampler` finds them: this process's descendants, Ray's
included) and the server, sampled every 0.2 s from /proc, grouped by role; the download actors
also per thread (the pipeline names its threads in the OS: `pipeline/thread_names.py`); and each
split by phase of the run:
  start   the call's start to the first shard's start (planning, Ray Data's start, the actors'
          start-up: Python imports, the libcurl loop);
  steady  first shard's start to last shard's end (the download itself);
  end     last shard's end to the call's return (manifest, Ray Data's shutdown, actors' exit).
The sampler's own CPU (it runs in this process) is counted apart from the driver's."""

from __future__ import annotations

import bisect
import os
import re
import time
from typing import Optional

from benchmarks.cpu_accounting import CpuSampler, cmdline, cpu_seconds, stat_fields

ACTOR_MARK = "_DownloadUDF"
PHASES = ("start", "steady", "end")


def _thread_table(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (OS thread name, utime + stime in seconds) of one process."""
    table = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return table
    for tid in tids:
        try:
            text = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        table[int(tid)] = (text[text.index("(") + 1 : text.rindex(")")], cpu_seconds(stat_fields(text)))
    return table


def role(name: str) -> str:
    """A process's role from its command line (as `CpuSampler.names` keeps it)."""
    if name == "this process (driver)":
        return "driver (benchmark + Ray driver)"
    if ACTOR_MARK in name:
        return "download actors"
    if name.startswith("ray::"):
        return "other Ray workers: " + re.sub(r"[\s(].*", "", name[5:])[:30]
    words = name.split()
    if not words:
        return "Ray: exited before it was named"
    program = os.path.basename(words[0])
    if program.startswith("python"):  # a Python daemon: its script
        program = next((os.path.basename(w) for w in words if w.endswith(".py")), program)
    return "Ray: " + program[:40]


def thread_role(tid: int, pid: int, name: str) -> str:
    """A download actor's thread by its OS name: the network thread, decoders, the shard feeder,
    the main thread (Ray's task loop: `__call__`, reading the shard, writing Parquet) and the rest
    (Ray's core worker threads: gRPC, io, the resolver pool)."""
    if name.startswith("clipray-http"):
        return "network thread"
    if name.startswith("decode-"):
        return "decoder threads"
    if name == "feed":
        return "feeder thread"
    if tid == pid:
        return "main thread (Ray task loop, Parquet)"
    return "Ray core worker threads"


class DetailedSampler(CpuSampler):
    """A CpuSampler that also keeps every sample's time, the server's CPU, the actors' threads and
    its own CPU."""

    def __init__(self, exclude: int, interval: float = 0.2):
        super().__init__(exclude, interval)
        self.times: list[float] = []
        self.series: list[dict] = []  # per sample: {process key or (pid, tid) or "server": CPU-s}
        self.thread_names: dict[tuple[int, int], str] = {}
        self.full: dict[int, str] = {}  # pid -> its whole command line, as last seen

    def _sample(self) -> None:
        super()._sample()
        for pid, _ in self.last:
            # a Ray worker titles itself when it starts and again when it becomes an actor
            if ACTOR_MARK not in self.full.get(pid, ""):
                command = cmdline(pid)
                if command is not None:
                    self.full[pid] = command.replace("\0", " ").strip()
        now = time.time()
        point: dict = dict(self.last)
        try:
            point["server"] = cpu_seconds(stat_fields(open(f"/proc/{self.exclude}/stat").read()))
        except OSError:
            pass
        for pid, started in [k for k in self.last if ACTOR_MARK in self.full.get(k[0], "")]:
            for tid, (name, cpu) in _thread_table(pid).items():
                self.thread_names[(pid, tid)] = name
                point[(pid, tid, started)] = cpu
        point["driver"] = time.process_time()
        self.times.append(now)
        self.series.append(point)

    def value(self, key, at: float) -> float:
        """key's CPU-s at epoch time `at`, linear between samples; before its first sample, the
        value at the sampler's start (0 for a process started since)."""
        i = bisect.bisect_right(self.times, at)
        before = self._find(key, i - 1, -1)
        after = self._find(key, i, 1)
        if before is None:
            if after is None:
                return 0.0
            return self._base(key) if at < self.times[after] else self.series[after][key]
        if after is None:
            return self.series[before][key]
        t0, t1 = self.times[before], self.times[after]
        v0, v1 = self.series[before][key], self.series[after][key]
        return v0 + (v1 - v0) * (at - t0) / (t1 - t0) if t1 > t0 else v1

    def _find(self, key, i: int, direction: int) -> Optional[int]:
        while 0 <= i < len(self.series):
            if key in self.series[i]:
                return i
            i += direction
        return None

    def _base(self, key) -> float:
        if key == "driver":
            return self.first_self
        if key == "server":
            return self.series[0].get("server", 0.0)
        if isinstance(key, tuple) and len(key) == 2:
            return self.baseline.get(key, 0.0)
        return 0.0  # an actor's thread: the actor started after the sampler


def breakdown(sampler: DetailedSampler, t_start: float, spans: list[tuple[float, float]], t_end: float) -> dict:
    """{row: {phase: CPU-s}}: per role and, for the actors, per thread role; the phases' bounds
    from the shard spans (epoch seconds)."""
    bounds = [t_start, min(a for a, _ in spans), max(b for _, b in spans), t_end]
    rows: dict[str, dict[str, float]] = {}

    def add(row: str, key) -> None:
        cells = rows.setdefault(row, dict.fromkeys(PHASES, 0.0))
        values = [sampler.value(key, t) for t in bounds]
        for phase, (a, b) in zip(PHASES, zip(values, values[1:])):
            cells[phase] += max(0.0, b - a)

    add("driver (benchmark + Ray driver)", "driver")
    keys = {k for point in sampler.series for k in point if isinstance(k, tuple)}
    for key in sorted(k for k in keys if len(k) == 2):
        add(role(sampler.full.get(key[0], "?")), key)
    for pid, tid, started in sorted(k for k in keys if len(k) == 3):
        add("  " + thread_role(tid, pid, sampler.thread_names[(pid, tid)]), (pid, tid, started))
    add("server (emulator)", "server")
    # the sampler runs in the driver: its CPU is shown apart (spread over phases by wall time)
    driver = rows["driver (benchmark + Ray driver)"]
    span = t_end - t_start
    own = rows["benchmark's CPU sampler (in the driver)"] = {}
    for phase, (a, b) in zip(PHASES, zip(bounds, bounds[1:])):
        own[phase] = sampler.own_cpu * (b - a) / span if span > 0 else 0.0
        driver[phase] = max(0.0, driver[phase] - own[phase])
    processes = sorted(
        {f"{role(sampler.full.get(k[0], '?'))}: {sampler.full.get(k[0], '?')[:100]}" for k in keys if len(k) == 2}
    )
    return {
        "phase_bounds_s": [round(b - t_start, 2) for b in bounds],
        "rows": rows,
        "processes": processes,
        "busy_cores": busy_cores(sampler, t_start, t_end),
    }


def busy_cores(sampler: DetailedSampler, t_start: float, t_end: float, step: float = 2.0) -> list[float]:
    """CPU-s per second of the whole run (every process of the tool, the driver less the sampler,
    and the server) in `step`-second bins: how many cores were busy."""
    keys = {k for point in sampler.series for k in point if isinstance(k, tuple) and len(k) == 2}
    keys |= {"driver", "server"}
    own_per_s = sampler.own_cpu / max(t_end - t_start, 1e-9)

    def total(at: float) -> float:
        return sum(sampler.value(k, at) for k in keys)

    edges = [t_start + i * step for i in range(int((t_end - t_start) / step) + 1)] + [t_end]
    values = [total(t) for t in edges]
    return [
        round(max(0.0, (b - a) / (t1 - t0) - own_per_s), 2)
        for (t0, t1), (a, b) in zip(zip(edges, edges[1:]), zip(values, values[1:]))
        if t1 > t0
    ]


def print_breakdown(name: str, result: dict) -> None:
    """The table of one run's `cpu_breakdown` (CPU-s per phase, ms per accepted image)."""
    b = result["cpu_breakdown"]
    accepted = max(1, result["accepted"])
    bounds = b["phase_bounds_s"]
    print(
        f"CPU breakdown, {name} (CPU-s; start 0-{bounds[1]:.1f} s, steady {bounds[1]:.1f}-{bounds[2]:.1f} s, "
        f"end {bounds[2]:.1f}-{bounds[3]:.1f} s; ms per accepted image of {result['accepted']}):"
    )
    print(f"  {'process / thread':<46}" + "".join(f"{p:>8}" for p in PHASES) + f"{'total':>8}{'ms/img':>8}")
    total = dict.fromkeys(PHASES, 0.0)
    for row, cells in b["rows"].items():
        whole = sum(cells.values())
        if whole < 0.05:
            continue
        if not row.startswith("  "):
            for p in PHASES:
                total[p] += cells[p]
        print(
            f"  {row[:46]:<46}"
            + "".join(f"{cells[p]:8.2f}" for p in PHASES)
            + f"{whole:8.2f}{whole / accepted * 1000:8.2f}"
        )
    whole = sum(total.values())
    print(
        "  busy cores per 2 s (all processes): " + " ".join(f"{c:.1f}" for c in b["busy_cores"]),
    )
    print(
        f"  {'all (tool + server + sampler)':<46}"
        + "".join(f"{total[p]:8.2f}" for p in PHASES)
        + f"{whole:8.2f}{whole / accepted * 1000:8.2f}"
    )
