"""`data.retry_rejects`: the rows of a finished run rejected for a transient reason run again in
place (a loopback server fails some URLs the first time and serves them the second), the manifest
invariant holds, and a killed retry round resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.retry import is_transient
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes
from tests.test_pipeline_run import config, read_table, write_tsv


def _config(tmp_path: Path, **kw) -> DataConfig:
    """One actor, shards of 4 rows, no retries inside a run; stored sizes are the served sizes
    (`resize_mode: no`), so each image is recognised by its size."""
    base = dict(rows_per_shard=4, num_download_actors=1, image_size=32, resize_mode="no", retries=0)
    return config(tmp_path, tmp_path / "list.tsv", **{**base, **kw})


def _image(i: int) -> bytes:
    return jpeg_bytes(20 + i, 10 + i, seed=i)  # size (20 + i, 10 + i) names the image


def _state(out: Path) -> dict:
    return json.loads((out / "_state" / "retry.json").read_text())


def _check_outputs(out: Path, manifest: dict, urls: dict[str, str], sizes: dict[str, int]) -> None:
    """shards/ and rejects/ hold exactly the manifest's files, every key once, each accepted row
    with the image of its own URL, in key order within each file."""
    on_disk = {str(p.relative_to(out)) for p in out.glob("shards/*.parquet")} | {
        str(p.relative_to(out)) for p in out.glob("rejects/*.parquet")
    }
    assert on_disk == {f["path"] for f in manifest["shards"]} | {f["path"] for f in manifest["rejects"]}
    for f in manifest["shards"] + manifest["rejects"]:
        keys = pq.read_table(out / f["path"], columns=["key"]).column("key").to_pylist()
        assert keys == sorted(keys) and len(keys) == f["rows"], f["path"]
    accepted, rejected = read_table(out / "shards"), read_table(out / "rejects")
    a_keys = accepted.column("key").to_pylist()
    r_keys = rejected.column("key").to_pylist() if rejected is not None else []
    assert len(a_keys) == manifest["accepted"] and len(r_keys) == manifest["rejected"]
    assert sorted(a_keys + r_keys) == sorted(urls), "every input row exactly once"
    for row in accepted.select(["key", "url", "original_width"]).to_pylist():
        assert row["url"] == urls[row["key"]]
        assert row["original_width"] == 20 + sizes[row["url"].rsplit("/", 1)[-1]]


@pytest.mark.slow
def test_retry_rejects_reruns_only_transient_rejects_in_place(ray_local, tmp_path):
    from pipeline.run import run_pipeline

    images = {f"ok{i}.jpg": i for i in range(7)} | {"flaky0.jpg": 10, "flaky1.jpg": 11, "reset.jpg": 12}
    images |= {"hang.jpg": 13, "busy.jpg": 14}
    first_time = {
        "flaky0.jpg": Route(status=503),
        "flaky1.jpg": Route(status=502),
        "reset.jpg": Route(reset=True),
        "hang.jpg": Route(hang=True),
        "busy.jpg": Route(status=429, headers={"Retry-After": "1"}),
    }
    routes = {f"/{p}": _image(i) for p, i in images.items() if p not in first_time}
    routes |= {f"/{p}": r for p, r in first_time.items()}
    routes |= {"/always500.jpg": Route(status=500), "/gone.jpg": Route(status=404), "/gone2.jpg": Route(status=404)}
    with HTTPTestServer(routes) as server:
        paths = [
            *("ok0.jpg", "flaky0.jpg", "gone.jpg", "ok1.jpg"),  # shard 0
            *("reset.jpg", "always500.jpg", "ok2.jpg", "busy.jpg"),  # shard 1 (+ an empty caption)
            *("hang.jpg", "ok3.jpg", "flaky1.jpg", "ok4.jpg"),  # shard 2
            *("gone2.jpg", "ok5.jpg", "ok6.jpg", None),  # shard 3: only permanent rejects
        ]
        rows = []
        for i, p in enumerate(paths):
            url = server.url(f"/{p}") if p else "ftp://127.0.0.1/x.jpg"
            rows.append((url.encode(), b"" if p == "ok2.jpg" else f"caption {i}".encode(), None))
        write_tsv(tmp_path / "list.tsv", rows)
        urls = {f"{i // 4:05d}{i % 4}": url.decode() for i, (url, _, _) in enumerate(rows)}
        out = tmp_path / "out"

        first = run_pipeline(_config(tmp_path))
        assert first["reasons"] == {
            "http_404": 2,
            "caption_empty": 1,
            "connection_error": 1,
            "http_429": 1,
            "http_500": 1,
            "http_502": 1,
            "http_503": 1,
            "timeout": 1,
            "unsupported_scheme": 1,
        }
        assert first["accepted"] == 6
        shard3_files = {f["path"] for f in first["shards"] + first["rejects"] if "00003" in f["path"]}

        # The hosts heal, except one that keeps failing.
        for p in first_time:
            server.add(f"/{p}", _image(images[p]))
        before = len(server.requests)
        second = run_pipeline(_config(tmp_path, retry_rejects=True))
        asked = sorted(r.path for r in server.requests[before:])
        assert asked == sorted(f"/{p}" for p in [*first_time, "always500.jpg"]), "only transient rejects run again"
        assert (second["input_rows"], second["accepted"], second["rejected"]) == (16, 11, 5)
        assert second["reasons"] == {"http_404": 2, "caption_empty": 1, "http_500": 1, "unsupported_scheme": 1}
        assert second["stages"] == {"download": 4, "filter": 1}
        assert second["run"]["retry_round"] == 1
        assert (second["run"]["rows_processed"], second["run"]["images_downloaded"]) == (6, 5)
        _check_outputs(out, second, urls, images)
        paths_now = {f["path"] for f in second["shards"] + second["rejects"]}
        assert shard3_files <= paths_now, "a shard without transient rejects is left as it was"
        assert {
            "shards/00000.retry1.parquet",
            "rejects/00001.retry1.parquet",
            "shards/00002.retry1.parquet",
        } <= paths_now
        assert not any(p.startswith("rejects/00002") for p in paths_now), "shard 2 has no rejects left"
        still = read_table(out / "rejects").to_pylist()
        assert [(r["key"], r["reason"]) for r in still if r["reason"] == "http_500"] == [("000011", "http_500")]
        assert _state(out) == {"round": 1, "completed": True}
        assert not (out / "_work").exists()

        # A second round retries what is still transient (one row); a plain rerun changes nothing.
        before = len(server.requests)
        third = run_pipeline(_config(tmp_path, retry_rejects=True))
        assert [r.path for r in server.requests[before:]] == ["/always500.jpg"]
        assert (third["accepted"], third["reasons"], third["run"]["retry_round"]) == (11, second["reasons"], 2)
        _check_outputs(out, third, urls, images)
        before = len(server.requests)
        plain = run_pipeline(_config(tmp_path))
        assert len(server.requests) == before
        assert (plain["accepted"], plain["reasons"]) == (11, second["reasons"])


@pytest.mark.slow
def test_a_killed_retry_round_resumes_without_retrying_committed_shards(ray_local, tmp_path):
    from pipeline.resume import DOWNLOAD, load_plan, markers
    from pipeline.retry import ShardRetrier, begin_round, check_finished, current_round
    from pipeline.run import run_pipeline
    from pipeline.sources import InputError, list_input_files
    from pipeline.staging import stage_file
    from storage import Folder

    routes = {"/a.jpg": _image(1), "/b.jpg": _image(2), "/flaky.jpg": Route(status=503)}
    routes |= {"/down.jpg": Route(status=500)}
    with HTTPTestServer(routes) as server:
        paths = ["a.jpg", "flaky.jpg", "b.jpg", "down.jpg"]  # two shards of two rows
        write_tsv(tmp_path / "list.tsv", [(server.url(f"/{p}").encode(), b"caption", None) for p in paths])
        urls = {f"{i // 2:05d}{i % 2}": server.url(f"/{p}") for i, p in enumerate(paths)}
        first = run_pipeline(_config(tmp_path, rows_per_shard=2))
        assert first["reasons"] == {"http_503": 1, "http_500": 1}
        server.add("/flaky.jpg", _image(3))
        data = _config(tmp_path, rows_per_shard=2, retry_rejects=True)
        out = Folder(data.output, data)

        # A retry round killed after committing shard 0, while shard 1 was being written.
        plan = load_plan(out, data)
        downloads = markers(out, DOWNLOAD, plan.shards)
        check_finished(out, plan, downloads)
        round_ = current_round(out)
        begin_round(out, round_)
        stage_file(0, list_input_files(data)[0], data, out)
        retrier = ShardRetrier(data, out, plan.extra_schema)
        retrier.process(plan.shards[0], downloads[plan.shards[0].name], round_)
        retrier.close()
        (tmp_path / "out" / "shards" / "00001.retry1.parquet").write_bytes(b"a file no marker names")
        assert not (tmp_path / "out" / "manifest.json").exists()
        assert [r.path for r in server.requests].count("/flaky.jpg") == 2

        before = len(server.requests)
        resumed = run_pipeline(data)
        assert [r.path for r in server.requests[before:]] == ["/down.jpg"], "shard 0 is not retried again"
        assert (resumed["accepted"], resumed["reasons"], resumed["run"]["retry_round"]) == (3, {"http_500": 1}, 1)
        _check_outputs(tmp_path / "out", resumed, urls, {"a.jpg": 1, "b.jpg": 2, "flaky.jpg": 3})
        assert _state(tmp_path / "out") == {"round": 1, "completed": True}

        # Retrying needs the run's input: a changed list stops before anything is touched.
        with open(tmp_path / "list.tsv", "ab") as fh:
            fh.write(server.url("/a.jpg").encode() + b"\tone more row\n")
        with pytest.raises(InputError, match="changed since the run"):
            run_pipeline(data)
        assert (tmp_path / "out" / "manifest.json").exists()

        # An unfinished run cannot be retried: finish it first.
        (tmp_path / "out" / "_state" / "download" / "00001.json").unlink()
        with pytest.raises(ValueError, match="not finished .* rerun without data.retry_rejects"):
            run_pipeline(data)


def test_retry_rejects_needs_a_run_to_retry(tmp_path):
    from pipeline.run import run_pipeline

    with pytest.raises(ValueError, match="holds no run to retry"):
        run_pipeline(_config(tmp_path, retry_rejects=True))


def test_retry_rejects_refuses_the_filters_decided_over_the_whole_run():
    with pytest.raises(ValueError, match="retry_rejects cannot be combined with data.filters.dedup_sha256"):
        DataConfig(retry_rejects=True, filters={"dedup_sha256": True})


@pytest.mark.parametrize(
    "reason, transient",
    [
        ("timeout", True),
        ("connection_error", True),
        ("dns_error", True),
        ("http_429", True),
        ("http_500", True),
        ("http_503", True),
        ("http_599", True),
        ("http_404", False),
        ("http_5000", False),
        ("blocked_address", False),
        ("tls_error", False),
        ("not_an_image", False),
        ("duplicate", False),
    ],
)
def test_which_reasons_are_transient(reason, transient):
    assert is_transient(reason) is transient
