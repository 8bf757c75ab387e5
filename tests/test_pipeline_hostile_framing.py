"""Hostile hosts through `run_pipeline`: responses framed wrongly on purpose, headers past any sane
size, interim-response floods and content encodings (issue 15 §1 and §4).

Every row must end accepted with its own URL's image or rejected with a stable reason; nothing is
lost and nothing escapes as `internal_error` (`run_cases` checks all of that for every row, and
decodes every stored image). Each case says which outcomes are right for it.
"""

from __future__ import annotations

import zlib

import pytest

from tests.support.hostile_server import (
    Close,
    HostileServer,
    Repeat,
    Reset,
    Send,
    chunked,
    gzip_bomb,
    gzip_bytes,
    response,
)
from tests.support.url_images import ACCEPTED, case, run_cases, url_image

pytestmark = pytest.mark.slow

CHUNKED = [("Transfer-Encoding", "chunked")]
MIB = 1 << 20
CAP = 8 * MIB  # data.max_response_bytes in these runs (run_cases' default)


@pytest.fixture
def host():
    with HostileServer(host="127.0.0.2") as server:
        yield server


def head(status: int = 200, headers=(), **kw) -> bytes:
    """A response head without a body of its own (the script sends the body)."""
    return response(status, b"", headers, content_type="image/png", **kw)


def test_malformed_framing_ends_each_row_accepted_or_with_a_stable_reason(ray_local, host, tmp_path):
    well_behaved = host.url("/well-behaved")
    host.add("/well-behaved", lambda url: response(200, url_image(url)))
    cases = [case("well-behaved", well_behaved, ACCEPTED)]

    def add(name: str, build, *allowed: str) -> None:
        cases.append(case(name, host.add(f"/{name}", build), *allowed))

    # A negative chunk size, then 4x the cap in chunks: bypassing the cap this way stored a
    # 256 MiB body under a 32 MiB cap (issue 15 §1).
    add(
        "negative-chunk-size",
        lambda url: [
            Send(head(headers=CHUNKED, content_length=None) + b"-ffffffff\r\n\r\n" + chunked(url_image(url))[:-5]),
            Repeat(b"100000\r\n" + bytes(MIB) + b"\r\n", 4 * CAP // MIB),
            Send(b"0\r\n\r\n"),
        ],
        "http_error",
        "response_too_large",
    )
    # "²" passes str.isdigit() and then fails int(): as one Latin-1 byte and as UTF-8.
    for name, value in (("latin-1", b"\xb2"), ("utf-8", "\u00b2".encode())):
        add(
            f"content-length-superscript-two-{name}",
            lambda url, value=value: [
                Send(response(200, url_image(url), [("Content-Length", value)], content_length=None)),
                Close(),
            ],
            ACCEPTED,
            "http_error",
        )
    add(
        "content-length-negative",
        lambda url: [Send(response(200, url_image(url), content_length="-1")), Close()],
        ACCEPTED,
        "http_error",
    )
    add(
        "content-length-conflicting",
        lambda url: [
            Send(response(200, url_image(url), [("Content-Length", str(len(url_image(url)) + 100))])),
            Close(),
        ],
        ACCEPTED,
        "http_error",
        "connection_error",
    )
    add(
        "location-unclosed-bracket",
        lambda url: response(302, b"", [("Location", "http://[")]),
        "bad_redirect",
        "invalid_url",
    )
    # Read as chunked, this body is another row's image: a client that dechunks an unknown
    # transfer coding stores it under this row (the identity check catches it).
    add(
        "transfer-encoding-notchunked",
        lambda url: [
            Send(head(headers=[("Transfer-Encoding", "notchunked")], content_length=None)),
            Send(chunked(url_image(well_behaved))),
            Close(),
        ],
        "http_error",
        "not_an_image",
    )
    add("status-code-four-digits", lambda url: [Send(response(2000, url_image(url))), Close()], "http_error")
    add(
        "status-line-garbage",
        lambda url: [Send(b"\x16\x03\x01\x02\x00 not http\r\n\r\n" + url_image(url)), Close()],
        "http_error",
    )
    add(
        "early-hints-first",
        lambda url: b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + response(200, url_image(url)),
        ACCEPTED,
    )
    add("body-until-close", lambda url: [Send(response(200, url_image(url), content_length=None)), Close()], ACCEPTED)
    add(
        "body-shorter-than-content-length",
        lambda url: [Send(response(200, url_image(url), content_length=str(len(url_image(url)) + 1000))), Close()],
        "connection_error",
        "http_error",
    )
    add(
        "reset-inside-the-body",
        lambda url: [Send(response(200, url_image(url, "JPEG"))[:-500]), Reset()],
        "connection_error",
    )

    run = run_cases(tmp_path, cases)
    assert not run.problems, run.report()


def test_header_floods_past_a_size_cap_are_rejected(ray_local, host, tmp_path):
    filler = "a" * 1000
    cases = [
        case(
            "a-thousand-1kib-headers",
            host.add(
                "/many-headers",
                lambda url: response(200, url_image(url), [(f"X-Filler-{i}", filler) for i in range(1024)]),
            ),
            "http_error",
            "response_too_large",
        ),
        case(
            "one-1mib-header-line",
            host.add("/long-header", lambda url: response(200, url_image(url), [("X-Filler", "a" * MIB)])),
            "http_error",
            "response_too_large",
        ),
        case(
            "a-thousand-100-continues-first",
            host.add("/continues", lambda url: b"HTTP/1.1 100 Continue\r\n\r\n" * 1000 + response(200, url_image(url))),
            ACCEPTED,
            "http_error",
        ),
        case("control", host.add("/control", lambda url: response(200, url_image(url))), ACCEPTED),
    ]
    run = run_cases(tmp_path, cases)
    assert not run.problems, run.report()


def test_content_encodings_are_decoded_and_capped_after_decoding(ray_local, host, tmp_path):
    """gzip and deflate bodies are images once decoded; a small body that inflates past
    data.max_response_bytes is cut off at the cap (`response_too_large`), never stored."""
    gzip_header = [("Content-Encoding", "gzip")]
    bomb = gzip_bomb(8 * CAP // MIB)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < CAP // 16
    cases = [
        case(
            "gzip",
            host.add(
                "/gzip", lambda url: response(200, gzip_bytes(url_image(url)), gzip_header, content_type="image/png")
            ),
            ACCEPTED,
        ),
        case(
            "deflate",
            host.add(
                "/deflate",
                lambda url: response(
                    200, zlib.compress(url_image(url)), [("Content-Encoding", "deflate")], content_type="image/png"
                ),
            ),
            ACCEPTED,
        ),
        case(
            "gzip-chunked",
            host.add(
                "/gzip-chunked",
                lambda url: (
                    head(headers=gzip_header + CHUNKED, content_length=None)
                    + chunked(gzip_bytes(url_image(url)), size=100)
                ),
            ),
            ACCEPTED,
        ),
        case(
            "identity-named",
            host.add("/identity", lambda url: response(200, url_image(url), [("Content-Encoding", "identity")])),
            ACCEPTED,
        ),
        case(
            "gzip-bomb",
            host.add("/bomb", lambda url: response(200, bomb, gzip_header, content_type="image/png")),
            "response_too_large",
        ),
        case(
            "gzip-bomb-chunked",
            host.add(
                "/bomb-chunked", lambda url: head(headers=gzip_header + CHUNKED, content_length=None) + chunked(bomb)
            ),
            "response_too_large",
        ),
        case(
            "gzip-that-is-not",
            host.add("/not-gzip", lambda url: response(200, url_image(url), gzip_header)),
            "http_error",
            ACCEPTED,
        ),
    ]
    run = run_cases(tmp_path, cases)
    assert not run.problems, run.report()
