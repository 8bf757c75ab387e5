"""Secrets out of everything clipray writes or prints: config dumps, logs and messages.

One rule set, used by every stage (it lives at the bottom of the dependency order):

- A URL's userinfo is a credential: `https://user:pass@host/a.jpg` -> `https://***@host/a.jpg`
  (`redact_userinfo`). This is the only change made to a URL stored as data (the `url` column):
  userinfo never identifies an image, and the rest of the URL is what users join on.
- In text (logs, reject details, config strings) also the value of a query parameter whose name
  looks secret (`X-Amz-Signature`, `X-Amz-Credential`, `sig`, `token`, `api_key`, ...) and the
  credentials of `Authorization:` / `Bearer` text (`redact_text`).
- In a config dump (`redact_config`): under `storage_options` and `headers`, at any depth, the value
  of every key that looks secret; every string anywhere goes through `redact_text`.

A name "looks secret" when it contains, in any case, one of `SECRET_WORDS` (`key`, `secret`,
`token`, `password`, `passwd`, `sas`, `credential`, `private`, `auth`, `signature`) or is `sig`.
Substring matching redacts too much rather than too little: `AccountKey`, `sas_token`,
`client_secret`, `Authorization` and `aws_session_token` are all caught.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

MASK = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "sas", "credential", "private", "auth", "signature")
# Mappings of a config whose secret-looking keys are masked (fsspec options and HTTP headers).
SECRET_SCOPES = frozenset({"storage_options", "headers"})

# scheme://authority...: the span a URL occupies in free text (ends at whitespace or a quote).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# The userinfo of a URL's authority: everything up to the last '@' before the path.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#]+)=([^&;#]*)")
_AUTHORIZATION = re.compile(
    r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(basic|bearer|digest|token|negotiate|aws4-hmac-sha256)\s+)?[^\s\"',}]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/\-]+=*")


def looks_secret(name: str) -> bool:
    """True when a key or parameter name suggests its value is a credential."""
    lowered = name.lower()
    return lowered == "sig" or any(word in lowered for word in SECRET_WORDS)


def redact_userinfo(url: str) -> str:
    """`url` with its userinfo (`user:password@`) replaced by `***@`; any other string unchanged."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", url, count=1) if "@" in url else url


def _redact_query(url: str) -> str:
    def one(m: re.Match) -> str:
        name = urllib.parse.unquote_plus(m.group(2))
        return f"{m.group(1)}{m.group(2)}={MASK}" if looks_secret(name) and m.group(3) else m.group(0)

    head, sep, query = url.partition("?")
    return head + sep + _QUERY_PARAM.sub(one, "?" + query)[1:] if sep else url


def redact_url(url: str) -> str:
    """`url` without credentials: userinfo and the values of secret-looking query parameters."""
    return _redact_query(redact_userinfo(url))


def redact_text(text: str) -> str:
    """`text` (a message, a log line, a config value) with every credential in it masked: the
    URLs' userinfo and secret query values, and `Authorization:` / `Bearer` credentials."""
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    if "uthoriz" in text or "UTHORIZ" in text:
        text = _AUTHORIZATION.sub(lambda m: m.group(1) + (f"{m.group(2)} " if m.group(2) else "") + MASK, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return text


def _is_set(value: Any) -> bool:
    """A value worth masking: a non-empty string or container (a bool or a number is no credential,
    and an unset key shows that it is unset)."""
    return isinstance(value, (str, bytes, dict, list, tuple)) and len(value) > 0


def redact_config(value: Any, in_secret_scope: bool = False) -> Any:
    """A copy of a JSON-like config dump (dicts, lists, scalars) safe to write or print: see the
    module docstring for what is masked. `in_secret_scope`: `value` sits under `storage_options`
    or `headers` (set by the recursion)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if in_secret_scope and looks_secret(str(key)) and _is_set(item):
                out[key] = MASK
            else:
                out[key] = redact_config(item, in_secret_scope or key in SECRET_SCOPES)
        return out
    if isinstance(value, (list, tuple)):
        return [redact_config(item, in_secret_scope) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


__all__ = ["MASK", "SECRET_WORDS", "looks_secret", "redact_config", "redact_text", "redact_url", "redact_userinfo"]
