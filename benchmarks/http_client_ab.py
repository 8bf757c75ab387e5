"""A/B of HTTP clients for the downloader: the same N image URLs, fetched whole, at equal concurrency.

    python benchmarks/http_client_ab.py                          # every client, zero latency and latency
    python benchmarks/http_client_ab.py --urls 4000 --clients pycurl aiohttp --rounds 3

Each client runs in its own fresh process (one at a time, rounds interleaved), against the same
loopback servers, and fetches every URL whole (body in memory, nothing decoded): what is measured
is the client alone. Printed per client and setting: images/s (wall clock of the fetch loop) and
CPU-ms per image (user + system time of the client process, all its threads). The second number is
the one that matters on a shared machine: it is what the client takes away from decoding.

Settings:
- `zero`: benchmarks/loopback_images.py's server on 127.0.0.1 (one asyncio loop, prebuilt
  responses, keep-alive): the client's cost per request with nothing to wait for.
- `latency`: a small asyncio server on `--hosts` loopback addresses (127.0.0.2, 127.0.0.3, ...);
  each response waits a uniform 100-300 ms before its first byte, then comes whole. URLs are spread
  over the hosts. This is where requests in flight matter: N / (concurrency / 0.2 s) is the bound.

Clients (the libraries' plain use, as the downloader would use them: keep-alive, a per-host
connection limit, bodies read whole):
- `clipray`: pipeline/fetch.py's `Fetcher` of the checkout given by `--root` (default: this one):
  the libcurl one with `concurrency` requests submitted at a time; the hand-written HTTP/1.1 one
  (up to 276d24b: `git archive 276d24b pipeline storage | tar -x -C /tmp/old`, `--root /tmp/old`)
  on a thread pool of `concurrency` threads;
- `aiohttp`: one asyncio loop, `concurrency` tasks, one `ClientSession` (TCPConnector with
  limit_per_host, a resolver that answers from a table, as the address guard would);
- `pycurl`: one libcurl multi handle driven from one thread, `concurrency` easy handles
  (CURLOPT_RESOLVE pins each host to its address, as the guard would);
- `urllib3`: a PoolManager on a thread pool of `concurrency` threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loopback_images import make_images, serve  # noqa: E402

CLIENTS = ("clipray", "aiohttp", "pycurl", "urllib3")


# --- the latency server


def serve_with_latency(images: list[bytes], hosts: int, low_s: float, high_s: float, ready) -> None:
    """Answer GET /img/<i>.jpg on 127.0.0.2 .. 127.0.0.<hosts+1> (one port for all) after a
    uniform low_s..high_s wait, keep-alive, requests on a connection answered in order."""

    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(b) + b for b in images
    ]
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.pending, self.queue = transport, b"", asyncio.Queue()
            self.writer = asyncio.get_running_loop().create_task(self.write_in_order())

        def data_received(self, data):
            buf = self.pending + data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, buf = buf[:end], buf[end + 4 :]
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                try:
                    i = int(path.rsplit(b"/", 1)[1].split(b".")[0])
                    body = responses[i % len(responses)]
                except (IndexError, ValueError):
                    body = not_found
                self.queue.put_nowait((time.monotonic() + random.uniform(low_s, high_s), body))
            self.pending = buf

        async def write_in_order(self):
            while True:
                due, body = await self.queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.transport.is_closing():
                    return
                self.transport.write(body)

        def connection_lost(self, exc):
            self.writer.cancel()

    async def main():
        loop = asyncio.get_running_loop()
        first = await loop.create_server(Protocol, "127.0.0.2", 0, backlog=1024)
        port = first.sockets[0].getsockname()[1]
        for h in range(1, hosts):
            await loop.create_server(Protocol, f"127.0.0.{2 + h}", port, backlog=1024)
        ready.put(port)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the clients (each runs in its own process: `--client NAME --urls-file F`)


def run_clipray(urls: list[str], concurrency: int, per_host: int) -> list[bytes]:
    """pipeline/fetch.py's Fetcher: `submit` with `concurrency` requests in flight where it has it
    (the libcurl client), else `fetch` on a pool of `concurrency` threads (the hand-written one)."""
    import threading

    from pipeline.address_guard import AddressGuard
    from pipeline.fetch import Fetcher

    guard = AddressGuard(allow_private=True)
    if not hasattr(Fetcher, "submit"):
        from concurrent.futures import ThreadPoolExecutor

        fetcher = Fetcher(guard=guard, retries=0, timeout_s=30)
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda u: fetcher.fetch(u).body, urls))
        fetcher.close()
        return results
    fetcher = Fetcher(guard=guard, retries=0, timeout_s=30, max_connections_per_host=per_host)
    out: list = [None] * len(urls)
    free = threading.Semaphore(concurrency)
    done = threading.Event()
    left = [len(urls)]

    def finished(i, result):
        out[i] = result.body
        free.release()
        left[0] -= 1  # only the network thread calls this
        if not left[0]:
            done.set()

    for i, url in enumerate(urls):
        free.acquire()
        fetcher.submit(url, lambda result, i=i: finished(i, result))
    done.wait()
    fetcher.close()
    return out


def run_urllib3(urls: list[str], concurrency: int, per_host: int) -> list[bytes]:
    from concurrent.futures import ThreadPoolExecutor

    import urllib3

    pool = urllib3.PoolManager(num_pools=1024, maxsize=per_host, block=True, retries=False, timeout=30)
    with ThreadPoolExecutor(concurrency) as threads:
        return list(threads.map(lambda u: pool.request("GET", u, preload_content=True).data, urls))


def run_aiohttp(urls: list[str], concurrency: int, per_host: int) -> list[bytes]:
    import socket

    import aiohttp
    from aiohttp.abc import AbstractResolver

    class TableResolver(AbstractResolver):
        """What the address guard does: hand back the (already checked) address of a host."""

        async def resolve(self, host, port=0, family=socket.AF_INET):
            return [
                {
                    "hostname": host,
                    "host": host,
                    "port": port,
                    "family": socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            ]

        async def close(self):
            pass

    async def main():
        connector = aiohttp.TCPConnector(
            limit=concurrency, limit_per_host=per_host, resolver=TableResolver(), use_dns_cache=False
        )
        timeout = aiohttp.ClientTimeout(total=30)
        out: list = [None] * len(urls)
        it = iter(range(len(urls)))
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True) as session:

            async def worker():
                for i in it:
                    async with session.get(urls[i], allow_redirects=False) as response:
                        out[i] = await response.read()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    return asyncio.run(main())


def run_pycurl(urls: list[str], concurrency: int, per_host: int) -> list[bytes]:
    import urllib.parse

    import pycurl

    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, per_host)
    out: list = [None] * len(urls)
    free = []
    for _ in range(concurrency):
        c = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.TIMEOUT_MS, 30_000)
        c.setopt(pycurl.BUFFERSIZE, 1 << 18)
        c.setopt(pycurl.ACCEPT_ENCODING, "")  # gzip/deflate decoded by libcurl
        free.append(c)
    pending = iter(range(len(urls)))
    active = 0

    def start(c, i):
        parts = urllib.parse.urlsplit(urls[i])
        chunks: list[bytes] = []
        c.chunks, c.index = chunks, i
        c.setopt(pycurl.URL, urls[i])
        c.setopt(pycurl.RESOLVE, [f"{parts.hostname}:{parts.port}:{parts.hostname}"])
        c.setopt(pycurl.WRITEFUNCTION, chunks.append)
        multi.add_handle(c)

    for c in list(free):
        i = next(pending, None)
        if i is None:
            break
        free.remove(c)
        start(c, i)
        active += 1
    while active:
        while True:
            ret, _ = multi.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        while True:
            queued, ok, failed = multi.info_read()
            for c in ok:
                multi.remove_handle(c)
                out[c.index] = b"".join(c.chunks)
                active -= 1
                i = next(pending, None)
                if i is not None:
                    start(c, i)
                    active += 1
            for c, errno, message in failed:
                multi.remove_handle(c)
                raise RuntimeError(f"{urls[c.index]}: curl error {errno}: {message}")
            if not queued:
                break
        if active:
            multi.select(1.0)
    return out


RUNNERS = {"clipray": run_clipray, "aiohttp": run_aiohttp, "pycurl": run_pycurl, "urllib3": run_urllib3}


def client_main(args) -> int:
    """One client's run (in its own process): prints a JSON line with wall and CPU time."""
    spec = json.loads(Path(args.urls_file).read_text())
    urls, expected = spec["urls"], spec["sizes"]
    run = RUNNERS[args.client]
    run(urls[: min(50, len(urls))], min(args.concurrency, 8), args.per_host)  # imports, first connections
    cpu0, t0 = os.times(), time.perf_counter()
    bodies = run(urls, args.concurrency, args.per_host)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    wrong = sum(1 for b, n in zip(bodies, expected) if b is None or len(b) != n)
    print(json.dumps({"client": args.client, "n": len(urls), "wall_s": wall, "cpu_s": cpu, "wrong": wrong}))
    return 0


# --- the driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=4000)
    p.add_argument("--distinct", type=int, default=100)
    p.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    p.add_argument("--settings", nargs="+", choices=("zero", "latency"), default=["zero", "latency"])
    p.add_argument("--concurrency-zero", type=int, default=32, help="requests in flight, zero latency")
    p.add_argument("--concurrency-latency", type=int, default=256, help="requests in flight, with latency")
    p.add_argument("--per-host", type=int, default=32, help="connections per host (zero: one host)")
    p.add_argument("--hosts", type=int, default=64, help="loopback hosts of the latency server")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=None, help="pin clients and servers to this many cores")
    p.add_argument("--root", default=str(ROOT), help="checkout whose pipeline/ the clipray client imports")
    # one client's run, in a child process
    p.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--urls-file", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        sys.path.insert(0, args.root)
        return client_main(args)
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))

    images = make_images(args.distinct)
    ctx = multiprocessing.get_context("fork")
    servers, ports = [], {}
    for setting in args.settings:
        ready = ctx.Queue()
        if setting == "zero":
            proc = ctx.Process(target=serve, args=(images, args.urls, ready), daemon=True)
        else:
            proc = ctx.Process(target=serve_with_latency, args=(images, args.hosts, 0.1, 0.3, ready), daemon=True)
        proc.start()
        servers.append(proc)
        ports[setting] = ready.get(timeout=60)

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"http-ab-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    sizes = [len(images[i % len(images)]) for i in range(args.urls)]
    files = {}
    for setting, port in ports.items():
        if setting == "zero":
            urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.urls)]
        else:
            urls = [f"http://127.0.0.{2 + i % args.hosts}:{port}/img/{i}.jpg" for i in range(args.urls)]
        files[setting] = work / f"{setting}.json"
        files[setting].write_text(json.dumps({"urls": urls, "sizes": sizes}))

    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores usable, "
        f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}; {args.urls} URLs of "
        f"{len(images)} distinct JPEGs (mean {sum(map(len, images)) / len(images) / 1000:.0f} kB)",
        flush=True,
    )
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for r in range(args.rounds):
            for setting in args.settings:
                concurrency = args.concurrency_zero if setting == "zero" else args.concurrency_latency
                for client in args.clients:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--client",
                        client,
                        "--urls-file",
                        str(files[setting]),
                        "--concurrency",
                        str(concurrency),
                        "--root",
                        args.root,
                        "--per-host",
                        str(args.per_host if setting == "zero" else min(args.per_host, 8)),
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                    if done.returncode != 0:
                        print(f"{client} {setting}: failed\n{done.stderr[-3000:]}", flush=True)
                        continue
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    results.setdefault((setting, client), []).append(row)
                    print(
                        f"round {r} {setting:<7} {client:<12} {row['n'] / row['wall_s']:8.0f} images/s "
                        f"{row['cpu_s'] / row['n'] * 1000:6.3f} CPU-ms/image  wrong={row['wrong']}",
                        flush=True,
                    )
    finally:
        for proc in servers:
            proc.kill()
            proc.join()
        for f in files.values():
            f.unlink(missing_ok=True)
        work.rmdir()

    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    print("| setting | concurrency | client | images/s (median) | CPU-ms per image (median) | wrong bodies |")
    print("|---|---|---|---|---|---|")
    for (setting, client), rows in results.items():
        rates = sorted(r["n"] / r["wall_s"] for r in rows)
        cpus = sorted(r["cpu_s"] / r["n"] * 1000 for r in rows)
        concurrency = args.concurrency_zero if setting == "zero" else args.concurrency_latency
        print(
            f"| {setting} | {concurrency} | {client} | {rates[len(rates) // 2]:.0f} | {cpus[len(cpus) // 2]:.3f} "
            f"| {sum(r['wrong'] for r in rows)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
