"""One network thread per download actor: a libcurl multi handle driven by epoll.

libcurl does the HTTP work (connections and keep-alive, TLS, HTTP/1.1 framing, chunked and
gzip/deflate bodies, proxies). This module runs its multi interface with the socket API
(`curl_multi_socket_action`): libcurl says which sockets to watch (SOCKETFUNCTION) and when to be
called back (TIMERFUNCTION); one `select.epoll` waits on those sockets and on a wake-up eventfd, so
hundreds of transfers in flight cost one thread and no scan over idle sockets (`select()`, which
`CurlMulti.select` uses, also stops working past file descriptor 1023).

Everything that touches libcurl runs on the loop's thread. Other threads hand work in with
`call_soon(fn, *args)`; `call_at(when, fn, *args)` (loop thread only) runs a function at a
`time.monotonic()` instant (retry backoff, deadlines). A finished transfer calls the
`on_done(handle, errno, message)` given to `add` (errno 0: libcurl completed it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import pycurl

from pipeline.thread_names import name_os_thread

log = logging.getLogger(__name__)

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_WATCH = {pycurl.POLL_IN: _IN, pycurl.POLL_OUT: _OUT, pycurl.POLL_INOUT: _IN | _OUT}
_BUSY, _GATHER_S = 64, 0.002  # transfers under way from which events are gathered for 2 ms per pass


class Timer:
    """A pending `call_at`; `cancel()` (loop thread only) keeps it from running."""

    __slots__ = ("when", "fn", "args")

    def __init__(self, when: float, fn: Callable, args: tuple):
        self.when, self.fn, self.args = when, fn, args

    def cancel(self) -> None:
        self.fn = None


class CurlLoop:
    """A libcurl multi handle and the thread that drives it (started on first use)."""

    def __init__(self, name: str = "clipray-http", max_total_connections: int = 0):
        self.name = name
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._watch)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._set_curl_timer)
        if max_total_connections:
            self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, max_total_connections)
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._watched: dict[int, int] = {}  # fd -> epoll mask
        self._curl_due: Optional[float] = None  # when libcurl wants its timeout action
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._soon: deque = deque()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._closing = False
        self.active = 0  # transfers added and not finished

    # --- handing work in

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on the loop's thread, soon (thread-safe)."""
        if self._thread is None:
            self._start()
        idle = not self._soon  # otherwise a wake-up is already pending (the loop drains the deque)
        self._soon.append((fn, args))
        if idle:
            os.eventfd_write(self._wake_fd, 1)

    def call_at(self, when: float, fn: Callable, *args: Any) -> Timer:
        """Run fn(*args) on the loop's thread at monotonic time `when` (loop thread only)."""
        timer = Timer(when, fn, args)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def add(self, handle: pycurl.Curl, on_done: Callable[[pycurl.Curl, int, str], None]) -> None:
        """Start a configured easy handle (loop thread only)."""
        handle.on_done = on_done
        self.multi.add_handle(handle)
        self.active += 1

    def remove(self, handle: pycurl.Curl) -> None:
        """Stop a transfer before it finished (loop thread only); its on_done is not called."""
        self.multi.remove_handle(handle)
        self.active -= 1

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        """Stop the thread; transfers in flight are dropped without their on_done."""
        with self._start_lock:
            thread, self._closing = self._thread, True
        if thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            thread.join(timeout=10)
        else:
            self._release()

    # --- libcurl's callbacks (on the loop's thread, inside socket_action)

    def _watch(self, what: int, fd: int, multi, socketp) -> None:
        if what == pycurl.POLL_REMOVE:
            if self._watched.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except OSError:  # already closed by libcurl
                    pass
            return
        mask = _WATCH.get(what, _IN)
        if fd in self._watched:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._watched[fd] = mask

    def _set_curl_timer(self, timeout_ms: int) -> None:
        self._curl_due = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0

    # --- the loop

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                if self._closing:
                    raise RuntimeError(f"{self.name}: the HTTP loop was closed")
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        name_os_thread()
        try:
            while not self._closing:
                self._run_once()
        finally:
            self._release()

    def _run_once(self) -> None:
        if self.active >= _BUSY:
            # Hundreds of transfers, each waiting for a slow server: let their events gather for a
            # moment, so one pass handles several (the pass's fixed cost, and the GIL hand-offs to
            # the decoder threads, once per several events instead of once per event).
            time.sleep(_GATHER_S)
        now = time.monotonic()
        due = self._curl_due
        if self._timers and (due is None or self._timers[0][0] < due):
            due = self._timers[0][0]
        timeout = -1 if due is None else max(0.0, due - now)
        if self._soon:
            timeout = 0
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        multi = self.multi
        for fd, mask in events:
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            action = 0
            if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP):
                action |= pycurl.CSELECT_IN
            if mask & select.EPOLLOUT:
                action |= pycurl.CSELECT_OUT
            if mask & select.EPOLLERR:
                action |= pycurl.CSELECT_ERR
            multi.socket_action(fd, action)
        now = time.monotonic()
        if self._curl_due is not None and self._curl_due <= now:
            self._curl_due = None
            multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._finish_transfers()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if timer.fn is not None:
                self._call(timer.fn, timer.args)
        for _ in range(len(self._soon)):
            fn, args = self._soon.popleft()
            self._call(fn, args)
        self._finish_transfers()

    def _finish_transfers(self) -> None:
        multi = self.multi
        while True:
            queued, ok, failed = multi.info_read()
            for handle in ok:
                self._done(handle, 0, "")
            for handle, errno, message in failed:
                self._done(handle, errno, message)
            if not queued:
                return

    def _done(self, handle: pycurl.Curl, errno: int, message: str) -> None:
        self.multi.remove_handle(handle)
        self.active -= 1
        self._call(handle.on_done, (handle, errno, message))

    def _call(self, fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the loop serves every transfer; the caller's code reports its own errors
            log.exception("%s: a callback failed", self.name)

    def _release(self) -> None:
        try:
            self.multi.close()
        finally:
            self._epoll.close()
            os.close(self._wake_fd)
