"""One rule decides which staged rows would be downloaded: the (url, caption) dedup's index and the
download actor's requests cover exactly the same rows (no Ray)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.download as download
from pipeline.config import DataConfig, FiltersConfig
from pipeline.dedup import later_duplicates, pair_index
from pipeline.eligibility import table_rejections
from pipeline.filters import RowFilters
from pipeline.resume import ShardSpec
from storage import Folder
from tests.support.http_server import HTTPTestServer, jpeg_bytes

FILTERS = {"min_caption_chars": 3, "min_caption_words": 2}

# (url, caption, caption_ok, source_error) -> the early reject (stage, reason), None: fetched
ROWS = [
    ("{server}/0.jpg", "a red car", True, None, None),
    ("{server}/1.jpg", "a fine caption", True, "list.csv line 3: 3 field(s), expected 2", ("filter", "malformed_row")),
    (None, None, False, "list.jsonl line 4: not JSON", ("filter", "malformed_row")),
    (None, "a null url", True, None, ("download", "invalid_url")),
    ("", "an empty url", True, None, ("download", "invalid_url")),
    ("  \t", "a blank url", True, None, ("download", "invalid_url")),
    ("{server}/6.jpg", "bad \ufffd bytes", False, None, ("filter", "caption_not_text")),
    ("{server}/7.jpg", None, False, None, ("filter", "caption_not_text")),
    ("{server}/8.jpg", "", True, None, ("filter", "caption_empty")),
    ("{server}/9.jpg", "   ", True, None, ("filter", "caption_empty")),
    ("{server}/10.jpg", "ab", True, None, ("filter", "caption_too_short")),
    ("{server}/11.jpg", "single", True, None, ("filter", "caption_too_few_words")),
    ("", "", True, None, ("filter", "caption_empty")),  # the caption is checked before the URL
    ("{server}/0.jpg", "a red car", True, None, None),  # the same pair as row 0
    ("{server}/0.jpg", "another caption here", True, None, None),  # same URL, other caption
    ("ftp://files.example/15.jpg", "not http at all", True, None, None),  # the fetcher's to refuse
    ("{server}/16.jpg", "the last row", True, None, None),
]


def staged_table(server: str) -> pa.Table:
    return pa.table(
        {
            "url": pa.array([None if u is None else u.format(server=server) for u, *_ in ROWS], pa.string()),
            "caption": pa.array([r[1] for r in ROWS], pa.string()),
            "caption_ok": pa.array([r[2] for r in ROWS], pa.bool_()),
            "source_error": pa.array([r[3] for r in ROWS], pa.string()),
        }
    )


def test_every_kind_of_bad_row_gets_its_reason_before_any_request():
    got = table_rejections(staged_table("http://127.0.0.1:1"), RowFilters(FiltersConfig(**FILTERS)))
    assert [None if r is None else (r.stage, r.reason) for r in got] == [r[4] for r in ROWS]
    assert got[1].detail == "list.csv line 3: 3 field(s), expected 2"  # the reader's message, as it was


def _download(tmp_path, server: HTTPTestServer, table: pa.Table, duplicates: dict[int, str]) -> tuple[list, dict]:
    """The URLs the download actor asked its fetcher for, and the shard's stats."""
    out = Folder(str(tmp_path))
    out.write_arrow("_work/input/x.arrow", table)
    data = DataConfig(
        input="x",
        output=str(tmp_path),
        allow_private_addresses=True,
        retries=0,
        image_size=32,
        filters={**FILTERS, "dedup_url_caption": True},
    )
    spec = ShardSpec(
        id=0,
        name="00",
        input="_work/input/x.arrow",
        rows=table.num_rows,
        source="x",
        first_row=0,
        row_digits=2,
        global_pass=False,
    )
    shard = download.ShardDownloader(data, out, pa.schema([]), cpu_slots=1)
    asked, lock = [], threading.Lock()
    real_submit = shard.rows.fetcher.submit_many

    def recording_submit(requests):
        with lock:
            asked.extend(url for url, _ in requests)
        real_submit(requests)

    shard.rows.fetcher.submit_many = recording_submit
    try:
        stats = shard.process(spec, duplicates)
    finally:
        shard.close()
    return asked, stats


def test_the_pair_dedup_indexes_exactly_the_rows_the_download_would_fetch(tmp_path):
    with HTTPTestServer({f"/{i}.jpg": jpeg_bytes(40, 30, seed=i) for i in range(17)}) as server:
        table = staged_table(server.url("").rstrip("/"))
        keys = [f"00{i:02d}" for i in range(table.num_rows)]
        index = pair_index(table, keys, RowFilters(FiltersConfig(**FILTERS)))
        indexed = [keys.index(k) for k in index.column("key").to_pylist()]
        assert indexed == [i for i, r in enumerate(ROWS) if r[4] is None]

        urls = table.column("url").to_pylist()
        asked, stats = _download(tmp_path / "all", server, table, duplicates={})
        assert sorted(asked) == sorted(urls[i] for i in indexed)

        # With the dedup's decisions: every indexed row but the repeats is fetched, nothing else.
        dups = later_duplicates(index, "pair")
        repeats = {
            keys.index(k): first
            for k, first in zip(dups.column("key").to_pylist(), dups.column("first_key").to_pylist())
        }
        assert repeats == {13: "0000"}
        asked, stats = _download(tmp_path / "dedup", server, table, duplicates=repeats)
        assert sorted(asked) == sorted(urls[i] for i in indexed if i not in repeats)
    rejects = {
        r["key"]: (r["stage"], r["reason"])
        for r in pq.read_table(tmp_path / "dedup" / "rejects" / "00.parquet").to_pylist()
    }
    expected = {keys[i]: r[4] for i, r in enumerate(ROWS) if r[4] is not None}
    expected.update({"0013": ("dedup", "duplicate"), "0015": ("download", "unsupported_scheme")})
    assert rejects == expected
    assert stats["accepted"] == 3  # rows 0, 14 and 16
