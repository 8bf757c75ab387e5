"""Download benchmark: clipray's pipeline vs `img2dataset.download` on the same URL list.

    python benchmarks/download.py                    # 20,000 URLs, 2 processes x 32 threads
    python benchmarks/download.py --cores 2          # pin everything to 2 cores (bigger machines)
    python benchmarks/download.py --urls 2000 --quick

Both download the same list from one loopback HTTP server (a separate process: an asyncio loop
with prebuilt responses, HTTP/1.1 keep-alive, same bytes for both), resize to the same size and
mode, and write Parquet, with the same number of processes and threads. Printed: images/s of each
(wall clock of the whole call: reading the list, starting workers, downloading, writing), their
ratio, the CPU-bound ceiling (decode + resize + encode of the same images with OpenCV in one
process, images/s per core x cores) with how close each tool gets to it, the steady-state rates
(workers' start-up left out) and where the CPU went.

clipray runs on a local Ray cluster started before the timed call, with Ray Data's per-cluster
service actors already up (as after any earlier Data job on a cluster; `--cold-ray` counts their
start too); its download actors start inside the timed call, as img2dataset's processes do.

Images are 512x384 photo-like JPEGs (a coarse random field, blurred, with sensor-like noise;
about 70 kB each at quality 90); `--distinct` of them are generated and the URLs cycle through
them (every URL is a separate request).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home otherwise
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(n: int, width: int = 512, height: int = 384, seed: int = 0) -> list[bytes]:
    import cv2
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.normal(128, 60, (height // 8, width // 8, 3)).clip(0, 255).astype(np.uint8)
        image = cv2.GaussianBlur(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), (0, 0), 2)
        image = (image.astype(np.int16) + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _ImageProtocol(asyncio.Protocol):
    """One connection of the benchmark's image server: HTTP/1.1 GET with keep-alive (pipelined
    requests answered in order), `Connection: close` and HTTP/1.0 honoured; every response is
    prebuilt, so the server spends its CPU on the socket work alone (like a static file server)."""

    def __init__(self, keep_alive: dict[bytes, bytes], closing: dict[bytes, bytes]):
        self.keep_alive, self.closing, self.pending = keep_alive, closing, b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.pending = buf
                return
            head, buf = buf[:end], buf[end + 4:]
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            path = parts[1] if len(parts) == 3 else b""
            close = parts[-1] == b"HTTP/1.0" or b"connection: close" in headers.lower()
            self.transport.write((self.closing if close else self.keep_alive).get(path, NOT_FOUND))
            if close:
                self.transport.close()
                self.pending = b""
                return

    def eof_received(self):
        return None  # close our side too


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def _serve(images: list[bytes], urls: int, ready) -> None:
    """The loopback image server (its own process): one asyncio event loop with prebuilt
    responses. Both tools download from it. It used to be the tests' `http.server` one, whose
    Python request handling cost 0.2-0.6 ms of CPU per image on the cores the tools run on; a
    real image host costs the downloading machine nothing, this one ~0.05 ms per image."""
    def response(body: bytes, close: bool) -> bytes:
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n")
        return head.encode("ascii") + body

    keep_alive = [response(b, False) for b in images]
    closing = [response(b, True) for b in images]
    paths = [f"/img/{i}.jpg".encode("ascii") for i in range(urls)]
    keep_map = {p: keep_alive[i % len(images)] for i, p in enumerate(paths)}
    close_map = {p: closing[i % len(images)] for i, p in enumerate(paths)}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _ImageProtocol(keep_map, close_map), "127.0.0.1", 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def cpu_ceiling(images: list[bytes], image_size: int, seconds: float = 6.0, rounds: int = 4) -> dict[str, float]:
    """Images/s on one core, the best of `rounds`: plain OpenCV (full decode, INTER_AREA, border
    pad, encode q95), and clipray's own decode path for comparison."""
    import cv2
    import numpy as np

    from pipeline.resize import ImageProcessor

    cv2.setNumThreads(1)

    def opencv(data: bytes) -> bytes:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        s = image_size / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        top, left = (image_size - h) // 2, (image_size - w) // 2
        img = cv2.copyMakeBorder(img, top, image_size - h - top, left, image_size - w - left,
                                 cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 95])[1].tobytes()

    ours = ImageProcessor(image_size=image_size, resize_mode="border")
    rates = {}
    for name, fn in (("opencv", opencv), ("clipray", lambda d: ours.resize(ours.probe(d)).data)):
        fn(images[0])
        best = 0.0
        for _ in range(rounds):  # the best round: the ceiling is not lowered by a noisy moment
            start_cpu, count = time.process_time(), 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn(images[count % len(images)])
                count += 1
            best = max(best, count / (time.process_time() - start_cpu))  # per CPU-second: per core
        rates[name] = best
    return rates


# --- CPU accounting: the machine may be shared, so besides wall-clock rates the benchmark counts
# the CPU-seconds each tool spent (all its processes, Ray's included) and the server spent for it.

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (e.g. Ray workers outliving their raylet) are re-parented to this
    process, so they stay in the process tree the CPU sampler walks."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _proc_table() -> dict[int, tuple[int, float, int]]:
    """pid -> (ppid, utime + stime in seconds, start time in ticks) for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, int(fields[19]))
    return table


def _descendants(table: dict[int, tuple[int, float, int]], exclude: int = -1) -> list[int]:
    """This process's descendants in a `_proc_table()` snapshot, leaving out `exclude`'s subtree."""
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


def _cmdline(pid: int) -> Optional[str]:
    """The process's command line (NUL-separated), None once it has exited."""
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return None


class CpuSampler:
    """CPU seconds used by this process's descendants (not `exclude`'s subtree) between start()
    and stop(), sampled every `interval` s so processes that exit in between still count (up to
    their last sample)."""

    def __init__(self, exclude: int, interval: float = 0.2):
        import threading

        self.exclude, self.interval = exclude, interval
        self.first: dict[tuple[int, int], float] = {}
        self.names: dict[int, str] = {}
        self.last: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        table = _proc_table()
        for pid in _descendants(table, self.exclude):
            _, cpu, started = table[pid]
            if (pid, started) not in self.first:
                command = _cmdline(pid)
                self.names[pid] = "?" if command is None else command.replace("\0", " ").strip()[:60]
            self.first.setdefault((pid, started), cpu)
            self.last[(pid, started)] = cpu

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

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
        self.by_process = {"this process (driver)": time.process_time() - self.first_self}
        for (pid, started), cpu in self.last.items():
            self.by_process[f"{pid} {self.names.get(pid, '?')}"] = cpu - self.baseline.get((pid, started), 0.0)
        return sum(self.by_process.values())


def measured(run, server_pid: int) -> dict:
    """Run `run(mark)`, which calls `mark()` right before and right after the timed call; the result
    gains the CPU the tool used in between (all its processes) and the CPU the server used."""
    state = {}

    def server_cpu() -> float:
        return _proc_table()[server_pid][1]

    def mark():
        if "sampler" not in state:
            state["server0"] = server_cpu()
            state["sampler"] = CpuSampler(exclude=server_pid).start()
        else:
            state["cpu_s"] = state["sampler"].stop()
            state["by_process"] = state["sampler"].by_process
            state["server_cpu_s"] = server_cpu() - state["server0"]

    result = run(mark)
    result["cpu_s"] = round(state["cpu_s"], 2)
    result["server_cpu_s"] = round(state["server_cpu_s"], 2)
    result["images_per_cpu_s"] = result["accepted"] / (result["cpu_s"] + result["server_cpu_s"])
    top = sorted(state["by_process"].items(), key=lambda kv: -kv[1])[:8]
    # the busiest N processes are the N download workers (img2dataset's pool, our actors)
    workers = sorted((cpu for name, cpu in state["by_process"].items() if name != "this process (driver)"),
                     reverse=True)[:result.pop("workers")]
    result["worker_cpu_s"] = round(sum(workers), 2)
    result["top_processes"] = {name: round(cpu, 1) for name, cpu in top if cpu >= 0.1}
    return result


def run_img2dataset(url_list: Path, out: Path, args, mark) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from img2dataset import download

    mark()
    start = time.perf_counter()
    download(
        url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
        output_format="parquet", output_folder=str(out), processes_count=args.processes,
        thread_count=args.threads, image_size=args.image_size, resize_mode=args.resize_mode,
        number_sample_per_shard=args.rows_per_shard, timeout=10, retries=0, extract_exif=False,
        compute_hash="sha256", enable_wandb=False,
    )
    wall = time.perf_counter() - start
    mark()
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    ok = sum(s["successes"] for s in stats)
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"wall_s": wall, "accepted": ok, "images_per_s": ok / wall, "in_shard_images_per_s": ok / span,
            "workers": args.processes}


class _Identity:
    def __call__(self, batch):
        return batch


def warm_ray_data() -> None:
    """A tiny Ray Data job on an actor pool, before the timed call: it starts Ray Data's
    per-cluster service actors (_StatsActor, AutoscalingCoordinator, ActorLocationTracker: detached,
    created by the first Data job on a cluster and kept), as on any cluster that has run a Data job
    before. Each is a Python process importing Ray Data: ~2 CPU-s apiece, ~6 CPU-s of a 20k-URL run
    when counted in (`--cold-ray`). Our download actors still start inside the timed call."""
    import ray

    ray.data.range(2, override_num_blocks=1).map_batches(
        _Identity, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1).materialize()
    # Its actor exits afterwards (~0.3 CPU-s of Python shutdown): not inside the timed call.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any("_Identity" in (_cmdline(pid) or "")
                                               for pid in _descendants(_proc_table())):
        time.sleep(0.1)


def run_clipray(url_list: Path, out: Path, args, mark) -> dict:
    import ray

    from pipeline.config import DataConfig
    from pipeline.run import run_pipeline

    # Ray starts its worker processes at nice 15 (RAY_worker_niceness), img2dataset's run at nice 0:
    # on a machine where anything else runs, that alone would starve our actors. Same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=args.processes, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    try:
        if not args.cold_ray:
            warm_ray_data()
        data = DataConfig(
            input=str(url_list), output=str(out), image_size=args.image_size, resize_mode=args.resize_mode,
            num_download_actors=args.processes, threads_per_actor=args.threads, rows_per_shard=args.rows_per_shard,
            allow_private_addresses=True, timeout_s=10, retries=0, progress=False,
        )
        mark()
        start, epoch = time.perf_counter(), time.time()
        manifest = run_pipeline(data)
        wall = time.perf_counter() - start
        mark()
    finally:
        ray.shutdown()
    # shard spans: each marker is written last, when its shard is done, after `duration_s` of work
    spans = [(p.stat().st_mtime - json.loads(p.read_text())["duration_s"], p.stat().st_mtime)
             for p in (out / "_state" / "download").glob("*.json")]
    busy = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"wall_s": wall, "accepted": manifest["accepted"], "images_per_s": manifest["accepted"] / wall,
            "in_shard_images_per_s": manifest["accepted"] / busy, "workers": args.processes,
            "shard_spans_s": sorted((round(a - epoch, 2), round(b - epoch, 2)) for a, b in spans)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=20_000)
    p.add_argument("--distinct", type=int, default=400, help="distinct images the URLs cycle through")
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes = clipray download actors")
    p.add_argument("--threads", type=int, default=32, help="threads per process / actor")
    p.add_argument("--cores", type=int, default=None, help="pin the benchmark (server included) to this many cores")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir, removed)")
    p.add_argument("--only", choices=["img2dataset", "clipray"], default=None)
    p.add_argument("--quick", action="store_true", help="shorter ceiling measurement")
    p.add_argument("--cold-ray", action="store_true",
                   help="count the start of Ray Data's per-cluster service actors in clipray's call (a fresh cluster)")
    args = p.parse_args(argv)

    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    become_subreaper()
    cores = len(os.sched_getaffinity(0))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores usable, "
          f"python {platform.python_version()}; {args.urls} URLs, {args.processes} processes x "
          f"{args.threads} threads, {args.image_size}px {args.resize_mode}", flush=True)

    images = make_images(args.distinct)
    print(f"images: {len(images)} distinct 512x384 JPEGs, mean {sum(map(len, images)) / len(images) / 1000:.0f} kB",
          flush=True)
    ceiling = cpu_ceiling(images, args.image_size, 2.0 if args.quick else 6.0)

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    server = ctx.Process(target=_serve, args=(images, args.urls, ready), daemon=True)
    server.start()
    port = ready.get(timeout=60)
    import pyarrow as pa
    import pyarrow.parquet as pq

    url_list = work / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.urls)],
                             "caption": [f"image number {i}" for i in range(args.urls)]}), url_list)
    results = {}
    try:
        if args.only in (None, "img2dataset"):
            shutil.rmtree(work / "img2dataset", ignore_errors=True)
            results["img2dataset"] = measured(lambda mark: run_img2dataset(url_list, work / "img2dataset", args, mark),
                                              server.pid)
            print(f"img2dataset: {results['img2dataset']}", flush=True)
        if args.only in (None, "clipray"):
            shutil.rmtree(work / "clipray", ignore_errors=True)
            results["clipray"] = measured(lambda mark: run_clipray(url_list, work / "clipray", args, mark),
                                          server.pid)
            print(f"clipray:     {results['clipray']}", flush=True)
    finally:
        server.kill()
        server.join()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    ceiling_total = ceiling["opencv"] * cores
    print()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
    print(f"CPU-bound ceiling: OpenCV decode+resize+encode {ceiling['opencv']:.0f} images/s per core x {cores} "
          f"cores = {ceiling_total:.0f} images/s (clipray's decode path alone: {ceiling['clipray']:.0f}/s per core)")
    print("wall clock (whole call: read list, start workers, download, write):")
    for name, r in results.items():
        print(f"  {name:<12} {r['images_per_s']:8.1f} images/s  ({r['accepted']} images in {r['wall_s']:.1f}s; "
              f"{r['images_per_s'] / ceiling_total:.0%} of the ceiling)")
    print(f"CPU time of the same call (the tool's processes, Ray's included, + the server's CPU for it); "
          f"rate on {cores} dedicated cores = {cores} / CPU-s per image:")
    for name, r in results.items():
        projected = r["images_per_cpu_s"] * cores
        print(f"  {name:<12} {r['cpu_s']:7.1f} CPU-s + server {r['server_cpu_s']:5.1f} CPU-s -> "
              f"{r['images_per_cpu_s']:6.1f} images per CPU-s -> {projected:7.1f} images/s on {cores} cores "
              f"({projected / ceiling_total:.0%} of the ceiling)")
    print("steady state (first shard's start to last shard's end, the workers' start-up left out):")
    for name, r in results.items():
        print(f"  {name:<12} {r['in_shard_images_per_s']:8.1f} images/s  "
              f"({r['in_shard_images_per_s'] / ceiling_total:.0%} of the ceiling)")
    print(f"download workers alone ({args.processes} busiest processes: img2dataset's pool processes, "
          f"clipray's actors): CPU per image")
    for name, r in results.items():
        others = r["cpu_s"] - r["worker_cpu_s"]
        print(f"  {name:<12} {r['worker_cpu_s']:7.1f} CPU-s -> {r['worker_cpu_s'] / r['accepted'] * 1000:.2f} ms per image"
              f"  (the tool's other processes, driver included: {others:.1f} CPU-s; server {r['server_cpu_s']:.1f} CPU-s)")
    if len(results) == 2:
        wall = results["clipray"]["images_per_s"] / results["img2dataset"]["images_per_s"]
        cpu = results["clipray"]["images_per_cpu_s"] / results["img2dataset"]["images_per_cpu_s"]
        print(f"ratio clipray / img2dataset: {wall:.2f}x wall clock, {cpu:.2f}x per CPU-second (target >= 1.5x)")
        print(f"clipray vs ceiling: {results['clipray']['images_per_s'] / ceiling_total:.0%} wall clock, "
              f"{results['clipray']['images_per_cpu_s'] * cores / ceiling_total:.0%} by CPU time (target >= 70%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
