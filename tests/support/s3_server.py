"""An S3-compatible server on 127.0.0.1 for tests: moto's server mode in a background thread.

    from tests.support.s3_server import S3TestServer

    with S3TestServer() as s3:
        s3.create_bucket("data")
        fs = s3.filesystem()                      # an s3fs.S3FileSystem talking to it
        options = s3.storage_options()            # for fsspec / data.storage_options
        s3.endpoint_url                           # http://127.0.0.1:<port>
        s3.env()                                  # AWS_* variables for code that reads the env

The credentials are fake (moto accepts any). Each server is a fresh, empty store. Nothing here
reaches beyond 127.0.0.1.

As a pytest fixture:

    @pytest.fixture
    def s3():
        with S3TestServer() as server:
            yield server
"""
from __future__ import annotations

from typing import Any, Optional

ACCESS_KEY = "clipray-test-key"
SECRET_KEY = "clipray-test-secret"
REGION = "us-east-1"


class S3TestServer:
    def __init__(self) -> None:
        self._server: Optional[Any] = None
        self.endpoint_url = ""

    def start(self) -> "S3TestServer":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "S3TestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- how clients reach it
    @property
    def credentials(self) -> dict[str, str]:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY}

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options: fake credentials and the loopback endpoint."""
        # No region_name here: s3fs would send it as a LocationConstraint when creating buckets,
        # which S3 (and moto) refuse for us-east-1.
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def env(self) -> dict[str, str]:
        """Environment variables for code that configures S3 from the environment (boto3, pyarrow)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint_url,
                "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True, use_listings_cache=False)

    def pyarrow_filesystem(self):
        """A `pyarrow.fs.S3FileSystem` (what Ray Data's readers use) pointed at this server."""
        from pyarrow import fs as pafs

        host = self.endpoint_url.split("://", 1)[1]
        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=host,
                                 scheme="http", region=REGION)

    def create_bucket(self, name: str) -> str:
        """Create a bucket; returns `s3://name`."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"
