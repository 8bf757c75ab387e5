"""Secrets never leave the config: planted credentials of every kind appear in no file the pipeline
writes, in no log line or printed message, and not in `--print-config`."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from clipray.cli import main
from pipeline.config import DataConfig
from pipeline.resume import fingerprint, fingerprint_changes
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes

SECRETS = {
    "key": "AKIAPLANTEDKEY1",
    "secret": "PlantedSecret2",
    "session_token": "PlantedToken3",
    "sas_token": "PlantedSas4",
    "password": "PlantedPassword5",
    "credential": "PlantedCredential6",
    "private_key": "PlantedPrivate7",
    "authorization": "PlantedBearer8",
    "list_password": "ListPass9",
    "endpoint_password": "EndpointPass10",
}


def storage_options(prefix: str = "") -> dict:
    """Object-store options with a planted secret under every secret-looking kind of key (nested too)."""
    return {
        "anon": False,
        "key": prefix + SECRETS["key"],
        "secret": prefix + SECRETS["secret"],
        "client_kwargs": {"aws_session_token": prefix + SECRETS["session_token"]},
        "sas_token": prefix + SECRETS["sas_token"],
        "password": prefix + SECRETS["password"],
        "Credential": prefix + SECRETS["credential"],
        "gcs": {"private_key": prefix + SECRETS["private_key"]},
        "config_kwargs": {"headers": {"Authorization": "Bearer " + prefix + SECRETS["authorization"]}},
    }


def http_storage_options() -> dict:
    """Options fsspec's HTTP filesystem accepts (request headers) with the same planted secrets
    under secret-looking names: they are sent with every request for the URL list."""
    return {
        "headers": {
            "X-Api-Key": SECRETS["key"],
            "X-Client-Secret": SECRETS["secret"],
            "X-Session-Token": SECRETS["session_token"],
            "X-Sas": SECRETS["sas_token"],
            "X-Password": SECRETS["password"],
            "X-Credential": SECRETS["credential"],
        },
        "client_kwargs": {"headers": {"X-Private-Key": SECRETS["private_key"], "X-Auth": SECRETS["authorization"]}},
    }


def assert_no_secret(text: str, where: str) -> None:
    userinfo = base64.b64encode(f"listuser:{SECRETS['list_password']}".encode()).decode()
    for secret in [*SECRETS.values(), userinfo]:
        assert secret not in text, f"{secret!r} appears in {where}"


def every_written_text(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) as text; Parquet files as their rows' text."""
    texts = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            texts[str(path)] = str(table.drop_columns([c for c in ("jpg",) if c in table.column_names]).to_pylist())
        texts.setdefault(str(path), "")
        texts[str(path)] += path.read_bytes().decode("latin-1")
    return texts


@pytest.mark.slow
def test_planted_secrets_appear_in_no_written_file_log_or_message(ray_local, tmp_path, caplog, capsys):
    image = jpeg_bytes(64, 48, seed=1)
    with HTTPTestServer({"/a.jpg": image, "/b.jpg": jpeg_bytes(50, 40, seed=2), "/gone.jpg": Route(status=404)}) as s:
        rows = [s.url("/a.jpg"), s.url("/b.jpg"), s.url("/gone.jpg"), "ftp://127.0.0.1/c.jpg"]
        s.add("/list.tsv", ("url\tcaption\n" + "".join(f"{u}\tcaption {i}\n" for i, u in enumerate(rows))).encode())
        input_url = f"http://listuser:{SECRETS['list_password']}@127.0.0.1:{s.port}/list.tsv"
        data = DataConfig(
            input=input_url,
            output=str(tmp_path / "out"),
            storage_options=http_storage_options(),
            s3_endpoint_url=f"http://s3user:{SECRETS['endpoint_password']}@127.0.0.1:9",
            allow_private_addresses=True,
            rows_per_shard=2,
            num_download_actors=1,
            threads_per_actor=2,
            image_size=32,
            retries=0,
            progress=True,
        )
        from pipeline.run import run_pipeline

        with caplog.at_level(logging.INFO):  # (fsspec's http logs each URL, userinfo too, at DEBUG)
            manifest = run_pipeline(data)
        # the credentials were used where they are needed: the list came with basic auth and the headers
        list_requests = [r for r in s.requests if r.path == "/list.tsv"]
        assert list_requests and all(r.headers.get("Authorization") for r in list_requests)
        assert all(r.headers.get("X-Private-Key") == SECRETS["private_key"] for r in list_requests)
    assert (manifest["input_rows"], manifest["accepted"]) == (4, 2)
    assert manifest["reasons"] == {"http_404": 1, "unsupported_scheme": 1}
    assert manifest["config"]["input"] == f"http://***@127.0.0.1:{s.port}/list.tsv"
    assert manifest["config"]["storage_options"]["headers"]["X-Api-Key"] == "***"
    assert manifest["config"]["storage_options"]["client_kwargs"] == {
        "headers": {"X-Private-Key": "***", "X-Auth": "***"}
    }

    written = every_written_text(tmp_path / "out")
    assert any("manifest.json" in p for p in written) and any("plan.json" in p for p in written)
    for path, text in written.items():
        assert_no_secret(text, path)
    printed = capsys.readouterr()
    assert_no_secret(printed.out + printed.err, "the printed progress")
    assert_no_secret(caplog.text, "the log")
    from ray_compat import session_dir

    # the download actors' own output (stdout, stderr, Ray Data's logs): files in the Ray session
    ray_logs = [p for p in (Path(session_dir()) / "logs").rglob("*") if p.is_file()]
    assert ray_logs
    for path in ray_logs:
        assert_no_secret(path.read_bytes().decode("latin-1"), f"Ray's log {path}")

    # --print-config, with secrets in every section that has storage options
    job = {
        "data": {**data.model_dump(mode="json"), "storage_options": storage_options("d-")},
        "train": {"storage_options": storage_options("t-"), "storage_path": f"s3://u:{SECRETS['password']}@b/runs"},
        "eval": {"storage_options": storage_options("e-")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["pipeline", "--config", str(tmp_path / "job.yaml"), "--print-config"]) == 0
    shown = capsys.readouterr().out
    assert_no_secret(shown, "--print-config")
    printed_config = yaml.safe_load(shown)
    for section in ("data", "train", "eval"):
        options = printed_config[section]["storage_options"]
        assert options["key"] == options["secret"] == options["password"] == "***", section
        assert options["anon"] is False
    assert printed_config["train"]["storage_path"] == "s3://***@b/runs"


def test_a_changed_input_is_reported_without_its_credentials():
    old = fingerprint(DataConfig(input="https://bob:OldPass1@lists.example/l.csv"))
    new = fingerprint(DataConfig(input="https://bob:NewPass2@lists.example/other.csv"))
    changes = fingerprint_changes(old, new)
    assert changes == ["data.input: 'https://***@lists.example/l.csv' -> 'https://***@lists.example/other.csv'"]
    # a new password alone is no change of the run
    assert fingerprint_changes(old, fingerprint(DataConfig(input="https://bob:NewPass2@lists.example/l.csv"))) == []


def test_an_input_error_names_the_url_without_its_credentials(tmp_path):
    from pipeline.run import run_pipeline
    from pipeline.sources import InputError

    with HTTPTestServer() as server:  # answers 404 to everything
        url = f"http://listuser:{SECRETS['list_password']}@127.0.0.1:{server.port}/missing.tsv"
        with pytest.raises(InputError) as caught:
            run_pipeline(DataConfig(input=url, output=str(tmp_path / "out"), progress=False))
    assert f"127.0.0.1:{server.port}/missing.tsv" in str(caught.value)
    assert_no_secret(str(caught.value), "the error message")


def test_a_plan_written_with_credentials_still_resumes(tmp_path):
    """A plan from before plans were redacted holds the input URL with its password: the run resumes."""
    import pyarrow as pa

    from pipeline.resume import PLAN, load_plan, make_plan
    from storage import Folder

    url = "https://bob:OldPass1@lists.example/l.csv"
    data = DataConfig(input=url, output=str(tmp_path / "out"))
    chunk = {"name": "_work/input/00000-000000.arrow", "rows": 3}
    plan = make_plan(data, [{"url": url, "format": "csv", "rows": 3, "chunks": [chunk], "schema": pa.schema([])}])
    written = plan.to_json()
    assert_no_secret(str(written), "the plan")
    written["fingerprint"]["input"] = url  # as an older version wrote it
    out = Folder(data.output)
    out.write_json(PLAN, written)
    assert load_plan(out, data).input_rows == 3


def test_a_rejected_rows_url_and_detail_are_stored_without_userinfo():
    import pyarrow as pa

    from pipeline.reasons import Rejection
    from pipeline.shards import rejects_table

    urls = pa.array(["https://alice:s3cr3t-pw@images.example/a.jpg", "https://images.example/b.jpg", None])
    rejections = [
        Rejection("download", "http_404", "https://alice:s3cr3t-pw@images.example/a.jpg: 404 Not Found"),
        Rejection("download", "timeout", "no answer in 10 s"),
        Rejection("filter", "malformed_row", "line 3: no url"),
    ]
    table = rejects_table(pa.array(["0", "1", "2"]), urls, pa.array(["a", "b", "c"]), rejections)
    assert table.column("url").to_pylist() == ["https://***@images.example/a.jpg", "https://images.example/b.jpg", None]
    assert "s3cr3t-pw" not in " ".join(table.column("detail").to_pylist())
