"""Name resolution that fails for a moment or takes too long, at the download actor
(`pipeline.download.ShardDownloader`, no Ray), issue 15 §3.

Why not through `run_pipeline`: the test needs a resolver it controls (a name that fails for its
first lookups, then resolves to a loopback host; a lookup that hangs), and a Ray actor resolves
with the system's getaddrinfo, which a test cannot steer without editing /etc/hosts or running a
DNS server the machine is not configured to ask. `ShardDownloader` takes the resolver the address
guard calls, so the rest of the download path (guard, client, retries, commit) is the real one.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.support.hostile_server import HostileServer, redirect, response
from tests.support.url_images import ACCEPTED, case, run_shard, url_image

SLACK_S = 1.5  # scheduling on a loaded 2-core machine


class ScriptedResolver:
    """Resolves `names` ({name: address}); a name fails its first `failures[name]` lookups with
    EAI_AGAIN (a DNS blip), a name in `never` always fails with EAI_NONAME, and a name in `slow`
    answers after `slow_s` seconds (or once `release` is set). Counts lookups per name."""

    def __init__(self, names: dict[str, str], failures=None, never=(), slow=(), slow_s: float = 5.0):
        self.names, self.failures = names, dict(failures or {})
        self.never, self.slow, self.slow_s = set(never), set(slow), slow_s
        self.release = threading.Event()
        self.lookups: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        with self._lock:
            self.lookups[host] = self.lookups.get(host, 0) + 1
            count = self.lookups[host]
        if host in self.slow:
            self.release.wait(self.slow_s)
        if host in self.never:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if count <= self.failures.get(host, 0):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [self.names[host]]


@pytest.fixture
def host():
    with HostileServer(host="127.0.0.2") as server:
        yield server


def test_a_dns_failure_that_heals_is_retried_not_cached(host, tmp_path):
    """The name fails its first lookup, then resolves: with the default retries and backoff every
    row of that host is downloaded (issue 15 §3: one blip rejected all 50 rows of a host). A name
    that never resolves is a `dns_error`."""
    resolver = ScriptedResolver({"blip.test": host.host}, failures={"blip.test": 1}, never={"nowhere.test"})
    cases = []
    for i in range(8):
        url = f"http://blip.test:{host.port}/{i}.png"
        host.routes[f"/{i}.png"] = response(200, url_image(url))
        cases.append(case(f"blip-{i}", url, ACCEPTED))
    cases.append(case("never-resolves", f"http://nowhere.test:{host.port}/0.png", "dns_error"))
    run = run_shard(tmp_path, cases, resolver, retries=2, retry_backoff_s=0.5)
    assert not run.problems, f"{run.report()}\nlookups: {resolver.lookups}"
    assert resolver.lookups["blip.test"] >= 2  # the failure was looked up again, not remembered


def test_name_resolution_counts_against_the_attempt_deadline(host, tmp_path):
    """A lookup that hangs ends its row by data.timeout_s, for the URL's own host and for a host
    reached by a redirect (issue 15 §3: resolution sat outside the deadline)."""
    resolver = ScriptedResolver({"slow.test": host.host}, slow={"slow.test"})
    direct = f"http://slow.test:{host.port}/direct.png"
    host.routes["/direct.png"] = response(200, url_image(direct))
    hop = host.url("/hop")
    host.routes["/hop"] = redirect(f"http://slow.test:{host.port}/after-hop.png")
    host.routes["/after-hop.png"] = response(200, url_image(hop))
    cases = [
        case("slow-lookup", direct, "timeout", "dns_error"),
        case("slow-lookup-after-redirect", hop, "timeout", "dns_error"),
    ]
    try:
        run = run_shard(tmp_path, cases, resolver, timeout_s=1.0, retries=0)
    finally:
        resolver.release.set()
    assert not run.problems and run.seconds < 1.0 + SLACK_S, (
        f"{run.report()}\nthe shard took {run.seconds:.1f}s with data.timeout_s=1.0 (+{SLACK_S}s slack)"
    )
