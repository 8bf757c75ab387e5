"""A download actor's memory stays bounded: requests under way plus bodies waiting for a decoder
never exceed data.max_in_flight, whatever the host mix (issue 15: one loopback host at zero
latency once queued 7,505 bodies in one actor, the rows waiting for the host's slots having
given their permits back)."""

from __future__ import annotations

import time

import pyarrow as pa

import pipeline.download as download
from benchmarks.download_tools import loopback_server
from pipeline.config import DataConfig
from pipeline.resume import ShardSpec
from storage import Folder
from tests.support.http_server import HTTPTestServer, Route, jpeg_bytes

MAX_IN_FLIGHT = 16
DECODE_S = 0.002  # decoders slower than the loopback network: the bodies would pile up


def _run_shard(tmp_path, urls: list[str]) -> tuple[dict, int]:
    """The shard's stats and the peak of the downloader's transfers + undecoded bodies."""
    out = Folder(str(tmp_path))
    n = len(urls)
    out.write_arrow("_work/input/m.arrow", pa.table({"url": urls, "caption": ["c"] * n, "caption_ok": [True] * n}))
    data = DataConfig(
        input="m",
        output=str(tmp_path),
        allow_private_addresses=True,
        threads_per_actor=2,
        retries=0,
        image_size=8,
        max_in_flight=MAX_IN_FLIGHT,
        max_connections_per_host=8,
    )
    spec = ShardSpec(
        id=0, name="0", input="_work/input/m.arrow", rows=n, source="m", first_row=0, row_digits=4, global_pass=False
    )
    shard = download.ShardDownloader(data, out, pa.schema([]), cpu_slots=1)
    outcome = shard.rows.outcome

    def slow_outcome(*args):  # the real decode, after a pause: a decoder slower than the network
        time.sleep(DECODE_S)
        return outcome(*args)

    shard.rows.outcome = slow_outcome
    try:
        stats = shard.process(spec)
    finally:
        shard.close()
    assert shard.busy.value == 0  # every transfer ended and every body was decoded
    return stats, shard.busy.peak


def test_one_fast_host_cannot_pile_up_more_bodies_than_max_in_flight(tmp_path):
    n = 2000
    with loopback_server([jpeg_bytes(8, 8, seed=i) for i in range(4)], n) as (urls, _):
        stats, peak = _run_shard(tmp_path, urls)
    assert stats["accepted"] == n, stats
    assert 8 <= peak <= MAX_IN_FLIGHT  # the host's 8 slots were used, and no more than the bound held


def test_many_hosts_one_of_them_slow_stay_bounded(tmp_path):
    images = [jpeg_bytes(8, 8, seed=i) for i in range(4)]
    per_host = 600
    slow = HTTPTestServer({f"/{i}.jpg": Route(body=images[0], delay_s=0.05) for i in range(40)}, record=False)
    with slow, loopback_server(images, per_host) as (first, _), loopback_server(images, per_host) as (second, _):
        urls = [slow.url(f"/{i}.jpg") for i in range(40)]
        urls += [url for pair in zip(first, second) for url in pair]  # the hosts' rows interleaved
        stats, peak = _run_shard(tmp_path, urls)
    assert stats["accepted"] == len(urls), stats
    assert 8 <= peak <= MAX_IN_FLIGHT
