"""Concurrency sized for latency (issue 15 §2): with its defaults one download actor keeps hundreds of
requests open at once across many hosts, never more than `data.max_connections_per_host` on one.

A loopback server on 48 addresses answers every request after 1 s and counts the requests it holds,
in all and per host. 48 hosts x 10 rows: with the defaults (512 rows in flight, 8 connections per
host) 8 per host, 384 in all, are open at once; an actor with 16 threads, as the downloader had
before, would have held 16 and taken 30 s."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

from tests.support.url_images import ACCEPTED, case, run_shard, url_image

HOSTS = 48
ROWS_PER_HOST = 10
ANSWER_AFTER_S = 1.0


class CountingServer:
    """Every loopback address 127.0.1.1 .. 127.0.1.HOSTS on one port, in a thread with its own event
    loop; each request is answered with its own URL's image after ANSWER_AFTER_S (keep-alive)."""

    def __init__(self) -> None:
        self.addresses = [f"127.0.1.{k}" for k in range(1, HOSTS + 1)]
        self.active: Counter = Counter()
        self.peak_total = 0
        self.peak_per_host: Counter = Counter()
        self.port = 0
        self.images: dict[str, bytes] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, address: str, k: int) -> str:
        return f"http://{address}:{self.port}/img/{k}.png"

    def __enter__(self) -> "CountingServer":
        self._thread.start()
        assert self._ready.wait(10), "the counting server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._ready.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        for address in self.addresses:
            server = await asyncio.start_server(
                lambda r, w, a=address: self._serve(a, r, w), address, self.port, backlog=512
            )
            self.port = server.sockets[0].getsockname()[1]
        for address in self.addresses:
            for k in range(ROWS_PER_HOST):
                url = self.url(address, k)
                self.images[url] = url_image(url)

    async def _serve(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.active[address] += 1
                total = sum(self.active.values())
                self.peak_total = max(self.peak_total, total)
                self.peak_per_host[address] = max(self.peak_per_host[address], self.active[address])
                await asyncio.sleep(ANSWER_AFTER_S)
                self.active[address] -= 1
                body = self.images[f"http://{address}:{self.port}{path}"]
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def test_one_actor_keeps_hundreds_of_requests_open_at_once_and_eight_per_host(tmp_path):
    with CountingServer() as server:
        cases = [
            case(f"{address}-{k}", server.url(address, k), ACCEPTED)
            for k in range(ROWS_PER_HOST)
            for address in server.addresses
        ]
        run = run_shard(tmp_path, cases, timeout_s=10.0)
    assert not run.problems, run.report()
    assert run.counts["accepted"] == HOSTS * ROWS_PER_HOST
    assert server.peak_total >= 300, f"at most {server.peak_total} requests were open at once"
    assert set(server.peak_per_host.values()) == {8}, f"per host: {server.peak_per_host.most_common(3)}"
