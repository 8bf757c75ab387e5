"""A download actor's memory stays bounded while hostile hosts send huge bodies and decompression
bombs (issue 15 §4: "memory per actor stays bounded").

Measured in a subprocess that plays the actor: it runs a shard of ordinary images through
`ShardDownloader` (so the client, decoders and thread pool are loaded and warm), reads its peak
resident set (VmHWM in /proc/self/status), then a shard of hostile rows, each sending 512 MiB or
more, and reads the peak again. A subprocess rather than a Ray worker: its peak belongs to this
test alone (a Ray worker process may have run other work before) and no Ray process has to be
found by name. The servers run here, in the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hostile_server import HostileServer, Repeat, Send, chunked, gzip_bomb, response
from tests.support.url_images import ACCEPTED, Case, case, run_shard, url_image

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
CAP = 4 * MIB  # data.max_response_bytes in the child
GROWTH_LIMIT_MIB = 128  # a client that buffers any one hostile body whole needs 512+
SETTINGS = {"max_response_bytes": CAP, "timeout_s": 20.0, "retries": 0}  # time enough to swallow it all


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def child_main(payload: str) -> None:
    """In the subprocess: both shards through the download actor, peaks printed as JSON."""
    job = json.loads(payload)
    folder = Path(job["folder"])
    shards = {}
    for name in ("ordinary", "hostile"):
        cases = [Case(n, url, frozenset(allowed)) for n, url, allowed in job[name]]
        (folder / name).mkdir()
        run = run_shard(folder / name, cases, **SETTINGS)
        shards[name] = {"peak_mib": peak_rss_mib(), "problems": run.problems, "report": run.report()}
    print(json.dumps(shards))


def hostile_cases(server: HostileServer) -> list[Case]:
    def head(*headers) -> bytes:
        return response(200, b"", headers, content_length=None, content_type="image/png")

    head_chunked = head(("Transfer-Encoding", "chunked"))
    gzip_header = [("Content-Encoding", "gzip")]
    mib_chunk = b"100000\r\n" + bytes(MIB) + b"\r\n"
    bomb = gzip_bomb(512)
    routes = {
        # -ffffffff lowers a running total below zero; 512 MiB of chunks then stay "under" the cap
        "negative-chunk-size": (
            lambda url: [
                Send(head_chunked + b"-ffffffff\r\n\r\n" + chunked(url_image(url))[:-5]),
                Repeat(mib_chunk, 512),
                Send(b"0\r\n\r\n"),
            ],
            ["http_error", "response_too_large"],
        ),
        "chunked-1gib": (
            lambda url: [Send(head_chunked), Repeat(mib_chunk, 1024), Send(b"0\r\n\r\n")],
            ["response_too_large"],
        ),
        "until-close-1gib": (
            lambda url: [Send(head()), Repeat(bytes(MIB), 1024)],
            ["response_too_large"],
        ),
        "content-length-1gib": (
            lambda url: [Send(head(("Content-Length", str(1024 * MIB)))), Repeat(bytes(MIB), 1024)],
            ["response_too_large"],
        ),
        "gzip-bomb-512mib": (
            lambda url: response(200, bomb, gzip_header, content_type="image/png"),
            ["response_too_large"],
        ),
        "gzip-bomb-512mib-chunked": (
            lambda url: head(("Transfer-Encoding", "chunked"), *gzip_header) + chunked(bomb, size=65536),
            ["response_too_large"],
        ),
    }
    return [case(name, server.add(f"/{name}", build), *allowed) for name, (build, allowed) in routes.items()]


def test_download_actor_memory_stays_bounded_under_huge_bodies_and_bombs(tmp_path):
    with HostileServer(host="127.0.0.2") as server:
        ordinary = [
            case(f"image-{i}", server.add(f"/image-{i}", lambda url: response(200, url_image(url, "JPEG"))), ACCEPTED)
            for i in range(16)
        ]
        job = {
            "folder": str(tmp_path),
            "ordinary": [(c.name, c.url, sorted(c.allowed)) for c in ordinary],
            "hostile": [(c.name, c.url, sorted(c.allowed)) for c in hostile_cases(server)],
        }
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; from {__name__} import child_main; child_main(sys.argv[1])",
                json.dumps(job),
            ],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert child.returncode == 0, child.stderr[-3000:]
    shards = json.loads(child.stdout.strip().splitlines()[-1])
    growth = shards["hostile"]["peak_mib"] - shards["ordinary"]["peak_mib"]
    assert not shards["ordinary"]["problems"], shards["ordinary"]["report"]
    assert not shards["hostile"]["problems"] and growth < GROWTH_LIMIT_MIB, (
        f"{shards['hostile']['report']}\npeak RSS {shards['ordinary']['peak_mib']:.0f} MiB after ordinary images, "
        f"{shards['hostile']['peak_mib']:.0f} MiB after the hostile rows: +{growth:.0f} MiB "
        f"(limit +{GROWTH_LIMIT_MIB} MiB with data.max_response_bytes {CAP // MIB} MiB)"
    )
