"""No image is ever stored under another URL's row: keep-alive connections that hostile hosts try
to desync, through `run_pipeline` (issue 15 §1, §4 and its acceptance).

A host that sends more than one response's worth of bytes (a body longer than its Content-Length,
a 204/304 with a body, a HEAD answer with a body) plants a whole second response carrying another
row's image: a client that reuses the connection reads it as the next URL's answer. (Bytes sent
later, on a connection that looked idle, are the one case a keep-alive client cannot tell apart:
see the last test.) Every served image draws its own URL, and `run_cases` decodes every
stored image, so such a swap shows up as the row and the URL whose image it got.
"""

from __future__ import annotations

import pytest

from pipeline.config import DataConfig
from tests.support.hostile_server import HostileServer, Pause, Send, redirect, response
from tests.support.url_images import ACCEPTED, Case, case, run_cases, url_image

pytestmark = pytest.mark.slow


def one_request_at_a_time() -> dict:
    """Settings that send one row's requests at a time over one connection per host, so a planted
    response meets the very next request. The hand-written client's knob is threads_per_actor;
    a client built for many requests in flight (issue 15 §2) adds a per-host connection limit and
    an in-flight limit: whichever of these this tree's DataConfig has is set to 1."""
    knobs = ("threads_per_actor", "max_connections_per_host", "max_in_flight")
    return {name: 1 for name in knobs if name in DataConfig.model_fields}


def image(url: str) -> bytes:
    return response(200, url_image(url))


# attack -> (route for (url, planted response), outcomes it may end with). The planted response is
# whole, with another row's image: what a desynced client takes for its next request's answer.
ATTACKS = {
    "longer-than-content-length": (lambda url, plant: image(url) + plant, [ACCEPTED]),
    "garbage-after-response": (
        lambda url, plant: image(url) + b"\x00\x01 junk\r\n\r\nHTTP/9 nonsense\r\n\r\n",
        [ACCEPTED],
    ),
    "no-content-with-body": (lambda url, plant: response(204, plant), ["http_204", "not_an_image"]),
    "not-modified-with-body": (lambda url, plant: response(304, plant), ["http_304"]),
    "head-answered-with-a-body": (
        lambda url, plant: lambda ex: response(200, plant) if ex.method == "HEAD" else image(url),
        [ACCEPTED],
    ),
    "head-404-get-image": (
        lambda url, plant: lambda ex: response(404, b"no") if ex.method == "HEAD" else image(url),
        [ACCEPTED],
    ),
    "head-image-get-404": (
        lambda url, plant: lambda ex: image(url) if ex.method == "HEAD" else response(404, b"gone"),
        ["http_404"],
    ),
}


def attack(server: HostileServer, kind: str, victim_url: str, name: str = "") -> Case:
    """The attack `kind` served at /`name` (default: the kind), planting `victim_url`'s image."""
    build, allowed = ATTACKS[kind]
    name = name or kind
    return case(name, server.add(f"/{name}", lambda url: build(url, image(victim_url))), *allowed)


def requested(server: HostileServer, cases: list[Case]) -> list[str]:
    """Cases whose URL on `server` no GET reached (so their attack was never delivered)."""
    got = {e.path for e in server.exchanges() if e.method == "GET"}
    prefix = server.url("")
    return [c.name for c in cases if c.url.startswith(prefix) and c.url[len(prefix) :] not in got]


def innocent(server: HostileServer, name: str) -> Case:
    return case(name, server.add(f"/{name}", image), ACCEPTED)


def test_extra_bytes_on_a_keep_alive_connection_never_answer_the_next_url(ray_local, tmp_path):
    """Row by row on one connection: after each attack comes an innocent row whose request meets
    the planted response first; every innocent row must still get its own image."""
    with HostileServer(host="127.0.0.2") as server:
        victim = innocent(server, "victim")
        cases = [innocent(server, "innocent-first")]
        for i, kind in enumerate(ATTACKS):
            cases.append(attack(server, kind, victim.url))
            cases.append(innocent(server, f"innocent-after-{i}"))
        cases.append(victim)
        run = run_cases(tmp_path, cases, **one_request_at_a_time())
        never_asked = requested(server, cases)
    assert not run.problems, run.report()
    assert not never_asked, f"no GET reached {never_asked}: their attacks were not delivered"


def test_no_image_is_stored_under_another_urls_row_with_default_concurrency(ray_local, tmp_path):
    """64 rows over three hosts with the default number of requests in flight: plain images,
    redirects to another host, and every desync attack, each planting the image of an innocent
    row of the same host. Every stored image must decode to its own row's URL."""
    hosts = [HostileServer(host=f"127.0.0.{n}").start() for n in (2, 3, 4)]
    try:
        cases: list[Case] = []
        for h, server in enumerate(hosts):
            plain = [innocent(server, f"host{h}-plain-{i}") for i in range(12)]
            cases += plain
            for i, kind in enumerate(ATTACKS):
                cases.append(attack(server, kind, plain[i].url, name=f"{kind}-host{h}"))
        # A row whose image comes from another host after a redirect: the image is the row's own.
        for i in range(4):
            start = hosts[0].url(f"/moved-{i}")
            final = hosts[(i % 2) + 1].add(f"/final-{i}", lambda url, start=start: response(200, url_image(start)))
            hosts[0].routes[f"/moved-{i}"] = redirect(final)
            cases.append(case(f"moved-{i}", start, ACCEPTED))
        order = sorted(range(len(cases)), key=lambda i: (i * 37) % len(cases))  # hosts interleaved
        run = run_cases(tmp_path, [cases[i] for i in order], rows_per_shard=32)
        never_asked = [name for server in hosts for name in requested(server, cases)]
    finally:
        for server in hosts:
            server.stop()
    assert not run.problems, run.report()
    assert not never_asked, f"no GET reached {never_asked}"


def test_a_response_planted_on_an_idle_connection_stays_on_the_host_that_planted_it(ray_local, tmp_path):
    """HTTP/1.1 has no request ids: a host that sends a second, unasked response on a kept-alive
    connection after it looked idle (the reuse check finds nothing waiting) has it read as the
    answer to our next request to that host. No keep-alive client can tell. The swap cannot leave
    the host, though: a connection only ever carries requests to the host it was opened to, and
    that host could serve any image at its own URLs anyway. Checked: with keep-alive (the default)
    every stored image is one of its own host's; with `data.reuse_connections: false` every stored
    image is its own row's, as for every other attack."""
    from urllib.parse import urlsplit

    from tests.support.url_images import _read, decode_url_bits, url_bits

    planters = HostileServer(host="127.0.0.2").start()
    bystanders = HostileServer(host="127.0.0.3").start()
    try:
        cases = []
        for i in range(6):
            victim = innocent(planters, f"planter-victim-{i}")
            planted = planters.add(
                f"/plant-{i}", lambda url, v=victim.url: [Send(image(url)), Pause(0.3), Send(image(v))]
            )
            cases += [case(f"plant-{i}", planted, ACCEPTED), innocent(planters, f"planter-next-{i}"), victim]
            cases.append(innocent(bystanders, f"bystander-{i}"))
        host_of = {url_bits(c.url): urlsplit(c.url).hostname for c in cases}
        for run in ("kept-alive", "closed"):
            (tmp_path / run).mkdir()
        kept_alive = run_cases(tmp_path / "kept-alive", cases, **one_request_at_a_time())
        stored = _read(tmp_path / "kept-alive" / "out" / "shards")
        crossed = [
            (row["caption"], host_of.get(decode_url_bits(row["jpg"])))
            for row in stored
            if host_of.get(decode_url_bits(row["jpg"])) != urlsplit(row["url"]).hostname
        ]
        closed = run_cases(tmp_path / "closed", cases, **one_request_at_a_time(), reuse_connections=False)
    finally:
        planters.stop()
        bystanders.stop()
    assert not [p for p in kept_alive.problems if "is stored with" not in p], kept_alive.report()
    assert crossed == [], f"images crossed hosts: {crossed}"
    assert len(stored) == len(cases)
    assert not closed.problems, closed.report()
