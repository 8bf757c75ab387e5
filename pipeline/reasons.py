"""Why a row was not kept: the stages and the stable reason codes written to `rejects/*.parquet`.

Codes are part of the output format (users count them, dashboards group by them): add new ones,
never rename one.
"""

from __future__ import annotations

# Stages, in the order a row meets them.
DOWNLOAD = "download"
DECODE = "decode"
FILTER = "filter"
DEDUP = "dedup"

STAGES = (DOWNLOAD, DECODE, FILTER, DEDUP)  # DESIGN.md's contract: no other stage

# code -> (stage, what it means). `http_<status>` codes (http_404, http_500, ...) and
# `column:<name>` codes (filter stage, `data.filters.columns`) are generated.
REASONS: dict[str, tuple[str, str]] = {
    # filter: rows the input itself makes unusable (checked before any download)
    "malformed_row": (
        FILTER,
        "the input line cannot be read as a row: wrong number of fields, bad CSV quoting, "
        "not a JSON object, or a URL that is not valid UTF-8 (the detail names file and line)",
    ),
    # download
    "invalid_url": (DOWNLOAD, "the URL cannot be parsed or has no host"),
    "unsupported_scheme": (DOWNLOAD, "not an http:// or https:// URL (file://, ftp://, data:, ...)"),
    "blocked_address": (
        DOWNLOAD,
        "the host is or resolves to a loopback/private/link-local/multicast/reserved address",
    ),
    "dns_error": (DOWNLOAD, "the host name does not resolve (after retries)"),
    "timeout": (DOWNLOAD, "no complete answer within data.timeout_s (after retries)"),
    "connection_error": (DOWNLOAD, "connection refused, reset or closed early (after retries)"),
    "tls_error": (DOWNLOAD, "the TLS handshake or certificate check failed"),
    "too_many_redirects": (DOWNLOAD, "more than data.max_redirects redirects"),
    "redirect_loop": (DOWNLOAD, "a redirect led back to a URL already visited"),
    "bad_redirect": (DOWNLOAD, "a redirect without a usable Location header (missing, or not a valid URL)"),
    "response_too_large": (
        DOWNLOAD,
        "the response is larger than data.max_response_bytes (announced, or counted after gzip/deflate decoding)",
    ),
    "optout": (DOWNLOAD, "an X-Robots-Tag header opts the image out (data.disallowed_header_directives)"),
    "http_error": (
        DOWNLOAD,
        "an HTTP protocol error: not HTTP, bad framing (chunk size, Content-Length, Transfer-Encoding, "
        "content encoding) or headers past libcurl's size cap",
    ),
    "outside_local_root": (DOWNLOAD, "a local path or file:// URL that is not under data.local_root"),
    "local_file_error": (DOWNLOAD, "a file under data.local_root that is missing, not a regular file or unreadable"),
    "hash_mismatch": (
        DOWNLOAD,
        "the downloaded bytes do not hash to the row's data.verify_hash.column value (or the row has none)",
    ),
    # decode
    "not_an_image": (DECODE, "the bytes are not an image format Pillow/OpenCV can read (HTML, text, ...)"),
    "truncated_image": (DECODE, "the image data ends early"),
    "decode_error": (DECODE, "the image could not be decoded or encoded"),
    "too_large": (
        DECODE,
        "more pixels than data.max_pixels, more decoded bytes than data.max_decoded_bytes (decompression bombs) "
        "or more than data.max_image_area",
    ),
    # decode (img2dataset's Resizer checks) and filter (data.filters) share these two
    "too_small": (FILTER, "the short side is below data.min_image_size / data.filters.min_image_side"),
    "aspect_ratio": (FILTER, "long side / short side is above data.filters.max_aspect_ratio"),
    # filter
    "caption_empty": (FILTER, "the caption is empty or only whitespace"),
    "caption_not_text": (FILTER, "the caption is missing, not a string, or not valid UTF-8"),
    "caption_too_short": (FILTER, "fewer characters than data.filters.min_caption_chars"),
    "caption_too_long": (FILTER, "more characters than data.filters.max_caption_chars"),
    "caption_too_few_words": (FILTER, "fewer words than data.filters.min_caption_words"),
    "caption_too_many_words": (FILTER, "more words than data.filters.max_caption_words"),
    "language": (FILTER, "the caption's detected language is not in data.filters.language.keep (or too unsure)"),
    "clip_score": (FILTER, "CLIP image-caption similarity below the threshold or outside the top fraction"),
    # dedup
    "duplicate": (
        DEDUP,
        "same image sha256 or same (url, caption) as a row with a smaller key "
        "(a (url, caption) duplicate is rejected before it is downloaded)",
    ),
    # any stage
    "internal_error": (DOWNLOAD, "a bug in the pipeline while handling this row (the detail has the traceback)"),
}


def http_reason(status: int) -> str:
    return f"http_{int(status)}"


def column_reason(column: str) -> str:
    """`column:<name>`: a `data.filters.columns` rule on input column <name> rejected the row (stage filter)."""
    return f"column:{column}"


def is_known(reason: str) -> bool:
    return (
        reason in REASONS
        or (reason.startswith("http_") and reason[5:].isdigit())
        or (reason.startswith("column:") and len(reason) > 7)
    )


class Rejection(tuple):
    """(stage, reason, detail) of one row that is not kept."""

    __slots__ = ()

    def __new__(cls, stage: str, reason: str, detail: str = "") -> "Rejection":
        return tuple.__new__(cls, (stage, reason, detail))

    stage = property(lambda self: self[0])
    reason = property(lambda self: self[1])
    detail = property(lambda self: self[2])
