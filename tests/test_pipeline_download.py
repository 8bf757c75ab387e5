"""One shard through the download actor's logic, without Ray: order, row groups, commit marker."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.download as download
from pipeline.config import DataConfig
from pipeline.resume import ShardSpec
from storage import Folder
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes


def test_shard_is_written_in_row_order_in_row_groups_and_committed_last(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "ROW_GROUP_ROWS", 3)
    routes = {f"/{i}.jpg": Route(body=jpeg_bytes(40, 30, seed=i), delay_s=0.02 * (i % 3)) for i in range(10)}
    with HTTPTestServer(routes) as server:
        urls = [server.url(f"/{i}.jpg") if i != 4 else server.url("/missing.jpg") for i in range(10)]
        captions = [f"caption {i}" if i != 7 else "" for i in range(10)]
        out = Folder(str(tmp_path))
        out.write_arrow(
            "_work/input/x.arrow",
            pa.table(
                {"url": urls, "caption": captions, "caption_ok": [True] * 10, "uid": [f"u{i}" for i in range(10)]}
            ),
        )
        data = DataConfig(
            input="x",
            output=str(tmp_path),
            allow_private_addresses=True,
            threads_per_actor=4,
            retries=0,
            image_size=32,
            extra_cols=["uid"],
            filters={"dedup_sha256": True},
        )
        spec = ShardSpec(
            id=7,
            name="00007",
            input="_work/input/x.arrow",
            rows=10,
            source="x",
            first_row=0,
            row_digits=1,
            global_pass=True,
        )
        shard = download.ShardDownloader(data, out, pa.schema([pa.field("uid", pa.string())]), cpu_slots=1)
        try:
            stats = shard.process(spec)
            first = (tmp_path / spec.accepted_file).read_bytes()
            again = shard.process(spec)  # a retried shard writes the same files
        finally:
            shard.close()
    assert (tmp_path / spec.accepted_file).read_bytes() == first
    assert {k: v for k, v in stats.items() if k != "duration_s"} == {
        k: v for k, v in again.items() if k != "duration_s"
    }
    assert (stats["rows"], stats["accepted"], stats["rejected"]) == (10, 8, 2)
    assert stats["reasons"] == {"http_404": 1, "caption_empty": 1}
    table = pq.read_table(tmp_path / spec.accepted_file)
    assert table.column("key").to_pylist() == [f"00007{i}" for i in (0, 1, 2, 3, 5, 6, 8, 9)]
    assert table.column("uid").to_pylist() == [f"u{i}" for i in (0, 1, 2, 3, 5, 6, 8, 9)]
    assert pq.ParquetFile(tmp_path / spec.accepted_file).metadata.num_row_groups == 3
    assert spec.accepted_file.startswith("_work/")  # the global pass writes shards/ later
    index = pq.read_table(tmp_path / spec.index_file)
    assert index.column("key").to_pylist() == table.column("key").to_pylist()
    assert index.column("sha256").to_pylist() == table.column("sha256").to_pylist()
    rejects = pq.read_table(tmp_path / spec.rejects_file).to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [("000074", "http_404"), ("000077", "caption_empty")]
    assert json.loads((tmp_path / "_state" / "download" / "00007.json").read_text())["accepted"] == 8
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind


def test_malformed_and_duplicate_rows_are_rejected_without_a_request(tmp_path):
    with HTTPTestServer({f"/{i}.jpg": jpeg_bytes(40, 30, seed=i) for i in range(4)}) as server:
        out = Folder(str(tmp_path))
        out.write_arrow(
            "_work/input/x.arrow",
            pa.table(
                {
                    "url": [server.url("/0.jpg"), None, server.url("/0.jpg"), server.url("/3.jpg")],
                    "caption": ["zero", None, "zero", "three"],
                    "caption_ok": [True, False, True, True],
                    "source_error": [
                        None,
                        "list.csv line 3: 3 field(s), expected 2 (url, caption): 'a,b,c'",
                        None,
                        None,
                    ],
                }
            ),
        )
        data = DataConfig(
            input="x",
            output=str(tmp_path),
            allow_private_addresses=True,
            retries=0,
            image_size=32,
            filters={"dedup_url_caption": True},
        )
        spec = ShardSpec(
            id=0,
            name="00000",
            input="_work/input/x.arrow",
            rows=4,
            source="x",
            first_row=0,
            row_digits=1,
            global_pass=False,
        )
        shard = download.ShardDownloader(data, out, pa.schema([]), cpu_slots=1)
        try:
            stats = shard.process(spec, duplicates={2: "000000"})
        finally:
            shard.close()
        assert sorted(server.paths()) == ["/0.jpg", "/3.jpg"]
    assert (stats["accepted"], stats["reasons"], stats["stages"]) == (
        2,
        {"malformed_row": 1, "duplicate": 1},
        {"filter": 1, "dedup": 1},
    )
    rejects = pq.read_table(tmp_path / spec.rejects_file).to_pylist()
    assert [(r["key"], r["stage"], r["reason"], r["detail"]) for r in rejects] == [
        ("000001", "filter", "malformed_row", "list.csv line 3: 3 field(s), expected 2 (url, caption): 'a,b,c'"),
        ("000002", "dedup", "duplicate", "same url and caption as key 000000"),
    ]


def test_verify_hash_rejects_images_whose_bytes_hash_otherwise(tmp_path):
    """img2dataset's verify_hash: the downloaded bytes (not the re-encoded ones) must hash to the
    input column's value; a row without one is rejected too."""
    import hashlib

    images = [jpeg_bytes(40, 30, seed=i) for i in range(4)]
    with HTTPTestServer({f"/{i}.jpg": images[i] for i in range(4)}) as server:
        out = Folder(str(tmp_path))
        expected = [
            hashlib.sha256(images[0]).hexdigest(),
            hashlib.sha256(images[0]).hexdigest(),
            None,
            hashlib.sha256(images[3]).hexdigest(),
        ]
        out.write_arrow(
            "_work/input/x.arrow",
            pa.table(
                {
                    "url": [server.url(f"/{i}.jpg") for i in range(4)],
                    "caption": ["c"] * 4,
                    "caption_ok": [True] * 4,
                    "expected_hash": expected,
                }
            ),
        )
        data = DataConfig(
            input="x",
            output=str(tmp_path),
            allow_private_addresses=True,
            retries=0,
            image_size=32,
            verify_hash=["sha256", "sha256"],
        )
        spec = ShardSpec(
            id=0,
            name="00000",
            input="_work/input/x.arrow",
            rows=4,
            source="x",
            first_row=0,
            row_digits=1,
            global_pass=False,
        )
        shard = download.ShardDownloader(data, out, pa.schema([]), cpu_slots=1)
        try:
            stats = shard.process(spec)
        finally:
            shard.close()
    assert (stats["accepted"], stats["reasons"]) == (2, {"hash_mismatch": 2})
    rejects = pq.read_table(tmp_path / spec.rejects_file).to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in rejects] == [
        ("000001", "download", "hash_mismatch"),
        ("000002", "download", "hash_mismatch"),
    ]
    assert (
        f"says {expected[1]}" in rejects[0]["detail"] and hashlib.sha256(images[1]).hexdigest() in rejects[0]["detail"]
    )
    assert "no expected sha256 in the input column 'sha256'" in rejects[1]["detail"]
    kept = pq.read_table(tmp_path / spec.accepted_file)
    assert kept.column("key").to_pylist() == ["000000", "000003"]
    assert "expected_hash" not in kept.column_names
