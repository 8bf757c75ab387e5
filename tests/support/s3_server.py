"""An S3-compatible server on 127.0.0.1 for tests: moto's server mode in a background thread.

    from tests.support.s3_server import S3TestServer

    with S3TestServer() as s3:
        s3.create_bucket("data")
        fs = s3.filesystem()                      # an s3fs.S3FileSystem talking to it
        options = s3.storage_options()            # for fsspec / data.storage_options
        s3.endpoint_url                           # http://127.0.0.1:<port>
        s3.env()                                  # AWS_* variables for code that reads the env

The credentials are fake (moto accepts any) until `enable_auth()`: from then on moto checks every
request's signature against the IAM users and assumed roles it knows (`AuthenticatedS3`), so a test
can prove which credentials a client really sent. Each server is a fresh, empty store. Nothing here
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
        set_moto_auth(self.endpoint_url, enabled=False)  # a fresh server takes any credentials
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
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True, use_listings_cache=False)

    def pyarrow_filesystem(self):
        """A `pyarrow.fs.S3FileSystem` (what Ray Data's readers use) pointed at this server."""
        from pyarrow import fs as pafs

        host = self.endpoint_url.split("://", 1)[1]
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=host, scheme="http", region=REGION
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket; returns `s3://name`."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"


class AuthenticatedS3:
    """Real credentials on a moto server: an IAM user allowed everything, a role it may assume, and
    moto's request authentication switched on (after which wrong or missing credentials, or a
    temporary key without its session token, are refused with 403).

        with S3TestServer() as server:
            auth = AuthenticatedS3(server, buckets=["data"])
            auth.user_key, auth.user_secret             # long-term credentials (AKIA...)
            auth.session()                              # temporary ones: key, secret, token (ASIA...)
            auth.role_arn                               # for web-identity (IRSA-style) tests
    """

    def __init__(self, server: S3TestServer, buckets: tuple[str, ...] = ("data",), enable: bool = True):
        import json
        import uuid

        import boto3

        self.server = server
        self.disable()  # moto's switch is process-wide, as are its IAM users: names are unique per instance
        suffix = uuid.uuid4().hex[:8]
        admin = dict(
            endpoint_url=server.endpoint_url,
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
            region_name=REGION,
        )
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        allow_all = json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        )
        policy = iam.create_policy(PolicyName=f"allow-all-{suffix}", PolicyDocument=allow_all)["Policy"]["Arn"]
        user = f"clipray-{suffix}"
        iam.create_user(UserName=user)
        iam.attach_user_policy(UserName=user, PolicyArn=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self.user_key, self.user_secret = key["AccessKeyId"], key["SecretAccessKey"]
        trust = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"},
                    {"Effect": "Allow", "Principal": {"Federated": "*"}, "Action": "sts:AssumeRoleWithWebIdentity"},
                ],
            }
        )
        role = iam.create_role(RoleName=f"clipray-role-{suffix}", AssumeRolePolicyDocument=trust)["Role"]
        iam.attach_role_policy(RoleName=role["RoleName"], PolicyArn=policy)
        self.role_arn = role["Arn"]
        if enable:
            self.enable()

    def enable(self) -> None:
        """Authenticate every request from now on (in every moto server of this process). moto
        cannot serve STS's unsigned AssumeRoleWithWebIdentity then: exchange tokens before."""
        set_moto_auth(self.server.endpoint_url, enabled=True)

    def disable(self) -> None:
        set_moto_auth(self.server.endpoint_url, enabled=False)

    def session(self) -> dict[str, str]:
        """Fresh temporary credentials of the role: {"key", "secret", "token"}."""
        import boto3

        sts = boto3.client(
            "sts",
            endpoint_url=self.server.endpoint_url,
            aws_access_key_id=self.user_key,
            aws_secret_access_key=self.user_secret,
            region_name=REGION,
        )
        creds = sts.assume_role(RoleArn=self.role_arn, RoleSessionName="clipray-test")["Credentials"]
        return {"key": creds["AccessKeyId"], "secret": creds["SecretAccessKey"], "token": creds["SessionToken"]}


def set_moto_auth(endpoint_url: str, enabled: bool) -> None:
    """Switch moto's request authentication on or off. The switch is process-wide (every moto
    server in this process), so whoever turns it on turns it off again."""
    import urllib.request

    request = urllib.request.Request(
        f"{endpoint_url}/moto-api/reset-auth",
        data=b"0" if enabled else b"inf",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=10).read()
