"""`storage.redact`: what counts as a secret and how each kind is masked."""

from __future__ import annotations

import pytest

from storage.redact import MASK, looks_secret, redact_config, redact_text, redact_url, redact_userinfo


@pytest.mark.parametrize(
    "name",
    [
        "key",
        "secret",
        "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY",
        "session_token",
        "password",
        "passwd",
        "sas_token",
        "credentials",
        "private_key_id",
        "AccountKey",
        "Authorization",
        "X-Amz-Signature",
        "sig",
    ],
)
def test_names_that_look_secret(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["anon", "requester_pays", "endpoint_url", "region_name", "use_ssl", "version_aware"])
def test_ordinary_option_names_do_not_look_secret(name):
    assert not looks_secret(name)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://user:hunter2@images.example/a.jpg", "http://***@images.example/a.jpg"),
        ("https://token@images.example:8443/a.jpg?x=1", "https://***@images.example:8443/a.jpg?x=1"),
        ("s3://AKIAKEY:s3cr3t@bucket/list.parquet", "s3://***@bucket/list.parquet"),
        ("http://a@b:p@ss@host/x", "http://***@host/x"),  # up to the last '@' of the authority
        ("http://host/path/user@example.com.jpg", "http://host/path/user@example.com.jpg"),  # '@' in the path
        ("http://images.example/a.jpg", "http://images.example/a.jpg"),
    ],
)
def test_userinfo_is_masked_and_nothing_else(url, expected):
    assert redact_userinfo(url) == expected


def test_redact_url_masks_secret_query_values_and_keeps_the_others():
    url = (
        "https://bucket.s3.amazonaws.com/list.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20240101&X-Amz-Signature=abcdef0123&X-Amz-Expires=3600"
    )
    assert redact_url(url) == (
        "https://bucket.s3.amazonaws.com/list.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={MASK}&X-Amz-Signature={MASK}&X-Amz-Expires=3600"
    )
    assert redact_url("https://acct.blob.core.windows.net/c/l.csv?sv=2022&sig=SIGVALUE&se=x") == (
        f"https://acct.blob.core.windows.net/c/l.csv?sv=2022&sig={MASK}&se=x"
    )
    assert redact_url("http://u:p@h/a?token=T&page=2#frag") == f"http://***@h/a?token={MASK}&page=2#frag"


def test_text_loses_every_credential_it_carries():
    text = (
        "http://bob:pw1@img.example/a.jpg: HTTP 404 Not Found; redirected to "
        "'https://cdn.example/b.jpg?api_key=K123&size=2'; header Authorization: Bearer tok.en-123 "
        'and {"authorization": "Basic dXNlcjpwdw=="} then bearer abc/def=='
    )
    redacted = redact_text(text)
    for secret in ("bob", "pw1", "K123", "tok.en-123", "dXNlcjpwdw==", "abc/def"):
        assert secret not in redacted
    assert "img.example/a.jpg: HTTP 404 Not Found" in redacted
    assert "size=2" in redacted
    assert "Authorization: Bearer ***" in redacted


def test_config_masks_secret_keys_only_under_storage_options_and_headers():
    dumped = {
        "allow_private_addresses": True,  # 'private' outside storage_options is an ordinary key
        "user_agent_token": "clipray",
        "input": "https://u:p@lists.example/l.parquet",
        "storage_options": {
            "anon": False,
            "key": "AKIA1",
            "secret": "S1",
            "token": None,  # unset: shown as unset
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "T1"},
            "config_kwargs": {"headers": {"Authorization": "Bearer B1", "Accept": "image/*"}},
            "credentials": {"type": "service_account", "private_key": "PK"},
            "list": [{"password": "P1"}],
        },
    }
    out = redact_config(dumped)
    assert out["allow_private_addresses"] is True
    assert out["user_agent_token"] == "clipray"
    assert out["input"] == "https://***@lists.example/l.parquet"
    so = out["storage_options"]
    assert so["anon"] is False and so["token"] is None
    assert so["key"] == so["secret"] == so["credentials"] == MASK
    assert so["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": MASK}
    assert so["config_kwargs"]["headers"] == {"Authorization": MASK, "Accept": "image/*"}
    assert so["list"] == [{"password": MASK}]
    assert dumped["storage_options"]["key"] == "AKIA1", "the input is not modified"
