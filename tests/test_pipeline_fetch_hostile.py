"""The fetcher against responses that broke the old hand-written framing, and the HTTP features it
lacked: gzip/deflate bodies and bombs, bad chunk sizes, bodies longer than Content-Length on a
kept-alive connection, 204/304 with a body, unparsable headers and redirects, Retry-After, one
deadline per attempt, DNS failures retried, a proxy from HTTP_PROXY, IPv6 fallback (no Ray)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib

import pytest

from pipeline.address_guard import AddressGuard
from pipeline.fetch import Fetcher
from pipeline.http.proxies import ProxySettings
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes
from tests.test_pipeline_fetch import make_fetcher as fetcher_with_test_defaults

IMAGE = jpeg_bytes(80, 60)
OTHER = jpeg_bytes(80, 60, seed=7)


def make_fetcher(**kw) -> Fetcher:
    """test_pipeline_fetch's fetcher, without retries unless asked and with a 3 s deadline."""
    return fetcher_with_test_defaults(**{"retries": 0, "timeout_s": 3.0, **kw})


def raw(*parts: bytes, pause_s: float = 0.0, close: bool = False):
    """A route handler that writes `parts` verbatim, `pause_s` apart (then closes if asked)."""

    def handler(h):
        for k, part in enumerate(parts):
            if k and pause_s:
                time.sleep(pause_s)
            h.wfile.write(part)
            h.wfile.flush()
        h.close_connection = close

    return Route(handler=handler)


def fetch_all(fetcher: Fetcher, urls: list[str], timeout_s: float = 10.0) -> list:
    """Every URL submitted at once; their results in the order they finished."""
    done, results = threading.Event(), []

    def finished(result):
        results.append(result)
        if len(results) == len(urls):
            done.set()

    for url in urls:
        fetcher.submit(url, finished)
    assert done.wait(timeout_s), f"{len(results)} of {len(urls)} fetches finished in {timeout_s:g}s"
    return results


def head(status: str = "200 OK", **headers: str) -> bytes:
    lines = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{lines}\r\n".encode("latin-1")


def test_gzip_and_deflate_bodies_are_decoded():
    routes = {
        "/gzip": raw(
            head(Content_Encoding="gzip", Content_Length=str(len(gzip.compress(IMAGE)))) + gzip.compress(IMAGE)
        ),
        "/deflate": raw(
            head(Content_Encoding="deflate", Content_Length=str(len(zlib.compress(IMAGE)))) + zlib.compress(IMAGE)
        ),
    }
    with HTTPTestServer(routes) as srv:
        fetcher = make_fetcher()
        for path in ("/gzip", "/deflate"):
            result = fetcher.fetch(srv.url(path))
            assert (result.reason, result.body) == (None, IMAGE), result.detail
        assert "gzip" in srv.requests[-1].headers["Accept-Encoding"]


def test_a_gzip_bomb_is_cut_off_at_the_cap_on_decoded_bytes():
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # ~64 kB that inflate to 64 MiB
    assert len(bomb) < (1 << 20)  # under the cap as sent
    routes = {"/bomb": raw(head(Content_Encoding="gzip", Content_Length=str(len(bomb))) + bomb), "/ok.jpg": IMAGE}
    with HTTPTestServer(routes) as srv:
        fetcher = make_fetcher(max_response_bytes=1 << 20)
        start = time.monotonic()
        result = fetcher.fetch(srv.url("/bomb"))
        assert result.reason == "response_too_large" and result.body is None
        assert "max_response_bytes" in result.detail
        assert time.monotonic() - start < 2  # stopped at the cap, not after inflating 64 MiB
        assert fetcher.fetch(srv.url("/ok.jpg")).body == IMAGE


@pytest.mark.parametrize("encoding", ["gzip", "chunked"])
def test_the_cap_holds_without_libcurls_own_check(encoding):
    """libcurl stops a body in progress only from 8.4.0, a decoded one only from 8.20.0; a pycurl
    built on an older system libcurl would not. With libcurl's check switched off, the exchange's
    own count still stops a gzip bomb and an endless chunked body at the cap plus one piece."""
    import pycurl

    from pipeline.http.exchange import Exchange
    from pipeline.http.reuse_check import ReuseCheck

    cap = 1 << 20
    if encoding == "gzip":
        bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
        body = head(Content_Encoding="gzip", Content_Length=str(len(bomb))) + bomb
    else:
        piece = b"x" * 65536
        body = head(Transfer_Encoding="chunked") + (b"10000\r\n" + piece + b"\r\n") * 1024 + b"0\r\n\r\n"
    with HTTPTestServer({"/big": raw(body, close=True)}) as srv:
        exchange = Exchange(user_agent="t", max_response_bytes=cap, ca_file=None, reuse_check=ReuseCheck())
        handle = exchange.prepare(srv.url("/big"), "127.0.0.1", srv.port, ["127.0.0.1"], None, 10.0)
        handle.setopt(pycurl.MAXFILESIZE_LARGE, 0)  # as with a libcurl that does not count
        try:
            handle.perform()
            errno, message = 0, ""
        except pycurl.error as err:
            errno, message = err.args
        held = sum(map(len, exchange._chunks))
        exchange.close()
    outcome = exchange.outcome(errno, message)
    assert outcome.reason == "response_too_large", outcome.detail
    assert "max_response_bytes" in outcome.detail and held <= cap


def test_a_negative_chunk_size_is_a_protocol_error_not_a_way_past_the_cap():
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-ffffffff\r\n" + b"x" * (2 << 20)
    with HTTPTestServer({"/neg": raw(body, close=True), "/ok.jpg": IMAGE}) as srv:
        fetcher = make_fetcher()
        result = fetcher.fetch(srv.url("/neg"))
        assert result.reason == "http_error", result.detail
        assert fetcher.fetch(srv.url("/ok.jpg")).body == IMAGE


@pytest.mark.parametrize("pause_s", [0.0, 0.2])
def test_bytes_past_content_length_never_become_the_next_urls_response(pause_s):
    """A response longer than its Content-Length on a kept-alive connection, the extra bytes in the
    same packet or arriving later: the next URL gets its own image, on a new connection."""
    fake = head(Content_Length=str(len(OTHER))) + OTHER  # what the extra bytes pretend to be
    routes = {"/long": raw(head(Content_Length="3") + b"abc", fake, pause_s=pause_s), "/ok.jpg": IMAGE}
    with HTTPTestServer(routes) as srv:
        fetcher = make_fetcher()
        assert fetcher.fetch(srv.url("/long")).body == b"abc"
        time.sleep(pause_s + 0.1)
        for _ in range(3):
            assert fetcher.fetch(srv.url("/ok.jpg")).body == IMAGE


@pytest.mark.parametrize("status, reason", [("204 No Content", None), ("304 Not Modified", "http_304")])
def test_a_body_after_a_204_or_304_is_not_read_as_the_next_response(status, reason):
    fake = head(Content_Length=str(len(OTHER))) + OTHER
    routes = {"/nobody": raw(head(status) + fake), "/ok.jpg": IMAGE}
    with HTTPTestServer(routes) as srv:
        fetcher = make_fetcher()
        result = fetcher.fetch(srv.url("/nobody"))
        assert result.reason == reason and result.status == int(status[:3])
        assert not result.body
        assert fetcher.fetch(srv.url("/ok.jpg")).body == IMAGE


@pytest.mark.parametrize(
    "response, reason",
    [
        ("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\nabc".encode(), "http_error"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: notchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "http_error"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://[\r\nContent-Length: 0\r\n\r\n", "bad_redirect"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/x\r\nContent-Length: 0\r\n\r\n", "bad_redirect"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 300_000 + b"\r\nContent-Length: 2\r\n\r\nok", "http_error"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 2000 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "http_error"),
    ],
    ids=[
        "content-length-superscript",
        "te-notchunked",
        "location-bracket",
        "location-bad-port",
        "huge-header",
        "1xx-flood",
        "four-digit-status",
    ],
)
def test_unparsable_heads_end_with_a_reason_and_never_raise(response, reason):
    with HTTPTestServer({"/r": raw(response, close=True), "/ok.jpg": IMAGE}) as srv:
        fetcher = make_fetcher()
        result = fetcher.fetch(srv.url("/r"))
        assert result.reason == reason, result.detail
        assert fetcher.fetch(srv.url("/ok.jpg")).body == IMAGE


@pytest.mark.parametrize("url", ["http://[", "http://[::1", "https://a b.example/x", "http://example.com:0x50/"])
def test_urls_that_cannot_be_parsed_are_invalid_not_an_exception(url):
    assert make_fetcher().fetch(url).reason == "invalid_url"


def test_retry_after_is_honoured():
    with HTTPTestServer({"/busy": Route(status=429, headers={"Retry-After": "1"})}) as srv:
        result = make_fetcher(retries=1).fetch(srv.url("/busy"))
        times = [r.time for r in srv.requests]
    assert result.reason == "http_429" and result.attempts == 2
    assert times[1] - times[0] >= 0.95  # the server's wait, not the 0 s backoff


def test_a_retry_after_over_the_cap_is_not_waited_for():
    date = "Wed, 21 Oct 2099 07:28:00 GMT"
    routes = {
        "/later": Route(status=503, headers={"Retry-After": "3600"}),
        "/date": Route(status=429, headers={"Retry-After": date}),
    }
    with HTTPTestServer(routes) as srv:
        fetcher = make_fetcher(retries=2, max_retry_after_s=5)
        start = time.monotonic()
        results = [fetcher.fetch(srv.url(p)) for p in ("/later", "/date")]
        assert time.monotonic() - start < 3
        assert [(r.reason, r.attempts) for r in results] == [("http_503", 1), ("http_429", 1)]
        assert "over the 5s we wait" in results[0].detail
        assert srv.paths() == ["/later", "/date"]


def test_one_deadline_covers_every_redirect_hop():
    routes = {f"/hop{i}": Route(redirect=f"/hop{i + 1}", delay_s=0.4) for i in range(4)}
    routes["/hop4"] = IMAGE
    with HTTPTestServer(routes) as srv:
        start = time.monotonic()
        result = make_fetcher(timeout_s=1.0, max_redirects=5).fetch(srv.url("/hop0"))
        elapsed = time.monotonic() - start
    assert result.reason == "timeout"
    assert elapsed < 1.6  # one second for the whole chain, not one per hop


def test_a_redirect_hop_waiting_for_its_hosts_turn_is_not_on_the_clock():
    """Many hosts redirect to one CDN host: a hop queued behind that host's own requests (our
    politeness limit) does not time out; its network time still counts (test above)."""
    with HTTPTestServer({"/slow.jpg": Route(body=IMAGE, delay_s=0.5)}) as cdn:
        with HTTPTestServer({"/r": Route(redirect=cdn.url("/slow.jpg"))}) as origin:
            fetcher = make_fetcher(timeout_s=1.0, max_connections_per_host=1)
            results, done = [], threading.Event()

            def finished(result):
                results.append(result)
                if len(results) == 4:
                    done.set()

            for _ in range(3):  # the CDN's one slot is busy for ~1.5 s
                fetcher.submit(cdn.url("/slow.jpg"), finished)
            time.sleep(0.1)
            fetcher.submit(origin.url("/r"), finished)
            assert done.wait(10)
    assert [(r.reason, r.attempts) for r in results] == [(None, 1)] * 4
    assert all(r.body == IMAGE for r in results)
    assert results[-1].url == cdn.url("/slow.jpg")  # the redirected row, answered last


def test_a_slow_name_resolution_counts_against_the_deadline():
    def slow(host, port):
        time.sleep(2)
        return ["127.0.0.1"]

    start = time.monotonic()
    result = make_fetcher(guard=AddressGuard(allow_private=True, resolver=slow), timeout_s=0.5).fetch(
        "http://slow.example/a.jpg"
    )
    assert result.reason == "timeout" and "resolving" in result.detail
    assert time.monotonic() - start < 1.5


def test_a_dns_failure_is_retried():
    calls = []

    def flaky(host, port):
        calls.append(host)
        if len(calls) == 1:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        return ["127.0.0.1"]

    with HTTPTestServer({"/a.jpg": IMAGE}) as srv:
        guard = AddressGuard(allow_private=True, resolver=flaky, cache_s=0.0)
        result = make_fetcher(guard=guard, retries=1).fetch(f"http://images.example:{srv.port}/a.jpg")
    assert (result.reason, result.attempts, len(calls)) == (None, 2, 2)
    assert result.body == IMAGE


def test_a_fetch_goes_through_the_proxy_named_by_http_proxy(monkeypatch):
    """The proxy is a loopback server that answers absolute-form requests itself; the URL's host
    resolves (by stub) to a public address that is never contacted. The guard still checks the
    host: a host that resolves to a private address is refused before the proxy sees anything."""
    answers = {"images.example": ["93.184.216.34"], "inside.example": ["10.0.0.7"]}
    guard = AddressGuard(resolver=lambda host, port: answers[host])
    with HTTPTestServer({"http://images.example/a.jpg": IMAGE}) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.setenv("NO_PROXY", "skip.example")
        fetcher = make_fetcher(guard=guard, proxies=ProxySettings.from_environment())
        result = fetcher.fetch("http://images.example/a.jpg")
        assert (result.reason, result.body) == (None, IMAGE)
        assert proxy.paths() == ["http://images.example/a.jpg"]
        assert fetcher.fetch("http://inside.example/a.jpg").reason == "blocked_address"
        assert proxy.paths() == ["http://images.example/a.jpg"]
    assert fetcher.proxies.for_url("http", "skip.example") is None
    assert fetcher.proxies.for_url("https", "images.example") is None  # no HTTPS_PROXY set


class _TwoAddressGuard(AddressGuard):
    """A guard whose look-up gives two checked addresses (IPv4 first), as `resolve_all` does."""

    def resolve_all(self, host, port, fresh=False):
        return ["127.0.0.1", "::1"]


def _serve_once_on_ipv6(body: bytes) -> tuple[socket.socket, list]:
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.bind(("::1", 0))
    server.listen(4)
    seen = []

    def run():
        conn, peer = server.accept()
        with conn:
            seen.append((peer[0], conn.recv(65536).split(b"\r\n", 1)[0]))
            conn.sendall(head(Content_Length=str(len(body)), Connection="close") + body)

    threading.Thread(target=run, daemon=True).start()
    return server, seen


def test_the_next_checked_address_is_tried_when_the_first_refuses():
    server, seen = _serve_once_on_ipv6(IMAGE)
    port = server.getsockname()[1]  # nothing listens on 127.0.0.1 at this port
    try:
        result = make_fetcher(guard=_TwoAddressGuard(allow_private=True)).fetch(f"http://dual.example:{port}/a.jpg")
    finally:
        server.close()
    assert (result.reason, result.body) == (None, IMAGE), result.detail
    assert seen == [("::1", b"GET /a.jpg HTTP/1.1")]


def test_requests_to_one_host_are_limited_and_many_hosts_run_at_once():
    """max_connections_per_host requests at a time to one host; other hosts are not held up."""
    active, peak, lock = [0], [0], threading.Lock()

    def slow_image(h):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        h.send_response(200)
        h.send_header("Content-Length", str(len(IMAGE)))
        h.end_headers()
        h.wfile.write(IMAGE)

    with HTTPTestServer({"/slow.jpg": Route(handler=slow_image)}) as busy, HTTPTestServer({"/a.jpg": IMAGE}) as other:
        fetcher = make_fetcher(max_connections_per_host=3)
        done, results = threading.Event(), []

        def finished(result):
            results.append(result)
            if len(results) == 13:
                done.set()

        for _ in range(12):
            fetcher.submit(busy.url("/slow.jpg"), finished)
        start = time.monotonic()
        quick = fetcher.fetch(other.url("/a.jpg"))
        assert quick.body == IMAGE and time.monotonic() - start < 0.5  # not queued behind the busy host
        finished(quick)
        assert done.wait(10)
    assert all(r.body == IMAGE for r in results)
    assert peak[0] == 3


def test_a_host_that_only_times_out_is_skipped_for_a_while():
    """With 2 slots per host, 12 rows of a host that never answers would take 6 timeouts in a row;
    once 2 requests in a row timed out it is skipped: the other rows end at once as `timeout`
    without a request. Any answer clears the count; after the skip period requests go out again."""
    with HTTPTestServer({"/hang": Route(hang=True), "/a.jpg": IMAGE}) as srv:
        fetcher = make_fetcher(
            timeout_s=0.5, max_connections_per_host=2, skip_host_after_failures=2, skip_host_for_s=1.0
        )
        start = time.monotonic()
        results = fetch_all(fetcher, [srv.url("/hang")] * 12)
        assert time.monotonic() - start < 2.0  # about one timeout, not six
        assert [r.reason for r in results] == ["timeout"] * 12
        skipped = sum("not sent" in r.detail for r in results)
        assert skipped >= 8  # at most two rounds of two requests went out before the host was skipped
        assert srv.paths().count("/hang") == 12 - skipped
        assert "not sent" in fetcher.fetch(srv.url("/a.jpg")).detail  # same host: still skipped
        time.sleep(1.0)
        assert fetcher.fetch(srv.url("/a.jpg")).body == IMAGE  # tried again after the skip period
        assert fetcher.fetch(srv.url("/hang")).reason == "timeout"  # the answer cleared the count:
        assert srv.paths().count("/hang") == 13 - skipped  # one timeout does not skip the host again
        assert fetcher.fetch(srv.url("/a.jpg")).body == IMAGE


def test_a_host_that_resets_every_connection_is_skipped_for_a_while_with_its_own_reason():
    """Resets before any answer count as timeouts do: with retries, 12 rows of a resetting host
    would be 36 attempts through 2 slots; once 2 attempts in a row failed so it is skipped, and its
    other rows end at once as `connection_error` (the reason the host gave), without a request."""
    with HTTPTestServer({"/reset": Route(reset=True, delay_s=0.2), "/a.jpg": IMAGE}) as srv:
        fetcher = make_fetcher(
            retries=2, retry_backoff_s=0.05, max_connections_per_host=2, skip_host_after_failures=2, skip_host_for_s=5
        )
        results = fetch_all(fetcher, [srv.url("/reset")] * 12)
        assert [r.reason for r in results] == ["connection_error"] * 12
        skipped = [r for r in results if "not sent" in r.detail]
        assert len(skipped) >= 8 and all("the last: connection_error" in r.detail for r in skipped)
        assert srv.paths().count("/reset") <= 4  # two rounds of two at most, not 36 attempts
        assert "not sent" in fetcher.fetch(srv.url("/a.jpg")).detail  # the host, not the path, is skipped


def test_an_error_status_is_an_answer_not_a_failure_of_the_host():
    """A 503 (retried) or a 404 is the host answering: its slots stay and it is never skipped."""
    with HTTPTestServer({"/busy": Route(status=503), "/gone": Route(status=404), "/a.jpg": IMAGE}) as srv:
        fetcher = make_fetcher(retries=1, retry_backoff_s=0.0, skip_host_after_failures=1)
        assert [fetcher.fetch(srv.url(p)).reason for p in ("/busy", "/gone", "/busy")] == [
            "http_503",
            "http_404",
            "http_503",
        ]
        assert fetcher.fetch(srv.url("/a.jpg")).body == IMAGE


def test_after_a_timeout_a_host_gets_one_request_at_a_time_until_it_answers():
    from pipeline.http.hosts import HostSlots

    hosts = HostSlots(per_host=3, down_after=0, down_for_s=60)
    key = ("images.example", 80)
    assert [hosts.take(key, f"row{i}") for i in range(5)] == [True, True, True, False, False]
    hosts.failed(key, now=0.0, reason="timeout")
    assert hosts.give(key) is None  # 2 still out, more than the 1 a timed-out host gets
    assert hosts.give(key) is None
    assert hosts.give(key) == "row3"  # the last one out: the next waiter goes, alone
    assert hosts.take(key, "row5") is False
    assert hosts.answered(key) == ["row4", "row5"]  # back to 3 at a time: both waiters start
    assert hosts.skipped(key, now=1.0) is None  # down_after=0: never skipped
