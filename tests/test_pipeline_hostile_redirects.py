"""Hostile redirects through `run_pipeline`: loops within and across hosts, endless chains of new
URLs, chains at and past data.max_redirects, and Locations that lead nowhere (issue 15 §4).

A redirected row that is accepted must hold the image of its own (first) URL: the last hop serves
that image, and `run_cases` decodes every stored image.
"""

from __future__ import annotations

import pytest

from tests.support.hostile_server import HostileServer, redirect, response
from tests.support.url_images import ACCEPTED, Case, case, run_cases, url_image

pytestmark = pytest.mark.slow

MAX_REDIRECTS = 5


def chain(server: HostileServer, name: str, hops: int) -> Case:
    """/name-0 -> ... -> /name-{hops}, which serves /name-0's image."""
    first = server.url(f"/{name}-0")
    for i in range(hops):
        server.routes[f"/{name}-{i}"] = redirect(f"/{name}-{i + 1}", status=(301, 302, 303, 307, 308)[i % 5])
    server.routes[f"/{name}-{hops}"] = response(200, url_image(first))
    return case(name, first, ACCEPTED)


def test_redirect_loops_and_chains_end_accepted_or_with_their_reason(ray_local, tmp_path):
    with HostileServer(host="127.0.0.2") as a, HostileServer(host="127.0.0.3") as b:
        at_limit = chain(a, "chain-at-the-limit", MAX_REDIRECTS)
        past_limit = chain(a, "chain-past-the-limit", MAX_REDIRECTS + 1)

        def growing(exchange):  # /grow?n=1 -> /grow?n=2 -> ...: a new URL every hop, forever
            n = int(exchange.target.partition("?n=")[2] or 0)
            return redirect(f"/grow?n={n + 1}")

        a.routes["/grow"] = growing
        a.routes["/self"] = redirect("/self")
        a.routes["/ping"] = redirect(b.url("/pong"))
        b.routes["/pong"] = redirect(a.url("/ping"))
        relative = a.url("/dir/relative")
        a.routes["/dir/relative"] = redirect("../images/./target.png")
        a.routes["/images/target.png"] = response(200, url_image(relative))
        a.routes["/to-a-file"] = redirect("file:///etc/passwd")
        a.routes["/to-nothing"] = response(302, b"")
        a.routes["/to-blank"] = redirect("   ")
        cases = [
            at_limit,
            case(past_limit.name, past_limit.url, "too_many_redirects"),
            case("new-url-every-hop", a.url("/grow"), "too_many_redirects", "redirect_loop"),
            case("loop-to-itself", a.url("/self"), "redirect_loop", "too_many_redirects"),
            case("loop-across-hosts", a.url("/ping"), "redirect_loop", "too_many_redirects"),
            case("relative-location", relative, ACCEPTED),
            case("location-file-url", a.url("/to-a-file"), "unsupported_scheme", "bad_redirect"),
            case("redirect-without-location", a.url("/to-nothing"), "bad_redirect"),
            case("location-blank", a.url("/to-blank"), "bad_redirect", "redirect_loop", "too_many_redirects"),
        ]
        run = run_cases(tmp_path, cases, max_redirects=MAX_REDIRECTS)
        grow_hops = len(a.exchanges("/grow"))
    assert not run.problems, run.report()
    assert grow_hops <= MAX_REDIRECTS + 1, f"/grow was requested {grow_hops} times with data.max_redirects=5"
