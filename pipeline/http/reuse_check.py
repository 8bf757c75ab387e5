"""Refuse to reuse a kept-alive connection that has bytes waiting before our request is sent.

An HTTP/1.1 connection between two responses must be silent. A server that sends more than its
Content-Length, or a body after a 204/304, leaves bytes on it; sent on that connection, the next
URL's request would read them as its own response, and the pipeline would store one URL's image
under another's row. libcurl drops a connection with waiting input when it checks it, but skips that
check for connections used within the last second; this check runs for every reuse.

libcurl tells us each new connection's socket (SOCKOPTFUNCTION: its own descriptor) and, before
each request, the connection's local address (PREREQFUNCTION). A connection seen before is a reused
one: `poll` on its socket (no wait) says whether anything arrived since its last response: data (a
desynchronising server) or the peer's close. Then the request is not sent (the transfer stops) and
the fetcher sends it again on a fresh connection. Descriptors are looked up by local address only
after the new sockets were learnt, and a descriptor number that comes back for a new socket drops
its old entry, so a closed connection's number is never taken for another's. All on the network
thread.
"""

from __future__ import annotations

import select
import socket

import pycurl

_WAITING = select.POLLIN | select.POLLPRI | select.POLLRDHUP | select.POLLHUP | select.POLLERR


class ReuseCheck:
    """The sockets libcurl opened, by descriptor and by local address."""

    def __init__(self) -> None:
        self._new: set[int] = set()  # opened, local address not looked up yet
        self._by_local: dict[tuple[str, int], int] = {}
        self._local_of: dict[int, tuple[str, int]] = {}
        self._fresh: set[int] = set()  # learnt, not yet used for a request
        self._poll = select.poll()

    def configure(self, handle: pycurl.Curl) -> None:
        handle.setopt(pycurl.SOCKOPTFUNCTION, self._opened)

    def _opened(self, fd: int, purpose: int) -> int:
        old = self._local_of.pop(fd, None)  # the number of a closed socket, now a new one
        if old is not None and self._by_local.get(old) == fd:
            del self._by_local[old]
        self._fresh.discard(fd)
        self._new.add(fd)
        return pycurl.SOCKOPT_OK

    def reusable(self, local_ip: str, local_port: int) -> bool:
        """False when the connection with this local address is a reused one with input waiting."""
        if self._new:
            self._learn()
        key = (local_ip, local_port)
        fd = self._by_local.get(key)
        if fd is None or fd in self._fresh:  # a new connection: nothing can be stale on it yet
            self._fresh.discard(fd)
            return True
        self._poll.register(fd, _WAITING)
        try:
            return not self._poll.poll(0)
        finally:
            self._poll.unregister(fd)

    def _learn(self) -> None:
        for fd in list(self._new):
            sock = socket.socket(fileno=fd)
            try:
                local = sock.getsockname()[:2]
            except OSError:  # closed already
                self._new.discard(fd)
                continue
            finally:
                sock.detach()  # the descriptor stays libcurl's
            if not local[1]:
                continue  # not connecting yet
            self._new.discard(fd)
            self._by_local[local] = fd
            self._local_of[fd] = local
            self._fresh.add(fd)
