"""S3 credentials, endpoint and region reach both storage stacks (fsspec/s3fs and pyarrow) from the
standard AWS provider chain only, checked against a loopback S3 server that authenticates requests
(moto with IAM/STS auth on: a wrong key, a temporary key without its token, an unknown profile are
refused with 403, so a passing read proves which credentials were sent)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from storage import Folder, StorageConfig, pyarrow_filesystem
from tests.support.s3_server import AuthenticatedS3, S3TestServer

AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@pytest.fixture(scope="module")
def server():
    with S3TestServer() as s3:
        yield s3, AuthenticatedS3(s3, buckets=("data",), enable=False)


@pytest.fixture
def authenticated(server):
    """The module's server with moto's authentication on for one test. The switch is process-wide,
    so it is turned off again after the test: other tests' servers take any credentials."""
    s3, auth = server
    auth.enable()
    yield s3, auth
    auth.disable()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """A clean AWS environment: no variables, no config files, no instance metadata lookups
    (169.254.169.254 is not loopback), and no cached s3fs clients from another test."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _forget_clients()
    yield monkeypatch
    _forget_clients()


def _forget_clients() -> None:
    """s3fs caches one filesystem (with its resolved credentials) per set of options."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _round_trip(uri: str, config: StorageConfig) -> None:
    """Write with fsspec (Folder), read back with pyarrow: both stacks authenticated."""
    payload = f"clipray {uri}".encode()
    Folder(uri, config).write_bytes("probe.txt", payload)
    fs, path = pyarrow_filesystem(f"{uri}/probe.txt", config)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == payload


def _refused(uri: str, config: StorageConfig) -> None:
    _forget_clients()
    with pytest.raises(Exception, match="(?i)forbidden|denied|403|invalid|does not exist in our records|signature"):
        Folder(uri, config).write_bytes("refused.txt", b"x")
    fs, path = pyarrow_filesystem(f"{uri}/probe.txt", config)
    with pytest.raises(OSError, match="(?i)forbidden|denied|403|invalid|does not exist in our records|signature"):
        with fs.open_input_stream(path) as fh:
            fh.read()


def test_temporary_credentials_with_session_token_from_the_environment(authenticated, aws_env):
    s3, auth = authenticated
    creds = auth.session()
    assert creds["key"].startswith("ASIA")
    aws_env.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)  # the standard variable, read by the libraries
    aws_env.setenv("AWS_ACCESS_KEY_ID", creds["key"])
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", creds["secret"])
    aws_env.setenv("AWS_SESSION_TOKEN", creds["token"])
    _round_trip("s3://data/session", StorageConfig())
    # The same temporary key without its token is refused: the token is what authenticated above.
    aws_env.delenv("AWS_SESSION_TOKEN")
    _refused("s3://data/session", StorageConfig())


def _in_fresh_process(env: dict[str, str], code: str) -> str:
    """Run `code` in a new Python with exactly the AWS variables of `env`: pyarrow's AWS SDK reads
    the shared config files once per process, as a real run does at start-up."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    clean.update(env, AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


PROFILE_PROBE = """
from storage import Folder, StorageConfig, pyarrow_filesystem
Folder("s3://data/profile").write_bytes("probe.txt", b"profile")
fs, path = pyarrow_filesystem("s3://data/profile/probe.txt", StorageConfig())
with fs.open_input_stream(path) as fh:
    assert fh.read() == b"profile"
print(fs.region)
"""


def test_profile_from_the_shared_config_files_gives_credentials_region_and_endpoint(authenticated, tmp_path):
    s3, auth = authenticated
    (tmp_path / "credentials").write_text(
        f"[clipray]\naws_access_key_id = {auth.user_key}\naws_secret_access_key = {auth.user_secret}\n"
        f"[wrong]\naws_access_key_id = {auth.user_key}\naws_secret_access_key = not-the-secret\n"
    )
    (tmp_path / "config").write_text(
        f"[profile clipray]\nregion = eu-west-3\nendpoint_url = {s3.endpoint_url}\n"
        f"[profile wrong]\nregion = eu-west-3\nendpoint_url = {s3.endpoint_url}\n"
    )
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_CONFIG_FILE": str(tmp_path / "config")}
    assert _in_fresh_process({**env, "AWS_PROFILE": "clipray"}, PROFILE_PROBE) == "eu-west-3"
    with pytest.raises(AssertionError, match="(?i)forbidden|denied|403|does not exist|signature"):
        _in_fresh_process({**env, "AWS_PROFILE": "wrong"}, PROFILE_PROBE)


def test_web_identity_token_file_as_on_eks_irsa(aws_env, tmp_path):
    """IRSA: a projected token file and a role ARN, exchanged by botocore at STS (the loopback
    server, named by the standard AWS_ENDPOINT_URL) for the role's temporary credentials; from then
    on the server authenticates every request, so the reads below prove those credentials are used.
    (moto cannot answer the unsigned STS call with authentication on, hence the order. pyarrow's
    own STS client would call AWS's real STS, off limits here: only fsspec is checked this way.)"""
    with S3TestServer() as s3:
        auth = AuthenticatedS3(s3, buckets=("irsa",), enable=False)
        token = tmp_path / "token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Y2xpcHJheSJ9.c2ln")
        aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
        aws_env.setenv("AWS_ROLE_ARN", auth.role_arn)
        aws_env.setenv("AWS_ROLE_SESSION_NAME", "clipray-irsa")
        aws_env.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
        folder = Folder("s3://irsa/run", StorageConfig(s3_region="us-east-1"))
        folder.write_bytes("probe.txt", b"irsa")  # the STS exchange happens here
        auth.enable()
        folder.write_bytes("after.txt", b"authenticated")
        assert folder.read_bytes("after.txt") == b"authenticated"
        _forget_clients()
        aws_env.delenv("AWS_WEB_IDENTITY_TOKEN_FILE")
        aws_env.delenv("AWS_ROLE_ARN")
        from botocore.exceptions import NoCredentialsError

        try:
            with pytest.raises((PermissionError, NoCredentialsError, OSError)):  # no credentials at all
                Folder("s3://irsa/run", StorageConfig(s3_region="us-east-1")).write_bytes("x.txt", b"x")
        finally:
            auth.disable()


def test_explicit_credentials_in_storage_options_reach_both_stacks(authenticated, aws_env):
    s3, auth = authenticated
    creds = auth.session()
    config = StorageConfig(
        s3_endpoint_url=s3.endpoint_url,
        storage_options={"key": creds["key"], "secret": creds["secret"], "token": creds["token"]},
    )
    _round_trip("s3://data/explicit", config)
    _refused(
        "s3://data/explicit",
        config.model_copy(update={"storage_options": {"key": creds["key"], "secret": creds["secret"]}}),
    )


def test_region_comes_from_the_config_then_the_aws_chain_then_the_bucket(aws_env, monkeypatch):
    import pyarrow.fs as pafs

    asked = []
    monkeypatch.setattr(pafs, "resolve_s3_region", lambda bucket: asked.append(bucket) or "ap-southeast-2")
    fs, _ = pyarrow_filesystem("s3://bucket/x", StorageConfig(s3_region="eu-central-1"))
    assert fs.region == "eu-central-1" and not asked
    aws_env.setenv("AWS_REGION", "sa-east-1")
    fs, _ = pyarrow_filesystem("s3://bucket/x", StorageConfig())
    assert fs.region == "sa-east-1" and not asked
    aws_env.delenv("AWS_REGION")
    # Nothing configured, AWS itself: the bucket's own region, not an assumed us-east-1.
    fs, _ = pyarrow_filesystem("s3://bucket/x", StorageConfig())
    assert fs.region == "ap-southeast-2" and asked == ["bucket"]
    # A custom endpoint (MinIO, ...) is never asked where the bucket lives.
    fs, _ = pyarrow_filesystem("s3://other/x", StorageConfig(s3_endpoint_url="http://127.0.0.1:9"))
    assert asked == ["bucket"]


def test_region_and_endpoint_of_the_config_reach_fsspec():
    from storage import fsspec_options

    options = fsspec_options(
        "s3://b/k",
        StorageConfig(s3_endpoint_url="http://127.0.0.1:9/", s3_region="eu-west-1", storage_options={"anon": True}),
    )
    assert options == {
        "anon": True,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"},
    }
    assert fsspec_options("/local/path", StorageConfig(storage_options={"anon": True})) == {}


def test_no_code_reads_aws_variables_itself():
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"(environ|getenv)[^\n]{0,40}[\"']AWS_")
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for package in ("storage", "pipeline", "training", "evaluation", "clipray", "ray_compat")
        for path in sorted((root / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == [], "credentials, region and endpoint come from the AWS libraries' own chain"
