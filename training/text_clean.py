"""CLIP's caption cleaning: `ftfy.fix_text`, HTML unescaped twice, whitespace collapsed, lower-cased.

    clean_text("  Caf\u00c3\u00a9 &amp;amp; CR\u00c8ME ") -> "café & crème"

`fix_text` is the ftfy-and-HTML part (before whitespace and case), `fix_batch` applies it to the
captions of a batch that need it. ftfy costs ~50-150 us a caption, so it is skipped where it
provably changes nothing:

- Plain ASCII (no '&', no control character but tab, newline, form feed and carriage return):
  ftfy's fixes (`ftfy.TextFixerConfig`) act on '&' (HTML entities), ESC (terminal escapes),
  ASCII control characters (`remove_control_chars`, its table `ftfy.chardata.CONTROL_CHARS`),
  '\\r' (`fix_line_breaks` makes it '\\n': whitespace either way, so the cleaned text is the
  same) and otherwise on non-ASCII characters only; `fix_encoding` returns ASCII text as it is
  and NFC does not change it. html.unescape needs '&'.
- Other text when `_ftfy_keeps` holds: see there. Mojibake, curly quotes, entities, ligatures,
  width forms, line breaks and control characters go through ftfy itself.

The tests hold both checks to ftfy: every ASCII character pair, random ASCII, and multilingual fuzz
sets with mojibake and entities.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Callable, Optional, Sequence

import ftfy
import numpy as np
import regex

# ASCII characters that ftfy or html.unescape may change: '&' (entities) and control characters
# other than tab, newline, form feed and carriage return (ftfy removes them).
_ASCII_NEEDS_FIXING = re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f]")
# The other ASCII characters, as bytes (bytes.translate deletes these; what is left flags a caption).
_PLAIN_ASCII_BYTES = bytes(c for c in range(128) if not _ASCII_NEEDS_FIXING.match(chr(c)))
_WHITESPACE_RE = regex.compile(r"\s+")
# ftfy's defaults and fixers when `_ftfy_keeps` was written (ftfy 6.3): its argument holds for these.
_FTFY_DEFAULTS = {
    "unescape_html": "auto",
    "remove_terminal_escapes": True,
    "fix_encoding": True,
    "restore_byte_a0": True,
    "replace_lossy_sequences": True,
    "decode_inconsistent_utf8": True,
    "fix_c1_controls": True,
    "fix_latin_ligatures": True,
    "fix_character_width": True,
    "uncurl_quotes": True,
    "fix_line_breaks": True,
    "fix_surrogates": True,
    "remove_control_chars": True,
    "normalization": "NFC",
    "max_decode_length": 1_000_000,
    "explain": True,
}
_FTFY_FIXERS = {
    "unescape_html",
    "remove_terminal_escapes",
    "restore_byte_a0",
    "replace_lossy_sequences",
    "decode_inconsistent_utf8",
    "fix_c1_controls",
    "fix_latin_ligatures",
    "fix_character_width",
    "uncurl_quotes",
    "fix_line_breaks",
    "fix_surrogates",
    "remove_control_chars",
}


def is_plain_ascii(text: str) -> bool:
    """True when ftfy and html.unescape leave `text` as it is up to whitespace (see the module doc)."""
    return text.isascii() and _ASCII_NEEDS_FIXING.search(text) is None


def _char_class(points: set[int]) -> re.Pattern:
    """A regex matching any one of the code points `points` (runs written as ranges)."""
    ranges, points_sorted = [], sorted(points)
    start = prev = points_sorted[0]
    for cp in points_sorted[1:] + [None]:
        if cp is not None and cp == prev + 1:
            prev = cp
            continue
        ranges.append(f"\\U{start:08x}-\\U{prev:08x}" if prev > start else f"\\U{start:08x}")
        if cp is not None:
            start = prev = cp
    return re.compile("[" + "".join(ranges) + "]")


def _build_ftfy_keeps() -> Optional[Callable[[str], bool]]:
    """A conservative test that `ftfy.fix_text(text) == text` and html.unescape changes nothing.

    ftfy cuts text into lines (and lines into pieces of `max_decode_length`) and runs rounds of
    fixes over each until a round changes nothing: HTML unescaping (needs '&'), mojibake repair
    (returns the text as it is unless `ftfy.badness.is_bad`), then C1 controls (U+0080-009F),
    ligatures, character width, curly quotes, line breaks ('\\r', U+0085, U+2028, U+2029),
    surrogates, terminal escapes (ESC), control characters, and NFC. A text of one line with none
    of the characters those fixes act on (from ftfy's public tables `ftfy.chardata.LIGATURES`,
    `WIDTH_MAP`, `CONTROL_CHARS` and its quote patterns), no '&', not `is_bad` and already NFC
    comes out of the first round unchanged, so ftfy returns it as it is.
    Returns None (ftfy is called for all such text) unless ftfy's defaults and fixer list are the
    ones above.
    """
    from ftfy import FIXERS, TextFixerConfig, chardata
    from ftfy.badness import is_bad

    if TextFixerConfig()._asdict() != _FTFY_DEFAULTS or set(FIXERS) != _FTFY_FIXERS:
        return None
    touched = set(range(0x80, 0xA0)) | set(range(0xD800, 0xE000))
    touched |= {ord(c) for c in "&\n\r\x1b\x85\u2028\u2029"}
    for table in (chardata.LIGATURES, chardata.WIDTH_MAP, chardata.CONTROL_CHARS):
        touched |= {k if isinstance(k, int) else ord(k) for k in table}
    touched_search = _char_class(touched).search
    single_quote, double_quote = chardata.SINGLE_QUOTE_RE.search, chardata.DOUBLE_QUOTE_RE.search
    max_length = _FTFY_DEFAULTS["max_decode_length"]

    def keeps(text: str) -> bool:
        return (
            len(text) <= max_length
            and touched_search(text) is None
            and single_quote(text) is None
            and double_quote(text) is None
            and unicodedata.is_normalized("NFC", text)
            and not is_bad(text)
        )

    return keeps


_ftfy_keeps = _build_ftfy_keeps()


def fix_text(text: str) -> str:
    """`html.unescape(html.unescape(ftfy.fix_text(text)))`: CLIP's cleaning before whitespace and
    case, with ftfy skipped where it provably changes nothing (see the module doc). Plain ASCII
    keeps its '\r' where ftfy would write '\n'; the cleaning makes both one space."""
    if is_plain_ascii(text) or (_ftfy_keeps is not None and _ftfy_keeps(text)):
        return text
    fixed = ftfy.fix_text(text)
    return html.unescape(html.unescape(fixed)) if "&" in fixed else fixed


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy, HTML unescape (twice), whitespace collapsed and stripped, lower-cased."""
    if is_plain_ascii(text):
        return " ".join(text.split()).lower()
    return _WHITESPACE_RE.sub(" ", fix_text(text).strip()).strip().lower()


def check_text(text, index: int) -> str:
    """`text` if it is a str, else a TypeError naming its position in the batch."""
    if not isinstance(text, str):
        raise TypeError(f"text #{index} is a {type(text).__name__}, not a str: {text!r:.80}")
    return text


def _positions(data: bytes, values: set[int]) -> list[int]:
    """Where the bytes `values` occur in data (one memchr scan per value: few values are expected)."""
    out = []
    for value in values:
        byte = bytes([value])
        pos = data.find(byte)
        while pos >= 0:
            out.append(pos)
            pos = data.find(byte, pos + 1)
    return out


def fix_batch(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """(`fix_text` of each text, the rows that are not plain ASCII, in order).

    Plain ASCII rows are returned as they are without a per-caption call: the batch is joined once
    and non-ASCII text, '&' and control characters are located with bytes.translate/find.
    Raises TypeError naming the first text that is not a str.
    """
    try:
        joined = "".join(texts)
    except TypeError:
        for i, t in enumerate(texts):
            check_text(t, i)
        raise
    rows = set() if joined.isascii() else {i for i, t in enumerate(texts) if not t.isascii()}
    data = joined.encode("ascii", "replace")  # one byte per character
    flagged = data.translate(None, _PLAIN_ASCII_BYTES)  # '&' and control characters
    if flagged:
        ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        rows.update(np.searchsorted(ends, _positions(data, set(flagged)), side="right").tolist())
    fixed = list(texts)
    rows_sorted = sorted(rows)
    for i in rows_sorted:
        fixed[i] = fix_text(texts[i])
    return fixed, rows_sorted
