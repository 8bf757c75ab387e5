"""The HTTP fetcher against a loopback server that misbehaves on purpose (no Ray): reasons, redirects,
retries, timeouts, opt-out, TLS, keep-alive. Framing attacks, encodings, proxies and address
fallback: tests/test_pipeline_fetch_hostile.py."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.address_guard import AddressGuard
from pipeline.fetch import Fetcher
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes

IMAGE = jpeg_bytes(80, 60)


def make_fetcher(**kw) -> Fetcher:
    defaults = dict(
        guard=AddressGuard(allow_private=True),
        timeout_s=2.0,
        retries=1,
        retry_backoff_s=0.0,
        max_redirects=3,
        max_response_bytes=1 << 20,
        user_agent="clipray-test",
        user_agent_token="clipray",
        disallowed_header_directives=["noai", "noimageai", "noindex"],
    )
    defaults.update(kw)
    return Fetcher(**defaults)


@pytest.fixture(scope="module")
def server():
    routes = {
        "/ok.jpg": IMAGE,
        "/404": Route(status=404),
        "/500": Route(status=500),
        "/503": Route(status=503),
        "/reset": Route(reset=True),
        "/hang": Route(hang=True),
        "/loop": Route(redirect="/loop"),
        "/a": Route(redirect="/b"),
        "/b": Route(redirect="/c"),
        "/c": Route(redirect="/d"),
        "/d": Route(redirect="/e"),
        "/e": IMAGE,
        "/noai": Route(body=IMAGE, headers={"X-Robots-Tag": "noai"}),
        "/other-bot": Route(body=IMAGE, headers={"X-Robots-Tag": "otherbot: noai"}),
        "/our-bot": Route(body=IMAGE, headers={"X-Robots-Tag": "clipray: noimageai, nofollow"}),
        "/big": Route(body=b"\xff" * (2 << 20)),
        "/cut": Route(body=IMAGE, truncate_to=100),
        "/no-location": Route(status=301),
        "/path%20with%20space%C3%A9.jpg": IMAGE,
    }
    with HTTPTestServer(routes) as srv:
        yield srv


def test_image_is_downloaded_whole(server):
    result = make_fetcher().fetch(server.url("/ok.jpg"))
    assert (result.reason, result.body, result.status) == (None, IMAGE, 200)
    assert server.requests[-1].headers["User-Agent"] == "clipray-test"


@pytest.mark.parametrize(
    "path, reason, attempts",
    [
        ("/404", "http_404", 1),  # client errors are not retried
        ("/500", "http_500", 2),  # server errors are (retries=1)
        ("/503", "http_503", 2),
        ("/reset", "connection_error", 2),
        ("/loop", "redirect_loop", 1),
        ("/a", "too_many_redirects", 1),  # a -> b -> c -> d -> e is 4 redirects > 3
        ("/noai", "optout", 1),
        ("/our-bot", "optout", 1),
        ("/big", "response_too_large", 1),
        ("/cut", "connection_error", 2),
        ("/no-location", "bad_redirect", 1),
    ],
)
def test_misbehaving_server_gives_a_reason(server, path, reason, attempts):
    before = server.paths().count(path)
    result = make_fetcher().fetch(server.url(path))
    assert result.reason == reason, result.detail
    assert result.body is None
    assert result.attempts == attempts
    assert server.paths().count(path) - before == attempts


def test_other_user_agents_optout_does_not_apply(server):
    assert make_fetcher().fetch(server.url("/other-bot")).reason is None


def test_redirects_within_the_limit_are_followed(server):
    result = make_fetcher(max_redirects=4).fetch(server.url("/a"))
    assert result.reason is None and result.body == IMAGE
    assert result.url == server.url("/e")


def test_a_server_that_never_answers_times_out(server):
    start = time.monotonic()
    result = make_fetcher(timeout_s=0.5, retries=1).fetch(server.url("/hang"))
    assert result.reason == "timeout"
    assert result.attempts == 2
    assert time.monotonic() - start < 5


def test_redirect_to_another_loopback_port_is_followed_when_allowed(server):
    with HTTPTestServer({"/hop": Route(redirect=server.url("/ok.jpg"))}) as first:
        result = make_fetcher().fetch(first.url("/hop"))
    assert result.reason is None and result.body == IMAGE


@pytest.mark.parametrize(
    "url, reason",
    [
        ("file:///etc/passwd", "unsupported_scheme"),
        ("ftp://127.0.0.1/a.jpg", "unsupported_scheme"),
        ("data:image/png;base64,AAAA", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("images.example.com/a.jpg", "unsupported_scheme"),
        ("http:///nohost.jpg", "invalid_url"),
        ("http://127.0.0.1:99999/a.jpg", "invalid_url"),
    ],
)
def test_only_http_and_https_urls_are_fetched(url, reason):
    assert make_fetcher().fetch(url).reason == reason


def test_unencoded_spaces_in_paths_are_percent_encoded(server):
    url = f"http://127.0.0.1:{server.port}/path with spaceé.jpg"
    assert make_fetcher().fetch(url).body == IMAGE
    assert server.paths()[-1] == "/path%20with%20space%C3%A9.jpg"


def test_keep_alive_reuses_connections(server):
    fetcher = make_fetcher()
    start = len(server.requests)
    for _ in range(10):
        assert fetcher.fetch(server.url("/ok.jpg")).reason is None
    clients = {r.client for r in server.requests[start:]}
    assert len(clients) == 1
    assert fetcher.connections_opened == 1


def test_without_keep_alive_each_request_has_its_own_connection(server):
    fetcher = make_fetcher(reuse_connections=False)
    start = len(server.requests)
    for _ in range(4):
        assert fetcher.fetch(server.url("/ok.jpg")).body == IMAGE
    assert len({r.client for r in server.requests[start:]}) == 4
    assert fetcher.connections_opened == 4


def test_a_refused_connection_is_a_connection_error():
    with HTTPTestServer() as srv:
        port = srv.port
    result = make_fetcher(retries=0).fetch(f"http://127.0.0.1:{port}/gone.jpg")
    assert result.reason == "connection_error"


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["noai"],
        ["NoAI"],
        ["nofollow"],
        ["noindex, nofollow"],
        ["clipray: noai"],
        ["otherbot: noai"],
        ["otherbot: noai", "clipray: noimageai"],
        ["unavailable_after: 25 Jun 2010 15:00:00 PST"],
        ["clipray: nofollow", "noimageindex"],
        ["  noimageai  ,  x"],
    ],
)
def test_optout_rule_agrees_with_img2dataset(values):
    import ast
    import email.message
    import importlib.util
    import os
    import traceback

    # img2dataset's own function, compiled from its installed source: importing img2dataset.downloader
    # would import wandb and torch (10+ s) for a 15-line function.
    path = os.path.join(list(importlib.util.find_spec("img2dataset").submodule_search_locations)[0], "downloader.py")
    tree = ast.parse(open(path).read())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "is_disallowed")
    namespace = {"traceback": traceback}
    exec(compile(ast.Module(body=[func], type_ignores=[]), path, "exec"), namespace)
    reference = namespace["is_disallowed"]

    from pipeline.img2dataset_parts import is_disallowed

    headers = email.message.Message()
    for v in values:
        headers["X-Robots-Tag"] = v
    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    assert is_disallowed(headers, "clipray", directives) == reference(headers, "clipray", directives)


def _self_signed(tmp_path):
    """(key file, certificate file) of a self-signed certificate for images.test; skips without openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=images.test",
            "-addext",
            "subjectAltName=DNS:images.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_https_is_pinned_to_the_checked_address_and_verifies_the_certificate(tmp_path):
    """TLS to a name (server name and certificate check use the name) over a connection to the
    address the guard checked; an untrusted certificate is a tls_error."""
    import ssl

    key, cert = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    with HTTPTestServer({"/a.jpg": IMAGE}, ssl_context=server_ctx) as server:
        guard = AddressGuard(allow_private=True, resolver=lambda host, port: ["127.0.0.1"])
        fetcher = make_fetcher(guard=guard, ca_file=str(cert))
        result = fetcher.fetch(f"https://images.test:{server.port}/a.jpg")
        assert result.reason is None and result.body == IMAGE
        assert server.requests[-1].headers["Host"] == f"images.test:{server.port}"
        # the certificate names images.test, not the address: connecting by address fails the check
        assert make_fetcher(ca_file=str(cert)).fetch(server.url("/a.jpg")).reason == "tls_error"
        # and a certificate nobody trusts fails too
        assert make_fetcher(guard=guard).fetch(f"https://images.test:{server.port}/a.jpg").reason == "tls_error"


class _ConnectProxy:
    """A loopback HTTPS proxy: answers `CONNECT host:port` (any host: it connects to 127.0.0.1 at
    that port) and then relays bytes both ways; records the CONNECT lines."""

    def __init__(self):
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            line = head.split(b"\r\n", 1)[0].decode()
            self.requests.append(line)
            upstream = socket.create_connection(("127.0.0.1", int(line.split()[1].rsplit(":", 1)[1])))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_https_goes_through_the_proxy_as_a_tunnel_and_still_verifies_the_origin(tmp_path, monkeypatch):
    """HTTPS_PROXY: one CONNECT to the URL's host and port, the origin's certificate checked end to
    end. The URL's host resolves (by stub) to a public address: the guard passes it, the proxy is
    what connects."""
    import ssl

    from pipeline.http.proxies import ProxySettings

    key, cert = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    proxy = _ConnectProxy()
    try:
        with HTTPTestServer({"/a.jpg": IMAGE}, ssl_context=server_ctx) as server:
            monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
            monkeypatch.delenv("https_proxy", raising=False)
            guard = AddressGuard(resolver=lambda host, port: ["93.184.216.34"])
            fetcher = make_fetcher(guard=guard, ca_file=str(cert), proxies=ProxySettings.from_environment())
            result = fetcher.fetch(f"https://images.test:{server.port}/a.jpg")
            assert (result.reason, result.body) == (None, IMAGE), result.detail
            assert proxy.requests == [f"CONNECT images.test:{server.port} HTTP/1.1"]
            assert server.requests[-1].headers["Host"] == f"images.test:{server.port}"
            untrusted = make_fetcher(guard=guard, proxies=ProxySettings.from_environment())
            assert untrusted.fetch(f"https://images.test:{server.port}/a.jpg").reason == "tls_error"
    finally:
        proxy.close()


def _raw(response: bytes, close: bool = False):
    """A route handler that writes `response` verbatim (then closes the connection if asked)."""

    def handler(h):
        h.wfile.write(response)
        h.wfile.flush()
        if close:
            h.close_connection = True

    return handler


def _chunked(body: bytes, size: int = 1000) -> bytes:
    chunks = b"".join(
        b"%x;ext=1\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n" for i in range(0, len(body), size)
    )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\nX-Trailer: yes\r\n\r\n"
    )


@pytest.mark.parametrize(
    "response, close, reason, reusable",
    [
        (_chunked(IMAGE), False, None, True),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(IMAGE) + IMAGE,
            False,
            None,
            True,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + IMAGE, True, None, False),  # body until close
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(IMAGE) + IMAGE, True, None, False),
        (
            b"HTTP/1.1 200 OK\r\nX-Robots-Tag: noindex\r\nX-Robots-Tag: other\r\n  folded\r\nContent-Length: 1\r\n\r\nx",
            False,
            "optout",
            True,  # the opted-out body is read (1 byte here), so the connection stays usable
        ),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True, "http_error", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True, "http_error", False),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n" + b"x" * 100,
            True,
            "connection_error",
            False,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1", True, "connection_error", False),  # headers never end
    ],
)
def test_response_framings_are_read_or_rejected(response, close, reason, reusable):
    with HTTPTestServer({"/r": Route(handler=_raw(response, close)), "/ok.jpg": IMAGE}) as srv:
        fetcher = make_fetcher(retries=0, max_response_bytes=1 << 20)
        result = fetcher.fetch(srv.url("/r"))
        assert result.reason == reason, result.detail
        if reason is None:
            assert result.body == IMAGE
        assert fetcher.fetch(srv.url("/ok.jpg")).body == IMAGE  # the next request works either way
        assert (fetcher.connections_opened == 1) == reusable


def test_a_chunked_body_over_the_cap_is_too_large():
    with HTTPTestServer({"/r": Route(handler=_raw(_chunked(b"\xff" * 5000), True))}) as srv:
        result = make_fetcher(max_response_bytes=3000).fetch(srv.url("/r"))
    assert result.reason == "response_too_large"
