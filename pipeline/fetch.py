"""Fetch image URLs: http/https only, checked addresses, redirects hop by hop, retries, caps.

`Fetcher.submit(url, on_done)` starts a download and calls `on_done(FetchResult)` when it ends;
`Fetcher.fetch(url)` is the same, blocking. Neither raises for a bad URL or a bad server: the result's
`reason` is a stable code from `pipeline.reasons` (None on success).

The HTTP work is libcurl's (`pipeline/http/`: one network thread per fetcher, any number of requests
in flight). The rules are ours:
- the address guard resolves each hop's host (on a small thread pool: name resolution blocks) and
  the connection goes only to the addresses it checked; redirects are followed here, hop by hop,
  each hop resolved and checked again (`redirect_loop`, `too_many_redirects`, `bad_redirect`);
- one deadline per attempt (`timeout_s`): name resolution, every redirect hop and every byte;
- at most `max_connections_per_host` requests at a time per host (politeness), and a host whose
  last requests all failed without an answer (timed out, refused or reset) is skipped for a while
  (`http/hosts.py`); a request that waits
  for its turn is not yet on the clock, and a redirect hop that waits for its host's turn stops
  its attempt's clock meanwhile (many hosts redirecting to one busy CDN host must not time out in
  our own queue: that is politeness, not the network being slow);
- retries after `timeout`, `connection_error`, `dns_error`, 429 and 5xx with doubling backoff;
  `Retry-After` on 429/503 is honoured up to `max_retry_after_s` (a server that asks for longer is
  not retried: the row keeps its `http_429`/`http_503`);
- `permits` (optional, `in_order.Permits`): a request holds one from the moment its transfer can
  start (it has its host's slot) until its caller gives it back (the download actor: when the body
  is decoded), so requests under way plus bodies not yet decoded never exceed the permits; a
  request that waits for its host's turn or a retry's backoff holds none (a slow host's backlog
  does not starve the other hosts), and one that has its host's turn but finds no permit free
  waits for the next one given back (`Permits.try_take`); submit a request with a permit taken;
- `busy` (optional, `in_order.Gauge`): up when a transfer starts, down when it ends (the caller
  counts its undecoded bodies on the same gauge: its peak is what memory held);
- proxies (`ProxySettings`): the guard still checks the URL's host, the proxy then connects to it;
- keep-alive (`reuse_connections`): a connection is reused only when nothing waits on it before the
  next request (`http/reuse_check.py`). What keep-alive cannot rule out: a host that holds back a
  planted response until our next request to it is on the wire; that response answers the request
  (an image of that same host, under another of its URLs). `reuse_connections=False` rules it out
  at the cost of a new connection (and TLS handshake) per request.

Over 400 lines on purpose: a URL's way through attempts, hops, host slots, name resolution and the
transfer is one state machine on the network thread; its steps are read together.
"""

from __future__ import annotations

import re
import threading
import time
import traceback
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from pipeline import img2dataset_parts
from pipeline.address_guard import AddressGuard, AddressRefused, ResolveError, parse_numeric_host
from pipeline.http.curl_loop import CurlLoop
from pipeline.http.exchange import REDIRECT_STATUSES, STALE, Exchange, Headers, default_ca_file
from pipeline.http.hosts import HostSlots
from pipeline.http.proxies import ProxySettings
from pipeline.http.urls import BadURL, parse_url, retry_after_s
from pipeline.http.reuse_check import ReuseCheck
from pipeline.in_order import Gauge, Permits
from pipeline.reasons import http_reason

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_REASONS = frozenset({"timeout", "connection_error", "dns_error"})
RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass
class FetchResult:
    body: Optional[Union[bytes, bytearray]]
    reason: Optional[str] = None  # None: success
    detail: str = ""
    status: Optional[int] = None
    url: str = ""  # the final URL after redirects
    attempts: int = 0


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, status: Optional[int] = None, headers: Optional[Headers] = None):
        super().__init__(detail)
        self.reason, self.detail, self.status, self.headers = reason, detail, status, headers


class _Job:
    """One URL on its way through attempts and redirect hops (touched on the network thread only)."""

    __slots__ = (
        "url",
        "on_done",
        "attempt",
        "current",
        "seen",
        "deadline",
        "host",
        "slot",
        "step",
        "timer",
        "done",
        "fresh",
        "dns_failed",
        "permit",
        "queued_at",
    )

    def __init__(self, url: str, on_done: Callable[[FetchResult], None]):
        self.url, self.on_done = url, on_done
        self.attempt = 0
        self.current = url
        self.seen: set[str] = set()
        self.deadline: Optional[float] = None
        self.host: tuple = ()  # (scheme, host, port, wire URL) of the current hop
        self.slot: Optional[tuple[str, int]] = None  # the per-host slot held
        self.step = 0  # bumped at each hop and attempt: late callbacks of an earlier one are dropped
        self.timer = None
        self.done = False
        self.fresh = False  # the next request goes on a new connection
        self.dns_failed = False  # the last attempt ended in dns_error: look the name up again
        self.permit = False  # holds one of the Fetcher's `permits`
        self.queued_at: Optional[float] = None  # when a redirect hop began to wait for its host's turn


class Fetcher:
    """Downloads URLs with the rules of the `data` config; thread-safe, one per download actor."""

    def __init__(
        self,
        *,
        guard: Optional[AddressGuard] = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        max_redirects: int = 5,
        max_response_bytes: int = 32 * 1024 * 1024,
        user_agent: str = "clipray",
        user_agent_token: Optional[str] = None,
        disallowed_header_directives: Iterable[str] = (),
        max_connections_per_host: int = 8,
        skip_host_after_failures: int = 8,
        skip_host_for_s: float = 60.0,
        max_retry_after_s: float = 30.0,
        proxies: Optional[ProxySettings] = None,
        ca_file: Optional[str] = None,
        resolver_threads: int = 16,
        reuse_connections: bool = True,
        permits: Optional[Permits] = None,
        busy: Optional[Gauge] = None,
    ):
        self.guard = guard or AddressGuard()
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.max_redirects = max_redirects
        self.max_response_bytes = max_response_bytes
        self.user_agent = re.sub(r"[\r\n]+", " ", user_agent)
        self.user_agent_token = user_agent_token.strip().lower() if user_agent_token else None
        self.directives = {d.strip().lower() for d in disallowed_header_directives}
        self.max_retry_after_s = max_retry_after_s
        self.proxies = proxies or ProxySettings()
        self.ca_file = ca_file or default_ca_file()
        self.resolver_threads = resolver_threads
        self.reuse_connections = reuse_connections
        self.loop = CurlLoop()
        self.permits = permits
        if permits is not None:
            permits.on_handoff = self._handed_over
        self.busy = busy
        self._parked: deque = deque()  # (job, step, args) waiting for a permit, oldest first
        self.reuse_check = ReuseCheck()
        self.connections_opened = 0  # new connections libcurl made (for tests and benchmarks)
        self._free: list[Exchange] = []
        self.hosts = HostSlots(max_connections_per_host, skip_host_after_failures, skip_host_for_s)
        self._resolvers: Optional[ThreadPoolExecutor] = None
        self._numeric: dict[str, bool] = {}  # host -> written as an address (no look-up)
        self._closed = False

    # --- the API (any thread)

    def submit(self, url: str, on_done: Callable[[FetchResult], None]) -> None:
        """Download `url`; `on_done(result)` runs on the network thread (keep it short). With
        `permits`, the caller has taken one for the request and gives it back once done with the
        result."""
        self.loop.call_soon(self._new_job, url, on_done)

    def submit_many(self, requests: list[tuple[str, Callable[[FetchResult], None]]]) -> None:
        """`submit` for each (url, on_done), handed to the network thread at once (one wake-up)."""
        self.loop.call_soon(self._new_jobs, requests)

    def fetch(self, url: str) -> FetchResult:
        """Download `url` and wait for the result."""
        if self.loop.in_loop_thread():
            raise RuntimeError("Fetcher.fetch() would wait on its own network thread; use submit()")
        done = threading.Event()
        box: list[FetchResult] = []

        def finished(result: FetchResult) -> None:
            box.append(result)
            done.set()

        self.submit(url, finished)
        done.wait()
        return box[0]

    def close(self) -> None:
        """Stop the network thread; downloads still in flight never call their on_done."""
        if self._closed:
            return
        self._closed = True
        self.loop.close()
        for exchange in self._free:
            exchange.close()
        if self._resolvers is not None:
            self._resolvers.shutdown(wait=False, cancel_futures=True)

    # --- a job's steps (network thread). Each catches its own errors: a job always ends.

    def _new_job(self, url: str, on_done: Callable[[FetchResult], None]) -> None:
        self._step(self._job(url, on_done), self._start_attempt)

    def _new_jobs(self, requests: list[tuple[str, Callable[[FetchResult], None]]]) -> None:
        for url, on_done in requests:
            self._step(self._job(url, on_done), self._start_attempt)

    def _job(self, url: str, on_done: Callable[[FetchResult], None]) -> _Job:
        job = _Job(url, on_done)
        job.permit = self.permits is not None  # the caller took it
        return job

    def _step(self, job: _Job, fn: Callable, *args) -> None:
        """Run one of the job's steps; a bug in it ends the job as `internal_error` (the row is
        rejected with the traceback, never lost: its shard waits for every row)."""
        try:
            fn(job, *args)
        except Exception:  # noqa: BLE001
            self._crashed(job)

    def _start_attempt(self, job: _Job) -> None:
        job.attempt += 1
        job.queued_at = None
        job.current = job.url
        job.seen = {job.url}
        job.deadline = None
        self._hop(job)

    def _hop(self, job: _Job) -> None:
        """Start the request for job.current: take a per-host slot, or queue for one."""
        job.step += 1
        try:
            job.host = parse_url(job.current)
        except BadURL as bad:
            return self._attempt_failed(job, _Failure(bad.reason, bad.detail))
        key = (job.host[1].lower(), job.host[2])
        if self.hosts.take(key, job):
            self._with_permit(job, self._take_slot, key)
        else:
            if job.deadline is not None:  # a redirect hop: its clock stops while it waits
                job.queued_at = time.monotonic()
            self._wait(job)

    def _take_slot(self, job: _Job, key: tuple[str, int]) -> None:
        """The job holds a slot of its host: start its request (name resolution first)."""
        job.slot = key
        now = time.monotonic()
        skipped = self.hosts.skipped(key, now)
        if skipped is not None:  # no retry either: it would be skipped too
            self._release_slot(job)
            reason, why = skipped
            return self._finish(job, self._result(job, reason, f"{job.current[:200]}: {why}", None))
        if job.deadline is None:
            job.deadline = now + self.timeout_s
        elif job.queued_at is not None:  # the wait for this host's turn is not on the clock
            job.deadline += now - job.queued_at
            job.queued_at = None
        if now >= job.deadline:
            return self._attempt_failed(job, self._timeout(job))
        host, port = job.host[1], job.host[2]
        fresh, job.dns_failed = job.dns_failed, False
        numeric = self._numeric.get(host)
        if numeric is None:
            if len(self._numeric) > 4096:
                self._numeric.clear()
            numeric = self._numeric[host] = parse_numeric_host(host) is not None
        if numeric:  # checked without a look-up: no thread needed
            return self._resolved(job, job.step, self._resolve(host, port))
        if self._resolvers is None:
            self._resolvers = ThreadPoolExecutor(self.resolver_threads, thread_name_prefix="resolve")
        step = job.step
        job.timer = self.loop.call_at(job.deadline, self._step, job, self._resolve_timed_out, step)
        self._resolvers.submit(
            lambda: self.loop.call_soon(self._step, job, self._resolved, step, self._resolve(host, port, fresh))
        )

    def _resolve(self, host: str, port: int, fresh: bool = False) -> Union[list[str], _Failure]:
        """The guard's checked addresses in the order to try (IPv4/IPv6 fallback), or the failure
        (any thread). fresh: a retry after `dns_error`, so the guard asks its resolver again."""
        try:
            return self.guard.resolve_all(host, port, fresh=fresh)
        except AddressRefused as exc:
            return _Failure("blocked_address", str(exc))
        except ResolveError as exc:
            return _Failure("dns_error", str(exc))
        except Exception as exc:  # noqa: BLE001 - a resolver bug ends the row with its traceback
            return _Failure("internal_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")

    def _resolve_timed_out(self, job: _Job, step: int) -> None:
        if job.step == step and not job.done:
            job.step += 1  # the look-up's late answer is dropped
            self.hosts.failed(job.slot, time.monotonic(), "timeout")
            self._attempt_failed(job, self._timeout(job, "resolving the host"))

    def _resolved(self, job: _Job, step: int, answer: Union[list[str], _Failure]) -> None:
        if job.step != step or job.done:
            return
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if isinstance(answer, _Failure):
            return self._attempt_failed(job, answer)
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            return self._attempt_failed(job, self._timeout(job))
        scheme, host, port, wire_url = job.host
        exchange = self._free.pop() if self._free else self._new_exchange()
        proxy = self.proxies.for_url(scheme, host)
        handle = exchange.prepare(wire_url, host, port, answer, proxy, remaining, fresh=job.fresh)
        job.fresh = False
        exchange.job = job
        self.loop.add(handle, self._transferred)
        if self.busy is not None:
            self.busy.up()

    def _transferred(self, handle, errno: int, message: str) -> None:
        """libcurl finished a transfer (the loop's callback)."""
        exchange = handle.exchange
        if self.busy is not None:
            self.busy.down()
        self._step(exchange.job, self._after_transfer, exchange, errno, message)

    def _after_transfer(self, job: _Job, exchange: Exchange, errno: int, message: str) -> None:
        key = job.slot
        started = []
        try:
            outcome = exchange.outcome(errno, message)
            self.connections_opened += exchange.connections_made()
            if outcome.reason == "timeout" or (outcome.reason == "connection_error" and outcome.status is None):
                # a timeout also after a head (a host that trickles its body is as stuck); a connection
                # refused or reset before any head: no answer either
                self.hosts.failed(key, time.monotonic(), outcome.reason)
            elif outcome.status is not None:
                started = self.hosts.answered(key)
        finally:
            exchange.job = None
            self._free.append(exchange)
            self._release_slot(job)
        for waiter in started:  # the host answered: the rows waiting for its slots go on
            self._step(waiter, self._resume, key)
        if outcome.reason == STALE:  # not sent: again, on a new connection
            job.fresh = True
            return self._hop(job)
        if outcome.reason is not None:
            return self._attempt_failed(job, _Failure(outcome.reason, outcome.detail, outcome.status))
        status = outcome.status
        if status in REDIRECT_STATUSES:
            return self._redirect(job, status, outcome.headers)
        if not 200 <= status < 300:
            detail = f"{job.current[:200]}: HTTP {status}"
            return self._attempt_failed(job, _Failure(http_reason(status), detail, status, outcome.headers))
        if self.directives and img2dataset_parts.is_disallowed(outcome.headers, self.user_agent_token, self.directives):
            detail = "X-Robots-Tag: " + ", ".join(outcome.headers.get_all("X-Robots-Tag", []))
            return self._attempt_failed(job, _Failure("optout", detail, status))
        self._finish(job, FetchResult(outcome.body, status=status, url=job.current, attempts=job.attempt))

    def _redirect(self, job: _Job, status: int, headers: Headers) -> None:
        location = headers.get("Location")
        if not location:
            return self._attempt_failed(
                job, _Failure("bad_redirect", f"{job.current[:200]}: HTTP {status} without Location", status)
            )
        try:
            nxt = urllib.parse.urljoin(job.current, location.strip())
            urllib.parse.urlsplit(nxt).port  # noqa: B018 - raises for a bad host or port
        except ValueError as exc:
            detail = f"{job.current[:200]}: HTTP {status} to an unusable Location {location[:200]!r} ({exc})"
            return self._attempt_failed(job, _Failure("bad_redirect", detail, status))
        if nxt in job.seen:
            return self._attempt_failed(
                job, _Failure("redirect_loop", f"{job.current[:200]} redirects back to {nxt[:200]}", status)
            )
        if len(job.seen) > self.max_redirects:
            detail = f"more than {self.max_redirects} redirects from {job.url[:200]} (last {job.current[:200]})"
            return self._attempt_failed(job, _Failure("too_many_redirects", detail))
        job.seen.add(nxt)
        job.current = nxt
        self._hop(job)

    def _release_slot(self, job: _Job) -> None:
        key, job.slot = job.slot, None
        if key is None:
            return
        nxt = self.hosts.give(key)
        if nxt is not None:
            self._step(nxt, self._resume, key)

    def _attempt_failed(self, job: _Job, failure: _Failure) -> None:
        self._release_slot(job)
        retryable = failure.reason in RETRY_REASONS or failure.status in RETRY_STATUSES
        if retryable and job.attempt <= self.retries:
            job.dns_failed = failure.reason == "dns_error"
            delay = self.retry_backoff_s * (2 ** (job.attempt - 1))
            if failure.status in RETRY_AFTER_STATUSES:
                asked = retry_after_s(failure.headers, time.time())
                if asked is not None and asked > self.max_retry_after_s:
                    detail = f"{failure.detail}; Retry-After {asked:g}s is over the {self.max_retry_after_s:g}s we wait"
                    return self._finish(job, self._result(job, failure.reason, detail, failure.status))
                delay = max(delay, asked or 0.0)
            job.step += 1
            self._wait(job)
            self.loop.call_at(time.monotonic() + delay, self._step, job, self._retry)
            return
        self._finish(job, self._result(job, failure.reason, failure.detail, failure.status))

    def _timeout(self, job: _Job, doing: str = "") -> _Failure:
        during = f" ({doing})" if doing else ""
        return _Failure("timeout", f"{job.current[:200]}: no complete answer in {self.timeout_s:g}s{during}")

    def _crashed(self, job: _Job) -> None:
        self._release_slot(job)
        tb = traceback.format_exc(limit=6)
        self._finish(job, self._result(job, "internal_error", f"the HTTP layer failed on this URL\n{tb}", None))

    def _result(self, job: _Job, reason: str, detail: str, status: Optional[int]) -> FetchResult:
        return FetchResult(None, reason=reason, detail=detail, status=status, url=job.url, attempts=job.attempt)

    def _wait(self, job: _Job) -> None:
        """The job waits (for its host's turn, or a retry's backoff): it gives its permit back."""
        if job.permit:
            job.permit = False
            self.permits.give()

    def _with_permit(self, job: _Job, step: Callable, *args) -> None:
        """Run the step once the job holds a permit: now, or when one is given back (`_unpark`)."""
        if job.permit or self.permits is None or self.permits.try_take():
            job.permit = self.permits is not None
            return step(job, *args)
        self._parked.append((job, step, args))

    def _handed_over(self) -> None:
        """`Permits.on_handoff` (any thread): a permit given back goes to a parked job."""
        if not self._closed:  # after close() nothing runs on the network thread
            self.loop.call_soon(self._unpark)

    def _unpark(self) -> None:
        """A permit was handed over (`Permits.on_handoff`): the oldest parked job goes on with it."""
        job, step, args = self._parked.popleft()
        job.permit = True
        self._step(job, step, *args)

    def _resume(self, job: _Job, key: tuple[str, int]) -> None:
        """The job's turn at its host has come (it holds the slot)."""
        self._with_permit(job, self._take_slot, key)

    def _retry(self, job: _Job) -> None:
        self._start_attempt(job)

    def _finish(self, job: _Job, result: FetchResult) -> None:
        if job.done:
            return
        job.done = True
        self._with_permit(job, self._deliver, result)  # the caller gives it back

    def _deliver(self, job: _Job, result: FetchResult) -> None:
        job.on_done(result)

    def _new_exchange(self) -> Exchange:
        exchange = Exchange(
            user_agent=self.user_agent,
            max_response_bytes=self.max_response_bytes,
            ca_file=self.ca_file,
            reuse_check=self.reuse_check,
            reuse_connections=self.reuse_connections,
        )
        exchange.handle.exchange = exchange
        return exchange
