"""Hostile hosts that play for time, through `run_pipeline`: slowloris on the head and on the body,
slow redirect chains, endless interim responses, headers and bodies, and Retry-After (issue 15 §1,
§3, §4).

`data.timeout_s` is one deadline per attempt, every redirect hop included: a row that cannot
finish ends by then, however its host trickles. The time a row took is read off the servers: from
its first request to the moment the client hung up (or the last script ended), so it does not
depend on how the pipeline schedules rows. Not a benchmark: the bounds leave generous slack for a
loaded machine, and only catch waits many times too long.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Callable

import pytest

from tests.support.hostile_server import (
    Close,
    Hang,
    HostileServer,
    Pause,
    Repeat,
    Send,
    Trickle,
    redirect,
    response,
)
from tests.support.url_images import ACCEPTED, Case, case, run_cases, url_image

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.5
SLACK_S = 1.5  # scheduling on a loaded 2-core machine; a per-hop deadline here overshoots by 2 s+
MAX_RETRY_AFTER_S = 30.0  # the longest Retry-After a client may honour (issue 15: "capped")


def row_seconds(servers: list[HostileServer], paths: list[str]) -> float:
    """From the first request for any of `paths` to the last moment a server was busy with one:
    its script's end, or when the client hung up in it (still running: until now)."""
    exchanges = [e for s in servers for p in paths for e in s.exchanges(p)]
    assert exchanges, f"no request for {paths}"
    end = max(e.ended if e.ended is not None else time.monotonic() for e in exchanges)
    return end - min(e.started for e in exchanges)


def slow_chain(first: HostileServer, second: HostileServer, name: str, hops: int, pause_s: float) -> Case:
    """/name-0 -> /name-1 -> ... -> /name-{hops} (the image of /name-0's URL), alternating between
    the two hosts, each answer `pause_s` late: `(hops + 1) * pause_s` in all. `hops` stays within
    data.max_redirects (5), so only the deadline can end it."""
    servers = [first, second]
    urls = [servers[i % 2].url(f"/{name}-{i}") for i in range(hops + 1)]
    for i in range(hops + 1):
        body = redirect(urls[i + 1]) if i < hops else response(200, url_image(urls[0]))
        servers[i % 2].routes[f"/{name}-{i}"] = [Pause(pause_s), Send(body)]
    return case(name, urls[0], "timeout")


def test_slow_and_endless_hosts_end_by_the_per_attempt_deadline(ray_local, tmp_path):
    with HostileServer(host="127.0.0.2") as a, HostileServer(host="127.0.0.3") as b:
        jpeg = url_image(a.url("/slowloris-body"), "JPEG")
        mib = bytes(1 << 20)
        timed = [
            case(
                "slowloris-head",
                a.add("/slowloris-head", lambda url: [Trickle(response(200, url_image(url)), 4, 0.1)]),
                "timeout",
            ),
            case(
                "slowloris-body",
                a.add(
                    "/slowloris-body",
                    lambda url: [Send(response(200, jpeg)[: -len(jpeg)]), Trickle(jpeg, 32, 0.1)],
                ),
                "timeout",
            ),
            slow_chain(a, a, "slow-chain-one-host", hops=4, pause_s=0.8),
            slow_chain(a, b, "slow-chain-two-hosts", hops=4, pause_s=0.8),
            case("silent", a.add("/silent", lambda url: [Hang()]), "timeout"),
            case(
                "silent-after-head",
                a.add("/silent-after-head", lambda url: [Send(response(200, b"", content_length="1000")), Hang()]),
                "timeout",
            ),
            case(
                "continues-without-end",
                a.add("/continues-without-end", lambda url: [Repeat(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000, 100_000)]),
                "http_error",
                "timeout",
            ),
            case(
                "headers-without-end",
                a.add(
                    "/headers-without-end",
                    lambda url: [
                        Send(b"HTTP/1.1 200 OK\r\n"),
                        Repeat(b"X-Filler: " + b"a" * 1000 + b"\r\n", 1_000_000),
                    ],
                ),
                "http_error",
                "response_too_large",
                "timeout",
            ),
            case(
                "chunked-body-without-end",
                a.add(
                    "/chunked-body-without-end",
                    lambda url: [
                        Send(response(200, b"", [("Transfer-Encoding", "chunked")], content_length=None)),
                        Repeat(b"100000\r\n" + mib + b"\r\n", 100_000),
                    ],
                ),
                "response_too_large",
            ),
            case(
                "body-until-close-without-end",
                a.add(
                    "/body-until-close-without-end",
                    lambda url: [Send(response(200, b"", content_length=None)), Repeat(mib, 100_000)],
                ),
                "response_too_large",
            ),
        ]
        control = case("prompt", a.add("/prompt", lambda url: response(200, url_image(url))), ACCEPTED)
        run = run_cases(tmp_path, timed + [control], timeout_s=TIMEOUT_S, retries=0)
        took = {}
        for c in timed:  # each case's paths: /name, or /name-0, /name-1, ... for a chain
            paths = [p for s in (a, b) for p in s.routes if p == f"/{c.name}" or p.startswith(f"/{c.name}-")]
            took[c.name] = round(row_seconds([a, b], paths), 2)
    late = {name: s for name, s in took.items() if s > TIMEOUT_S + SLACK_S}
    assert not run.problems and not late, (
        f"{run.report()}\nrows that ran past data.timeout_s={TIMEOUT_S} (+{SLACK_S}s slack): {late}\nseconds: {took}"
    )


def test_retry_after_is_honoured_and_capped(ray_local, tmp_path):
    """429/503 with Retry-After (seconds or an HTTP date) are retried after that long, not sooner;
    an hour-long Retry-After is capped (the row ends rejected, in well under an hour)."""

    def first_then_image(server: HostileServer, status: int, retry_after: Callable[[], str]) -> Callable:
        def route(url: str):
            def answer(exchange):
                if len(server.exchanges(exchange.path)) == 1:
                    return response(status, b"busy", [("Retry-After", retry_after())], content_type="text/plain")
                return response(200, url_image(url))

            return answer

        return route

    with HostileServer(host="127.0.0.2") as host:
        wait_for = {"429-retry-after-1s": 1.0, "503-retry-after-2s": 2.0, "429-retry-after-date": 1.0}
        cases = [
            case("429-retry-after-1s", host.add("/429", first_then_image(host, 429, lambda: "1")), ACCEPTED),
            case("503-retry-after-2s", host.add("/503", first_then_image(host, 503, lambda: "2")), ACCEPTED),
            case(
                "429-retry-after-date",
                host.add("/date", first_then_image(host, 429, lambda: formatdate(time.time() + 2, usegmt=True))),
                ACCEPTED,
            ),
            case(
                "503-retry-after-an-hour",
                host.add("/hour", lambda url: [Send(response(503, b"down", [("Retry-After", "3600")])), Close()]),
                "http_503",
            ),
        ]
        run = run_cases(tmp_path, cases, timeout_s=5.0, retries=1, retry_backoff_s=0.0)
        paths = {"429-retry-after-1s": "/429", "503-retry-after-2s": "/503", "429-retry-after-date": "/date"}
        gaps = {}
        for name, path in paths.items():
            seen = host.exchanges(path)
            gaps[name] = round(seen[1].started - seen[0].started, 2) if len(seen) > 1 else None
        hour = row_seconds([host], ["/hour"])
    early = {name: gap for name, gap in gaps.items() if gap is None or gap < wait_for[name] - 0.1}
    assert not run.problems and not early and hour < MAX_RETRY_AFTER_S + SLACK_S, (
        f"{run.report()}\nretried sooner than Retry-After said ({wait_for}), seconds between tries: {early}\n"
        f"Retry-After: 3600 held its row {hour:.1f}s (at most {MAX_RETRY_AFTER_S}s allowed)"
    )
