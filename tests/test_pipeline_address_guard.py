"""The address guard: which hosts the pipeline refuses to contact, checked without sending traffic
anywhere but 127.0.0.1."""

from __future__ import annotations

import ipaddress

import pytest

from pipeline.address_guard import AddressGuard, AddressRefused, ResolveError, parse_numeric_host, refusal
from pipeline.fetch import Fetcher
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes


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


def test_refusal_names_the_kind_of_address_and_its_range():
    assert refusal(ipaddress.ip_address("169.254.169.254")) == "link-local (cloud metadata) (169.254.0.0/16, RFC 3927)"
    assert refusal(ipaddress.ip_address("127.0.0.1")) == "loopback (127.0.0.0/8, RFC 1122)"
    assert refusal(ipaddress.ip_address("10.1.2.3")) == "private (10.0.0.0/8, RFC 1918)"
    assert refusal(ipaddress.ip_address("224.0.0.251")) == "multicast (224.0.0.0/4, RFC 5771)"
    assert refusal(ipaddress.ip_address("2002:a9fe:a9fe::1")).endswith(
        "(embedded in the 6to4 address 2002:a9fe:a9fe::1)"
    )
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


def test_a_redirect_hop_connects_to_the_address_checked_for_its_own_host():
    """A redirect to another name is resolved by the guard (the stub here: `cdn.example` exists in
    no DNS) and libcurl connects to what the guard checked, with the new name's Host header."""
    image = jpeg_bytes()
    asked = []

    def stub(host, port):
        asked.append(host)
        return ["127.0.0.1"]

    with HTTPTestServer({"/a.jpg": image}) as cdn:
        with HTTPTestServer({"/r": Route(redirect=f"http://cdn.example:{cdn.port}/a.jpg")}) as origin:
            fetcher = Fetcher(guard=AddressGuard(allow_private=True, resolver=stub), retries=0)
            result = fetcher.fetch(f"http://images.example:{origin.port}/r")
    assert result.reason is None and result.body == image, result.detail
    assert asked == ["images.example", "cdn.example"]
    assert cdn.requests[0].headers["Host"] == f"cdn.example:{cdn.port}"


def test_libcurl_is_stopped_at_the_socket_if_it_would_connect_to_an_address_the_guard_did_not_check():
    """The second lock behind the pin: were libcurl ever to pick an address the guard did not return
    (a resolver of its own, a stale pin), the socket-open callback refuses it: `blocked_address`,
    and no connection is made."""
    import pycurl

    from pipeline.http.exchange import Exchange
    from pipeline.http.reuse_check import ReuseCheck

    with HTTPTestServer({"/a.jpg": jpeg_bytes()}) as server:
        exchange = Exchange(user_agent="t", max_response_bytes=1 << 20, ca_file=None, reuse_check=ReuseCheck())
        handle = exchange.prepare(server.url("/a.jpg"), "127.0.0.1", server.port, ["127.0.0.1"], None, 5.0)
        exchange.allowed = frozenset({"127.0.0.9"})  # the guard's answer no longer matches the pin
        try:
            handle.perform()
            errno, message = 0, ""
        except pycurl.error as err:
            errno, message = err.args
        finally:
            exchange.close()
    outcome = exchange.outcome(errno, message)
    assert outcome.reason == "blocked_address" and "127.0.0.1" in outcome.detail
    assert server.requests == []


# --- the explicit deny-list: every range the guard must refuse, by its first and last address.
# Written out by hand (not derived from the guard's table), so a range dropped from the table fails.
REQUIRED_V4 = [
    ("0.0.0.0", "0.255.255.255"),  # 'this network'
    ("10.0.0.0", "10.255.255.255"),  # RFC 1918
    ("100.64.0.0", "100.127.255.255"),  # shared address space / CGN
    ("127.0.0.0", "127.255.255.255"),  # loopback
    ("169.254.0.0", "169.254.255.255"),  # link-local, cloud metadata
    ("172.16.0.0", "172.31.255.255"),  # RFC 1918
    ("192.0.0.0", "192.0.0.255"),  # IETF protocol assignments (whole /24, incl. 192.0.0.9 and .10)
    ("192.0.2.0", "192.0.2.255"),  # TEST-NET-1
    ("192.31.196.0", "192.31.196.255"),  # AS112-v4
    ("192.52.193.0", "192.52.193.255"),  # AMT
    ("192.88.99.0", "192.88.99.255"),  # 6to4 relay anycast
    ("192.168.0.0", "192.168.255.255"),  # RFC 1918
    ("192.175.48.0", "192.175.48.255"),  # AS112 direct delegation
    ("198.18.0.0", "198.19.255.255"),  # benchmarking
    ("198.51.100.0", "198.51.100.255"),  # TEST-NET-2
    ("203.0.113.0", "203.0.113.255"),  # TEST-NET-3
    ("224.0.0.0", "239.255.255.255"),  # multicast
    ("240.0.0.0", "255.255.255.255"),  # reserved, broadcast
    ("168.63.129.16", "168.63.129.16"),  # Azure's host endpoint
]
REQUIRED_V6 = [
    ("::", "::"),  # unspecified
    ("::1", "::1"),  # loopback
    ("::2", "::ffff"),  # IPv4-compatible (deprecated)
    ("::1:0", "::ffff:ffff"),  # IPv4-compatible with an IPv4 address in it
    ("::ffff:0.0.0.0", "::ffff:255.255.255.255"),  # IPv4-mapped: 0/8 and 240/4 embedded
    ("::ffff:10.0.0.0", "::ffff:10.255.255.255"),  # IPv4-mapped private
    ("64:ff9b::", "64:ff9b::ffff:ffff"),  # NAT64 well-known prefix: 0/8 and 240/4 embedded
    ("64:ff9b::7f00:1", "64:ff9b::a9fe:ffff"),  # NAT64 of loopback / link-local
    ("64:ff9b:1::", "64:ff9b:1:ffff:ffff:ffff:ffff:ffff"),  # local-use NAT64
    ("100::", "100::ffff:ffff:ffff:ffff"),  # discard-only
    ("2001::", "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff"),  # IETF protocol assignments (Teredo inside)
    ("2001:0:a00:1:8000:63bf:a247:27dd", "2001:0:a00:1:8000:63bf:a247:27dd"),  # Teredo, server 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:0:4136:e378:8000:63bf:80ff:fffe"),  # Teredo, client 127.0.0.1
    ("2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),  # documentation
    ("2002::", "2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # 6to4: 0/8 and 240/4 embedded
    ("2002:c0a8::", "2002:c0a8:ffff:ffff:ffff:ffff:ffff:ffff"),  # 6to4 of 192.168.0.0/16
    ("2620:4f:8000::", "2620:4f:8000:ffff:ffff:ffff:ffff:ffff"),  # AS112 direct delegation
    ("3fff::", "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff"),  # documentation (RFC 9637)
    ("5f00::", "5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # SRv6 SIDs
    ("fc00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # unique-local
    ("fe80::", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # link-local
    ("fec0::", "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # site-local (deprecated)
    ("ff00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),  # multicast
    ("4000::", "4000::"),  # outside global unicast 2000::/3
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
]
# Neighbours of the ranges above, and embeddings of public IPv4: all contactable.
PUBLIC = [
    "1.0.0.0",
    "9.255.255.255",
    "11.0.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "126.255.255.255",
    "128.0.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "191.255.255.255",
    "192.0.1.0",
    "192.167.255.255",
    "192.169.0.0",
    "198.17.255.255",
    "198.20.0.0",
    "223.255.255.255",
    "168.63.129.15",
    "168.63.129.17",
    "93.184.216.34",
    "2000::",
    "2606:4700:4700::1111",
    "2001:200::",  # just past 2001::/23
    "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
    "3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "::ffff:93.184.216.34",  # IPv4-mapped public
    "64:ff9b::5db8:d822",  # NAT64 of 93.184.216.34
    "2002:5db8:d822::1",  # 6to4 of 93.184.216.34
    "2001:0:4136:e378:8000:63bf:a247:27dd",  # Teredo: server 65.54.227.120, client 93.184.216.34
]


@pytest.mark.parametrize("first, last", REQUIRED_V4 + REQUIRED_V6)
def test_every_denied_range_is_refused_from_its_first_to_its_last_address(first, last):
    guard = AddressGuard(resolver=_no_dns)
    for host in (first, last):
        assert refusal(ipaddress.ip_address(host)) is not None, host
        with pytest.raises(AddressRefused):
            guard.resolve(host, 80)


@pytest.mark.parametrize("host", PUBLIC)
def test_addresses_next_to_the_denied_ranges_are_allowed(host):
    assert refusal(ipaddress.ip_address(host)) is None
    assert AddressGuard(resolver=_no_dns).resolve(host, 80) == str(ipaddress.ip_address(host))


def test_the_table_is_the_decision_not_the_ipaddress_module(monkeypatch):
    """The guard never asks `ipaddress` what is private or global: with those answers broken, its
    decisions stay the same. And where `ipaddress` calls an address global, the table still refuses it."""
    assert ipaddress.ip_address("168.63.129.16").is_global  # Azure's host endpoint: global to ipaddress
    assert not ipaddress.ip_address("100.64.0.1").is_private  # CGN: not private to ipaddress
    samples = [first for first, _ in REQUIRED_V4 + REQUIRED_V6] + PUBLIC
    expected = {host: refusal(ipaddress.ip_address(host)) for host in samples}

    def broken(self):
        raise AssertionError("the guard consulted ipaddress's classification tables")

    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        for name in (
            "is_private",
            "is_global",
            "is_reserved",
            "is_loopback",
            "is_link_local",
            "is_multicast",
            "is_unspecified",
        ):
            monkeypatch.setattr(cls, name, property(broken))
    for name in ("is_site_local", "sixtofour", "teredo"):
        monkeypatch.setattr(ipaddress.IPv6Address, name, property(broken))
    assert {host: refusal(ipaddress.ip_address(host)) for host in samples} == expected
    assert (
        refusal(ipaddress.ip_address("168.63.129.16")) == "Azure's host endpoint (168.63.129.16/32, Azure wireserver)"
    )
    assert refusal(ipaddress.ip_address("192.0.0.9")).startswith("IETF protocol assignments")


# --- resolve_all: every checked address, for IPv4/IPv6 fallback


def test_resolve_all_returns_every_checked_address_ipv4_first_each_once():
    answers = ["2606:4700::1", "93.184.216.34", "2606:4700::1", "93.184.216.35", "fe80::1%eth0"]
    guard = AddressGuard(allow_private=True, resolver=lambda host, port: answers)
    assert guard.resolve_all("cdn.example", 443) == ["93.184.216.34", "93.184.216.35", "2606:4700::1", "fe80::1"]
    assert guard.resolve("cdn.example", 443) == "93.184.216.34"
    with pytest.raises(AddressRefused, match="fe80::1 is link-local"):  # one refused answer refuses the host
        AddressGuard(resolver=lambda host, port: answers).resolve_all("cdn.example", 443)
    assert AddressGuard(resolver=_no_dns).resolve_all("[2606:4700::1]", 80) == ["2606:4700::1"]


# --- DNS failures are cached briefly; refusals and addresses for cache_s


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import pipeline.address_guard as module

    fake = _Clock()
    monkeypatch.setattr(module, "time", fake)
    return fake


def _flaky_resolver(failures: int, answers: dict):
    """A resolver that fails the first `failures` look-ups of every name, then answers."""
    calls: list[str] = []

    def resolve(host, port):
        calls.append(host)
        if calls.count(host) <= failures:
            raise OSError(-3, "Temporary failure in name resolution")
        return answers[host]

    return resolve, calls


def test_a_dns_failure_is_cached_only_briefly_then_asked_again(clock):
    resolver, calls = _flaky_resolver(1, {"img.example": ["93.184.216.34"]})
    guard = AddressGuard(resolver=resolver)
    assert guard.dns_error_cache_s <= 5
    with pytest.raises(ResolveError, match="Temporary failure"):
        guard.resolve("img.example", 80)
    clock.now += 4.9  # a burst of URLs of the host: answered from the cache, the resolver asked once
    for _ in range(3):
        with pytest.raises(ResolveError):
            guard.resolve("img.example", 80)
    assert calls == ["img.example"]
    clock.now += 0.2  # past dns_error_cache_s: the blip has healed
    assert guard.resolve("img.example", 80) == "93.184.216.34"
    assert calls == ["img.example"] * 2


def test_fresh_skips_a_cached_dns_failure_but_not_a_refusal(clock):
    resolver, calls = _flaky_resolver(1, {"img.example": ["93.184.216.34"], "meta.example": ["169.254.169.254"]})
    guard = AddressGuard(resolver=resolver, dns_error_cache_s=5)
    with pytest.raises(ResolveError):
        guard.resolve("img.example", 80)
    assert guard.resolve("img.example", 80, fresh=True) == "93.184.216.34"  # a retry asks again
    with pytest.raises(ResolveError):
        guard.resolve("meta.example", 80)
    with pytest.raises(AddressRefused):
        guard.resolve("meta.example", 80, fresh=True)
    with pytest.raises(AddressRefused):
        guard.resolve("meta.example", 80, fresh=True)  # the refusal is cached: not asked again
    assert calls.count("meta.example") == 2


def test_refusals_and_addresses_stay_cached_for_cache_s(clock):
    resolver, calls = _flaky_resolver(0, {"meta.example": ["169.254.169.254"], "img.example": ["93.184.216.34"]})
    guard = AddressGuard(resolver=resolver, cache_s=300, dns_error_cache_s=5)
    for _ in range(2):
        with pytest.raises(AddressRefused):
            guard.resolve("meta.example", 80)
        guard.resolve("img.example", 80)
        clock.now += 299
    assert calls == ["meta.example", "img.example"]
    with pytest.raises(AddressRefused):
        guard.resolve("meta.example", 80)  # 598 s later: looked up again
    assert calls == ["meta.example", "img.example", "meta.example"]


def test_the_data_config_sets_the_guard():
    from pipeline.config import DataConfig

    guard = AddressGuard.for_data(DataConfig(dns_error_cache_s=1.5, allow_private_addresses=True))
    assert (guard.dns_error_cache_s, guard.allow_private) == (1.5, True)
    assert AddressGuard.for_data(DataConfig()).dns_error_cache_s == 5.0
    with pytest.raises(ValueError, match="dns_error_cache_s"):
        DataConfig(dns_error_cache_s=600)
