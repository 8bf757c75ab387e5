"""From a URI to a filesystem: fsspec (what our own reads and writes use) and pyarrow (what Ray
Train and the training ingest want), both configured from one `StorageConfig`.

A URI is a local path (relative or absolute, or `file://...`) or `protocol://...` (s3://, gs://,
memory://, ...). Local paths are made absolute (Ray workers do not share the driver's working
directory). Remote options apply to remote URIs only, so a local path never sees S3 settings.

S3 on pyarrow: pyarrow's S3 client reads credentials and the region from the standard AWS chain
itself, but not a configured endpoint (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` / the profile's
`services` section); that one is asked of botocore, which does honour them, so both stacks reach the
same server. Where the AWS chain names no region (the SDK then says us-east-1) and there is no custom
endpoint, the bucket's own region is looked up (pyarrow's `resolve_s3_region`) instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional
from urllib.parse import urlsplit

from storage.config import StorageConfig

log = logging.getLogger(__name__)

S3_PROTOCOLS = ("s3", "s3a")
# fsspec/s3fs option names that pyarrow's S3FileSystem understands, and what it calls them. Explicit
# values in a config are the user's choice; nothing is read from the environment here.
_S3FS_TO_PYARROW = {"key": "access_key", "secret": "secret_key", "token": "session_token", "anon": "anonymous"}
_S3FS_CLIENT_KWARGS = ("endpoint_url", "region_name")
_SDK_DEFAULT_REGION = "us-east-1"  # what the AWS SDK picks when nothing names a region


def protocol_of(uri: str) -> str:
    """`s3://b/k` -> `s3`; a plain path or `file://...` -> `file`."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def absolute(uri: str) -> str:
    """Local paths as absolute paths (no `file://`); remote URIs unchanged (without a trailing '/')."""
    if is_local(uri):
        path = uri.split("://", 1)[1] if "://" in uri else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.rstrip("/")


def join(uri: str, *names: str) -> str:
    """`uri` with path parts appended with '/' (local paths too: we only run where '/' separates)."""
    out = uri.rstrip("/")
    for name in names:
        out = f"{out}/{name.strip('/')}"
    return out


def _config(config: Optional[StorageConfig]) -> StorageConfig:
    return config.storage() if config is not None else StorageConfig()


def fsspec_options(uri: str, config: Optional[StorageConfig] = None) -> dict[str, Any]:
    """fsspec keyword arguments for `uri`: `storage_options`, plus the S3 endpoint and region for
    s3:// URIs; {} for local paths."""
    if is_local(uri):
        return {}
    cfg = _config(config)
    options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.storage_options.items()}
    if protocol_of(uri) in S3_PROTOCOLS:
        client_kwargs = dict(options.get("client_kwargs") or {})
        if cfg.s3_endpoint_url:
            client_kwargs.setdefault("endpoint_url", cfg.s3_endpoint_url)
        if cfg.s3_region:
            client_kwargs.setdefault("region_name", cfg.s3_region)
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
    return options


def fsspec_filesystem(uri: str, config: Optional[StorageConfig] = None):
    """(fsspec filesystem, path inside it) for `uri`."""
    import fsspec

    target = absolute(uri)
    return fsspec.core.url_to_fs(target, **fsspec_options(target, config))


def open_file(uri: str, mode: str = "rb", config: Optional[StorageConfig] = None):
    """`fsspec.open(uri, mode)` with the options of `config`; use as a context manager."""
    import fsspec

    target = absolute(uri)
    return fsspec.open(target, mode, **fsspec_options(target, config))


def pyarrow_filesystem(uri: str, config: Optional[StorageConfig] = None):
    """(pyarrow filesystem, path inside it) for `uri`: native local and S3 filesystems; other
    protocols through fsspec (`PyFileSystem(FSSpecHandler(...))`)."""
    import pyarrow.fs as pafs

    target = absolute(uri)
    if is_local(target):
        return pafs.LocalFileSystem(), target
    protocol, rest = target.split("://", 1)
    if protocol.lower() in S3_PROTOCOLS:
        return _pyarrow_s3(rest.split("/", 1)[0], _config(config)), rest
    fs, path = fsspec_filesystem(target, config)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _pyarrow_s3(bucket: str, cfg: StorageConfig):
    import pyarrow.fs as pafs

    options = dict(cfg.storage_options)
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    kwargs: dict[str, Any] = {}
    for name, arrow_name in _S3FS_TO_PYARROW.items():
        if name in options:
            kwargs[arrow_name] = options.pop(name)
    ignored = sorted(options) + sorted(k for k in client_kwargs if k not in _S3FS_CLIENT_KWARGS)
    if ignored:
        log.warning(
            "storage_options %s apply to fsspec only; pyarrow's S3 filesystem (training data and run "
            "storage) ignores them",
            ", ".join(ignored),
        )
    endpoint = cfg.s3_endpoint_url or client_kwargs.get("endpoint_url") or configured_s3_endpoint()
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme)
    region = cfg.s3_region or client_kwargs.get("region_name")
    if region:
        kwargs["region"] = region
    fs = pafs.S3FileSystem(**kwargs)
    if not region and not endpoint and bucket and fs.region == _SDK_DEFAULT_REGION:
        # No region configured (or us-east-1): AWS itself, so ask where the bucket lives rather than
        # assume it (a request to a bucket in another region fails with a redirect).
        fs = pafs.S3FileSystem(**kwargs, region=pafs.resolve_s3_region(bucket))
    return fs


def configured_s3_endpoint() -> Optional[str]:
    """The S3 endpoint the AWS configuration names (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, a
    profile's `endpoint_url` / `services` section), as botocore resolves it; None for AWS itself.
    Costs ~0.5 s (botocore loads its S3 model), so callers build filesystems once."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    client = botocore.session.Session().create_client(
        "s3", region_name="us-east-1", config=Config(signature_version=UNSIGNED)
    )
    url = client.meta.endpoint_url
    host = (urlsplit(url).hostname or "").lower()
    if host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return None
    return url
