"""The address guard: which hosts the pipeline refuses to contact, checked without sending traffic
anywhere but 127.0.0.1."""

from __future__ import annotations

import ipaddress

import pytest

from pipeline.address_guard import AddressGuard, AddressRefused, ResolveError, parse_numeric_host, refusal
from pipeline.fetch import Fetcher
from tests.support.http_server import HTTPTestServer, jpeg_bytes


def _no_dns(host, port):
    raise AssertionError(f"the guard must not resolve numeric host {host!r}")


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # cloud metadata
        "10.0.0.1",
        "192.168.1.1",
        "172.16.5.4",
        "127.0.0.1",
        "::1",
        "[::1]",
        "0x7f000001",
        "2130706433",
        "127.1",
        "0177.0.0.1",  # 127.0.0.1 as the C resolver reads them
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "100.64.0.1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:169.254.169.254",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "2002:a9fe:a9fe::1",  # 6to4 wrapping 169.254.169.254
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_literal_private_addresses_are_refused_without_dns(host):
    guard = AddressGuard(resolver=_no_dns)
    with pytest.raises(AddressRefused, match="allow_private_addresses"):
        guard.resolve(host, 80)
    with pytest.raises(AddressRefused, match="allow_private_addresses"):  # the cached answer
        guard.resolve(host, 80)


@pytest.mark.parametrize("host", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "0x5db8d822"])
def test_literal_public_addresses_are_allowed_and_pinned(host):
    guard = AddressGuard(resolver=_no_dns)
    assert guard.resolve(host, 80) == guard.resolve(host, 80) == str(parse_numeric_host(host))


def test_numeric_hosts_are_read_like_the_c_resolver():
    assert parse_numeric_host("2130706433") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_numeric_host("0x7f000001") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_numeric_host("127.1") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_numeric_host("images.example.com") is None
    assert parse_numeric_host("deadbeef.example") is None


def test_refusal_names_the_kind_of_address():
    assert refusal(ipaddress.ip_address("169.254.169.254")) == "link-local"
    assert refusal(ipaddress.ip_address("127.0.0.1")) == "loopback"
    assert refusal(ipaddress.ip_address("10.1.2.3")) == "private"
    assert refusal(ipaddress.ip_address("224.0.0.251")) == "multicast"
    assert refusal(ipaddress.ip_address("1.1.1.1")) is None


def test_dns_answers_from_a_stub_resolver_are_checked():
    answers = {
        "metadata.evil.example": ["169.254.169.254"],
        "public.example": ["93.184.216.34"],
        "mixed.example": ["93.184.216.34", "10.0.0.7"],  # one private answer taints the name
        "v6.example": ["::1"],
        "both.example": ["2606:4700::1", "93.184.216.34"],
    }
    calls = []

    def stub(host, port):
        calls.append(host)
        if host not in answers:
            raise OSError("Name or service not known")
        return answers[host]

    guard = AddressGuard(resolver=stub)
    assert guard.resolve("public.example", 80) == "93.184.216.34"
    assert guard.resolve("both.example", 443) == "93.184.216.34"  # IPv4 preferred
    for host in ("metadata.evil.example", "mixed.example", "v6.example"):
        with pytest.raises(AddressRefused):
            guard.resolve(host, 80)
    with pytest.raises(ResolveError):
        guard.resolve("nowhere.example", 80)
    # answers are cached per guard: a second look-up does not ask again
    guard.resolve("public.example", 80)
    assert calls.count("public.example") == 1
    with pytest.raises(AddressRefused):
        guard.resolve("metadata.evil.example", 80)
    assert calls.count("metadata.evil.example") == 1


def test_allow_private_addresses_lets_loopback_through():
    assert AddressGuard(allow_private=True, resolver=_no_dns).resolve("127.0.0.1", 80) == "127.0.0.1"


def test_fetch_of_loopback_urls_sends_nothing_when_private_addresses_are_refused():
    image = jpeg_bytes()
    with HTTPTestServer({"/a.jpg": image}) as server:
        port = server.port
        fetcher = Fetcher(guard=AddressGuard(allow_private=False), timeout_s=2, retries=2, retry_backoff_s=0)
        urls = [
            server.url("/a.jpg"),
            f"http://localhost:{port}/a.jpg",
            f"http://2130706433:{port}/a.jpg",
            f"http://0x7f000001:{port}/a.jpg",
            f"http://[::ffff:127.0.0.1]:{port}/a.jpg",
            f"http://127.1:{port}/a.jpg",
        ]
        results = [fetcher.fetch(u) for u in urls]
        assert [r.reason for r in results] == ["blocked_address"] * len(urls)
        assert all(r.attempts == 1 for r in results), "a refused address is not retried"
        assert server.request_count() == 0


def test_redirect_to_a_refused_address_is_checked_at_each_hop():
    """A public-looking name that redirects to loopback: the second hop is refused."""
    image = jpeg_bytes()
    with HTTPTestServer({"/a.jpg": image}) as inner, HTTPTestServer() as outer:
        from tests.support.http_server import Route

        outer.add("/start", Route(redirect=inner.url("/a.jpg")))
        # "cdn.example" resolves (by stub) to the outer loopback server and is allowed by name;
        # its redirect target is the literal 127.0.0.1, which the guard refuses.
        allow = {"cdn.example"}

        class Guard(AddressGuard):
            def check_ip(self, ip, host):
                if host not in allow:
                    super().check_ip(ip, host)

        fetcher = Fetcher(guard=Guard(resolver=lambda h, p: ["127.0.0.1"]), timeout_s=2, retries=0)
        result = fetcher.fetch(f"http://cdn.example:{outer.port}/start")
        assert result.reason == "blocked_address"
        assert outer.paths() == ["/start"]
        assert inner.request_count() == 0


def test_connection_goes_to_the_checked_address_with_the_original_host_header():
    image = jpeg_bytes()
    with HTTPTestServer({"/a.jpg": image}) as server:
        fetcher = Fetcher(guard=AddressGuard(allow_private=True, resolver=lambda h, p: ["127.0.0.1"]), retries=0)
        result = fetcher.fetch(f"http://images.example:{server.port}/a.jpg")
        assert result.reason is None and result.body == image
        assert server.requests[0].headers["Host"] == f"images.example:{server.port}"
