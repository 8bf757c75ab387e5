"""The pipeline end to end on Ray: a misbehaving loopback server, the address guard, S3 on
loopback, resume after SIGKILL, the CLIP-score filter and the CLI's input errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.run import run_pipeline
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes, png_bytes

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


def read_table(folder: Path):
    files = sorted(folder.glob("*.parquet"))
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def config(tmp: Path, input_path: Path, **kw) -> DataConfig:
    base = dict(
        input=str(input_path),
        output=str(tmp / "out"),
        allow_private_addresses=True,
        timeout_s=1.0,
        retries=1,
        retry_backoff_s=0.0,
        num_download_actors=2,
        threads_per_actor=4,
        rows_per_shard=8,
        image_size=64,
        progress=False,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def servers():
    image = jpeg_bytes(120, 90, seed=1)
    other = HTTPTestServer({"/moved.jpg": jpeg_bytes(100, 100, seed=2)}).start()
    main = HTTPTestServer(
        {
            "/ok.jpg": image,
            "/404.jpg": Route(status=404),
            "/500.jpg": Route(status=500),
            "/reset.jpg": Route(reset=True),
            "/hang.jpg": Route(hang=True),
            "/loop.jpg": Route(redirect="/loop.jpg"),
            "/hop.jpg": Route(redirect=other.url("/moved.jpg")),
            "/page.html": b"<!DOCTYPE html><html><body>an image? no</body></html>",
            "/truncated.jpg": jpeg_bytes(200, 150, seed=3)[:900],
            "/alpha.png": png_bytes(50, 40, seed=4, mode="RGBA"),
            "/cmyk.jpg": jpeg_bytes(80, 60, seed=5, mode="CMYK"),
            "/bomb.png": bomb_png(),
            "/tiny.jpg": jpeg_bytes(1, 1, seed=6),
            "/noai.jpg": Route(body=jpeg_bytes(70, 70, seed=7), headers={"X-Robots-Tag": "noai"}),
            "/same-a.jpg": jpeg_bytes(90, 90, seed=8),
            "/same-b.jpg": jpeg_bytes(90, 90, seed=8),
        }
    ).start()
    yield main, other
    main.stop()
    other.stop()


# url path (or full URL), caption, expected outcome: "accepted" or (stage, reason)
def misbehaving_rows(main: HTTPTestServer) -> list[tuple[bytes, bytes, object]]:
    u = lambda p: main.url(p).encode()  # noqa: E731
    return [
        (u("/ok.jpg"), b"a photo", "accepted"),
        (u("/404.jpg"), b"gone", ("download", "http_404")),
        (u("/500.jpg"), b"broken server", ("download", "http_500")),
        (u("/reset.jpg"), b"reset", ("download", "connection_error")),
        (u("/hang.jpg"), b"never answers", ("download", "timeout")),
        (u("/loop.jpg"), b"loops", ("download", "redirect_loop")),
        (u("/hop.jpg"), b"moved to another port", "accepted"),
        (u("/page.html"), b"html", ("decode", "not_an_image")),
        (u("/truncated.jpg"), b"cut off", ("decode", "truncated_image")),
        (u("/alpha.png"), b"transparent", "accepted"),
        (u("/cmyk.jpg"), b"print colours", "accepted"),
        (u("/bomb.png"), b"huge", ("decode", "too_large")),
        (u("/tiny.jpg"), b"one pixel", "accepted"),
        (u("/noai.jpg"), b"opted out", ("download", "optout")),
        (b"file:///etc/passwd", b"local file", ("download", "unsupported_scheme")),
        (u("/ok.jpg"), b"", ("filter", "caption_empty")),
        (u("/ok.jpg"), b"bad \xff\xfe bytes", ("filter", "caption_not_text")),
        (u("/same-a.jpg"), b"first copy", "accepted"),
        (u("/same-b.jpg"), b"second copy, same bytes", ("dedup", "duplicate")),
        (u("/ok.jpg"), b"a photo", ("dedup", "duplicate")),  # same url and caption as row 0
    ]


def write_tsv(path: Path, rows) -> None:
    path.write_bytes(b"url\tcaption\n" + b"".join(url + b"\t" + caption + b"\n" for url, caption, _ in rows))


def test_every_misbehaving_row_ends_accepted_or_rejected_with_its_reason(ray_local, servers, tmp_path):
    main, _ = servers
    rows = misbehaving_rows(main)
    write_tsv(tmp_path / "list.tsv", rows)
    data = config(tmp_path, tmp_path / "list.tsv", filters={"dedup_sha256": True, "dedup_url_caption": True})
    manifest = run_pipeline(data)

    out = tmp_path / "out"
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["input_rows"] == len(rows)
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"]
    shards, rejects = read_table(out / "shards"), read_table(out / "rejects")
    assert shards.column_names == [
        "key",
        "url",
        "caption",
        "jpg",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
    ]
    assert rejects.column_names == ["key", "url", "caption", "stage", "reason", "detail"]
    keys = shards.column("key").to_pylist() + rejects.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(rows)

    by_key = {r["key"]: r for r in rejects.to_pylist()}
    accepted = {r["key"]: r for r in shards.to_pylist()}
    shard_of = lambda i: f"{i // 8:05d}{i % 8}"  # noqa: E731 - 8 rows per shard, one row digit
    for i, (url, caption, expected) in enumerate(rows):
        key = shard_of(i)
        if expected == "accepted":
            assert key in accepted, (url, by_key.get(key))
            row = accepted[key]
            image = Image.open(io.BytesIO(row["jpg"]))
            assert image.mode == "RGB" and image.size == (64, 64) == (row["width"], row["height"])
            import hashlib

            assert row["sha256"] == hashlib.sha256(row["jpg"]).hexdigest()
        else:
            assert key in by_key, (url, caption, "was accepted")
            assert (by_key[key]["stage"], by_key[key]["reason"]) == expected, (url, by_key[key]["detail"])
            assert by_key[key]["detail"]
    assert accepted[shard_of(12)]["original_width"] == 1  # the 1x1 image
    assert by_key[shard_of(18)]["detail"] == f"same image sha256 as key {shard_of(17)}"
    assert manifest["reasons"]["duplicate"] == 2
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["accepted"]
    assert not (out / "_work").exists()

    # Ray Data reads the shards as plain Parquet.
    ds = ray_local.data.read_parquet(str(out / "shards"))
    assert ds.count() == manifest["accepted"]

    # A second run with the same config finds everything committed and changes nothing.
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    again = run_pipeline(data)
    assert again["run"]["shards_already_done"] == 3 and again["run"]["rows_processed"] == 0
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
    assert {k: v for k, v in again.items() if k not in ("duration_s", "run")} == {
        k: v for k, v in manifest.items() if k not in ("duration_s", "run")
    }


def test_malformed_source_rows_are_counted_rejects_in_every_format(ray_local, servers, tmp_path):
    """Bad lines in csv/tsv/jsonl and a null URL in parquet end as rejects with file and line;
    the run goes on and accepted + rejected == input_rows (a malformed line counts as one row)."""
    import pyarrow as pa

    main, _ = servers
    ok, cmyk = main.url("/ok.jpg").encode(), main.url("/cmyk.jpg").encode()
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.csv").write_bytes(
        b"url,caption\n"
        + ok
        + b',"a photo, with a comma"\n'  # line 2: accepted
        + ok
        + b",three,fields\n"  # line 3: malformed
        + b"\n"  # line 4: blank, not a row
        + ok
        + b',"unterminated quote\n'  # line 5: malformed
        + b"http://127.0.0.1/\xff\xfe.jpg,bad url\n"  # line 6: malformed (url not UTF-8)
        + cmyk
        + b",print colours\r\n"
    )  # line 7: accepted
    (lists / "b.jsonl").write_bytes(
        b'{"url": "'
        + ok
        + b'", "caption": "json one"}\n'  # line 1: accepted
        + b'{"url": "'
        + ok
        + b'", "caption": \n'  # line 2: malformed
        + b"42\n"  # line 3: malformed
        + b'{"url": "'
        + cmyk
        + b'", "caption": "json four"}'
    )  # line 4: accepted
    pq.write_table(pa.table({"url": [ok.decode(), None], "caption": ["parquet one", "no url"]}), lists / "c.parquet")
    (lists / "d.tsv").write_bytes(b"url\tcaption\n" + ok + b"\ttsv one\n" + ok + b"\tragged\tline\n")
    data = config(tmp_path, lists, rows_per_shard=4)
    manifest = run_pipeline(data)

    assert manifest["input_rows"] == 5 + 4 + 2 + 2
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"]
    assert manifest["accepted"] == 2 + 2 + 1 + 1
    assert manifest["reasons"] == {"malformed_row": 6, "invalid_url": 1}
    assert manifest["stages"] == {"filter": 6, "download": 1}
    rejects = read_table(tmp_path / "out" / "rejects").to_pylist()
    details = sorted(r["detail"] for r in rejects if r["reason"] == "malformed_row")
    assert all(r["stage"] == "filter" for r in rejects if r["reason"] == "malformed_row")
    expected = [
        (lists / "a.csv", 3),
        (lists / "a.csv", 5),
        (lists / "a.csv", 6),
        (lists / "b.jsonl", 2),
        (lists / "b.jsonl", 3),
        (lists / "d.tsv", 3),
    ]
    assert [d.split(":", 1)[0] for d in details] == [f"{path} line {line}" for path, line in expected]
    null_url = [r for r in rejects if r["reason"] == "invalid_url"]
    assert null_url[0]["caption"] == "no url" and null_url[0]["stage"] == "download"
    keys = read_table(tmp_path / "out" / "shards").column("key").to_pylist() + [r["key"] for r in rejects]
    assert len(keys) == len(set(keys)) == manifest["input_rows"]

    # A rerun finds every shard committed and reports the same.
    again = run_pipeline(data)
    assert again["run"]["rows_processed"] == 0
    assert {k: v for k, v in again.items() if k not in ("duration_s", "run")} == {
        k: v for k, v in manifest.items() if k not in ("duration_s", "run")
    }


def test_repeated_url_caption_rows_are_rejected_before_download(ray_local, tmp_path):
    image = jpeg_bytes(64, 64, seed=11)
    with HTTPTestServer(
        {
            "/a.jpg": image,
            "/b.jpg": jpeg_bytes(64, 64, seed=12),
            "/d.jpg": jpeg_bytes(64, 64, seed=13),
            "/gone.jpg": Route(status=404),
        }
    ) as server:
        u = lambda p: server.url(p).encode()  # noqa: E731
        rows = [
            (u("/a.jpg"), b"cap A", "accepted"),  # 0
            (u("/a.jpg"), b"cap A", ("duplicate", 0)),  # 1
            (u("/a.jpg"), b"cap A2", "accepted"),  # 2: same url, other caption: kept
            (u("/b.jpg"), b"cap B", "accepted"),  # 3
            (u("/a.jpg"), b"cap A", ("duplicate", 0)),  # 4: in another shard
            (u("/b.jpg"), b"cap B", ("duplicate", 3)),  # 5
            (u("/d.jpg"), b"", "caption_empty"),  # 6
            (u("/d.jpg"), b"", "caption_empty"),  # 7: keeps its own reason
            (u("/d.jpg"), b"cap D", "accepted"),  # 8
            (u("/d.jpg"), b"cap D", ("duplicate", 8)),  # 9
            (u("/gone.jpg"), b"x", "http_404"),  # 10
            (u("/gone.jpg"), b"x", ("duplicate", 10)),  # 11: not fetched although 10 failed
        ]
        write_tsv(tmp_path / "list.tsv", rows)
        data = config(tmp_path, tmp_path / "list.tsv", rows_per_shard=3, filters={"dedup_url_caption": True})
        manifest = run_pipeline(data)
        from collections import Counter

        assert Counter(server.paths()) == {"/a.jpg": 2, "/b.jpg": 1, "/d.jpg": 1, "/gone.jpg": 1}
        assert (manifest["accepted"], manifest["reasons"]) == (4, {"duplicate": 5, "caption_empty": 2, "http_404": 1})
        key = lambda i: f"{i // 3:05d}{i % 3}"  # noqa: E731
        rejects = {r["key"]: r for r in read_table(tmp_path / "out" / "rejects").to_pylist()}
        for i, (_, _, expected) in enumerate(rows):
            if isinstance(expected, tuple):
                assert (rejects[key(i)]["stage"], rejects[key(i)]["reason"]) == ("dedup", "duplicate")
                assert rejects[key(i)]["detail"] == f"same url and caption as key {key(expected[1])}"
            elif expected != "accepted":
                assert rejects[key(i)]["reason"] == expected
        shards = read_table(tmp_path / "out" / "shards")
        assert shards.column("key").to_pylist() == [key(i) for i in (0, 2, 3, 8)]
        assert not (tmp_path / "out" / "_work").exists()
        # The decisions are committed: a rerun fetches nothing and reports the same.
        before = server.request_count()
        again = run_pipeline(data)
        assert server.request_count() == before
        assert (again["accepted"], again["reasons"]) == (manifest["accepted"], manifest["reasons"])


def test_loopback_urls_are_refused_and_the_server_sees_no_request(ray_local, tmp_path, capfd):
    from ray.util.debug import reset_log_once

    reset_log_once("ray_data_progress_manager_disabled")  # Ray Data says it once per process
    with HTTPTestServer({"/a.jpg": jpeg_bytes()}) as server:
        port = server.port
        urls = [
            server.url("/a.jpg"),
            f"http://localhost:{port}/a.jpg",
            f"http://2130706433:{port}/a.jpg",
            f"http://0x7f000001:{port}/a.jpg",
            f"http://[::1]:{port}/a.jpg",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/a.jpg",
            "http://192.168.1.1/a.jpg",
        ]
        rows = [(u.encode(), b"caption", None) for u in urls]
        write_tsv(tmp_path / "list.tsv", rows)
        manifest = run_pipeline(
            config(tmp_path, tmp_path / "list.tsv", allow_private_addresses=False, num_download_actors=1)
        )
        assert manifest["reasons"] == {"blocked_address": len(urls)}
        assert manifest["accepted"] == 0
        assert server.request_count() == 0
    # the pipeline shows its own progress; Ray Data's notice that its bars are off would only confuse
    assert "Progress bars disabled" not in "".join(capfd.readouterr())


def test_input_list_and_output_shards_on_s3(ray_local, servers, tmp_path):
    from tests.support.s3_server import S3TestServer

    main, _ = servers
    with S3TestServer() as s3:
        s3.create_bucket("lists")
        s3.create_bucket("shards")
        fs = s3.filesystem()
        import pyarrow as pa

        buf = io.BytesIO()
        pq.write_table(
            pa.table(
                {
                    "URL": [main.url("/ok.jpg"), main.url("/cmyk.jpg"), main.url("/404.jpg")],
                    "TEXT": ["one", "two", "three"],
                    "uid": ["u1", "u2", "u3"],
                }
            ),
            buf,
        )
        fs.pipe("lists/laion/part-00000.parquet", buf.getvalue())
        data = config(
            tmp_path,
            "s3://lists/laion",
            output="s3://shards/run1",
            url_col="URL",
            caption_col="TEXT",
            extra_cols=["uid"],
            storage_options=s3.storage_options(),
            num_download_actors=1,
        )
        manifest = run_pipeline(data)
        assert (manifest["input_rows"], manifest["accepted"], manifest["reasons"]) == (3, 2, {"http_404": 1})
        assert manifest["config"]["storage_options"]["secret"] == "***"
        fs.invalidate_cache()
        names = fs.ls("shards/run1/shards")
        assert len(names) == 1
        with fs.open(names[0], "rb") as fh:
            table = pq.read_table(fh)
        assert table.column("uid").to_pylist() == ["u1", "u2"]
        assert table.column("caption").to_pylist() == ["one", "two"]
        assert json.loads(fs.cat("shards/run1/manifest.json"))["accepted"] == 2
        assert fs.ls("shards/run1/rejects")
        ds = ray_local.data.read_parquet("s3://shards/run1/shards", filesystem=s3.pyarrow_filesystem())
        assert ds.count() == 2


def test_cli_reports_a_missing_column_before_downloading(ray_local, tmp_path, capsys):
    from clipray.cli import main as cli

    with HTTPTestServer({"/a.jpg": jpeg_bytes()}) as server:
        (tmp_path / "list.tsv").write_text(f"link\ttext\n{server.url('/a.jpg')}\tx\n")
        code = cli(
            [
                "pipeline",
                "--set",
                f"data.input={tmp_path / 'list.tsv'}",
                "--set",
                f"data.output={tmp_path / 'out'}",
                "--set",
                "data.allow_private_addresses=true",
            ]
        )
        assert code == 2
        err = capsys.readouterr().err
        assert "data.url_col 'url' is not a column of" in err and "(columns: link, text)" in err
        assert server.request_count() == 0
    assert not (tmp_path / "out" / "shards").exists()
