"""The download benchmarks' image server (benchmarks/loopback_images.py): keep-alive and closing requests
get the image, an unknown path a 404. The benchmark's numbers depend on it answering both tools."""

from __future__ import annotations

import importlib.util
import multiprocessing
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.address_guard import AddressGuard
from pipeline.fetch import Fetcher
from tests.support.http_server import jpeg_bytes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "loopback_images.py"


@pytest.fixture(scope="module")
def server():
    spec = importlib.util.spec_from_file_location("download_benchmark", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    images = [jpeg_bytes(64, 48, seed=i) for i in range(3)]
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    proc = ctx.Process(target=bench.serve, args=(images, 10, ready), daemon=True)
    proc.start()
    try:
        yield images, ready.get(timeout=30)
    finally:
        proc.kill()
        proc.join()


def test_keep_alive_requests_share_one_connection(server):
    images, port = server
    fetcher = Fetcher(guard=AddressGuard(allow_private=True), retries=0)
    try:
        bodies = [fetcher.fetch(f"http://127.0.0.1:{port}/img/{i}.jpg").body for i in range(10)]
        assert [bytes(b) for b in bodies] == [images[i % 3] for i in range(10)]
        assert fetcher.connections_opened == 1
        assert fetcher.fetch(f"http://127.0.0.1:{port}/img/10.jpg").reason == "http_404"
    finally:
        fetcher.close()


def test_a_closing_request_is_answered_then_closed(server):
    images, port = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/img/4.jpg", timeout=5) as response:  # Connection: close
        assert response.read() == images[1]
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    # pipelined keep-alive requests on one socket are answered in order
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /img/0.jpg HTTP/1.1\r\nHost: x\r\n\r\nGET /img/2.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
        expected = sum(len(images[i]) for i in (0, 2))
        data = b""
        while data.count(b"\xff\xd9") < 2 or len(data) < expected:
            chunk = sock.recv(1 << 16)
            assert chunk
            data += chunk
        assert data.index(images[0]) < data.index(images[2])
