"""Training ingest from WebDataset tar shards (img2dataset/DataComp layout): the format's rules
against the `webdataset` package, listing and counts (stats files, else counted once and cached),
the same rows in the same order as the equivalent Parquet shards (resume included), and corrupt
members kept in place with a reason."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from storage.webdataset import expand_braces, split_member
from tests.support.train_shards import write_shards, write_webdataset_shards
from training.ingest import (
    DataPosition,
    PreprocessSettings,
    ShardReader,
    ShardStream,
    StreamSettings,
    list_shards,
    PassPlanner,
    pass_units,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = 48  # rows per shard (< TAR_PIECE_SAMPLES: a tar is one piece)
PIECE = 16  # samples per tar piece where a test sets it (monkeypatch): three pieces per tar


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same rows as Parquet (one row group per shard, as a tar of ROWS is one piece; and
    row groups of PIECE rows, as tar pieces of PIECE samples) and as tars."""
    root = tmp_path_factory.mktemp("twins")
    bad = {"train-00007"}
    write_shards(root / "parquet", copies=1, rows_per_shard=ROWS, side=32, corrupt_keys=bad, row_group_size=ROWS)
    write_shards(root / "pieces", copies=1, rows_per_shard=ROWS, side=32, corrupt_keys=bad, row_group_size=PIECE)
    write_webdataset_shards(root / "wds", copies=1, rows_per_shard=ROWS, side=32, corrupt_keys=bad)
    return root


def test_member_names_split_into_key_and_extension_as_webdataset_does():
    from webdataset.tariterators import base_plus_ext

    names = ("000001.jpg", "dir/a.b.TXT", "d.x/k.json", "noext", "x/.hidden", "a/b/.c.txt", ".x", "a.b/c", "a\nb/c.jpg")
    for name in names:
        assert split_member(name) == tuple(None if p is None else p.lower() for p in base_plus_ext(name)) or (
            name.endswith("TXT") and split_member(name) == ("dir/a", "b.txt")
        )
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(ValueError, match="ends before it starts"):
        expand_braces("{5..1}.tar")


def test_tar_shards_are_listed_by_brace_range_with_counts_from_img2dataset_stats(twins, tmp_path):
    # img2dataset writes a metadata .parquet beside each tar: a folder with tars reads the tars only.
    (twins / "wds" / "00000.parquet").write_bytes((twins / "parquet" / "00000.parquet").read_bytes())
    try:
        _, shards = list_shards([str(twins / "wds")], count_cache=str(tmp_path / "cache"))
    finally:
        (twins / "wds" / "00000.parquet").unlink()
    _, parquet = list_shards([str(twins / "parquet")])
    assert [s.path.rsplit("/", 1)[1] for s in shards] == [p.path.rsplit("/", 1)[1][:-8] + ".tar" for p in parquet]
    assert [s.rows for s in shards] == [p.rows for p in parquet] and shards[0].rows == ROWS
    assert not (tmp_path / "cache").exists()  # the counts came from the _stats.json files
    _, ranged = list_shards([str(twins / "wds" / "{00001..00002}.tar")], count_cache=str(tmp_path / "cache"))
    assert [s.rows for s in ranged] == [48, 48]


def test_tar_counts_without_metadata_are_counted_once_and_cached(tmp_path, monkeypatch):
    paths = write_webdataset_shards(tmp_path / "wds", copies=1, rows_per_shard=100, side=16, stats=False)
    written = [len(tarfile.open(p).getnames()) // 3 for p in paths]  # jpg, json, txt per sample
    cache = tmp_path / "cache"
    _, shards = list_shards([str(tmp_path / "wds")], count_cache=str(cache))
    assert [s.rows for s in shards] == written and written[0] == 100
    assert len(list(cache.glob("*.json"))) == len(paths)

    def no_second_count(*args, **kwargs):
        raise AssertionError("counted again despite the cache")

    monkeypatch.setattr("training.ingest.webdataset.index_samples", no_second_count)
    assert [s.rows for s in list_shards([str(tmp_path / "wds")], count_cache=str(cache))[1]] == written
    (tmp_path / "wds" / "bad.tar").write_bytes(b"PAR1 not a tar at all" * 40)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"train.data: .*bad.tar is not a tar file"):
        list_shards([str(tmp_path / "wds")], count_cache=str(cache))


def _read(reader, units):
    parts = [p for u in units for p in reader.read(u)]
    return {name: np.concatenate([p[name] for p in parts]) for name in ("key", "image", "tokens", "status", "row")}


def _same_reads(reader, pq_shards, tar_shards, *, shuffle_rows: int) -> dict:
    """Both workers' passes 0 and 1 over the Parquet and the tar shards read the same rows, images,
    tokens, statuses and positions; returns {key: status} of the tar rows."""
    statuses = {}
    for pass_index in (0, 1):
        for worker in (0, 1):
            units = [
                PassPlanner(shards, seed=5, shuffle_rows=shuffle_rows, num_workers=2).units(pass_index, worker)
                for shards in (pq_shards, tar_shards)
            ]
            parquet, tar = _read(reader, units[0]), _read(reader, units[1])
            assert parquet["key"].tolist() == tar["key"].tolist()
            for name in ("image", "tokens", "status", "row"):
                np.testing.assert_array_equal(parquet[name], tar[name], err_msg=name)
            statuses.update(zip(tar["key"].tolist(), tar["status"].tolist()))
    return statuses


def test_webdataset_gives_the_same_rows_in_the_same_order_as_the_parquet_twin(twins, tmp_path):
    _, pq_shards = list_shards([str(twins / "parquet")])
    _, tar_shards = list_shards([str(twins / "wds")], count_cache=str(tmp_path))
    reader = ShardReader(PreprocessSettings(image_size=16, context_length=8, seed=5), rows_per_batch=20)
    statuses = _same_reads(reader, pq_shards, tar_shards, shuffle_rows=60)
    assert len(statuses) == sum(s.rows for s in tar_shards)  # every row once per pass
    assert {k for k, v in statuses.items() if v} == {"train-00007"}  # not_an_image, as in Parquet
    # A resume inside a shuffle window starts at the same row with the same rest.
    planner = PassPlanner(tar_shards, seed=5, shuffle_rows=60, num_workers=2)
    whole = _read(reader, planner.units(1, 0))
    rest = _read(reader, planner.units(1, 0, start_row=37))
    assert rest["key"].tolist() == whole["key"].tolist()[37:]
    np.testing.assert_array_equal(rest["image"], whole["image"][37:])


def _pieces(monkeypatch, samples=PIECE):
    monkeypatch.setattr("training.ingest.webdataset.TAR_PIECE_SAMPLES", samples)


def test_tar_pieces_are_read_from_their_offsets_in_the_order_of_parquet_row_groups_of_that_size(
    twins, tmp_path, monkeypatch
):
    _pieces(monkeypatch)
    cache = tmp_path / "cache"
    _, pq_shards = list_shards([str(twins / "pieces")])
    _, tar_shards = list_shards([str(twins / "wds")], count_cache=str(cache))
    assert [s.groups for s in tar_shards] == [p.groups for p in pq_shards] and tar_shards[0].groups == (16, 16, 16)
    assert not cache.exists()  # counts from _stats.json: the offsets are walked by the reader, once
    settings = PreprocessSettings(image_size=16, context_length=8, seed=5)
    reader = ShardReader(settings, rows_per_batch=20, count_cache=str(cache))
    _same_reads(reader, pq_shards, tar_shards, shuffle_rows=40)
    # The cache entry: the count and each sample's offset (its first member's header), as tarfile sees them.
    entries = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert sorted(e["uri"] for e in entries) == sorted(s.path for s in tar_shards if s.row_groups)  # one piece: no walk
    with tarfile.open(tar_shards[0].path) as tar:
        firsts = [i.offset for i in tar if i.name.endswith(".jpg")]  # TarWriter: jpg, json, txt per sample
    entry = next(e for e in entries if e["uri"] == tar_shards[0].path)
    assert entry["samples"] == ROWS and entry["offsets"] == firsts

    def no_walk(*args, **kwargs):
        raise AssertionError("walked the headers again despite the cache")

    monkeypatch.setattr("training.ingest.webdataset.index_samples", no_walk)
    fresh = ShardReader(settings, rows_per_batch=20, count_cache=str(cache))
    units = pass_units(tar_shards[2:3], 0)
    assert [u["pieces"] for u in units] == [f'[["{tar_shards[2].path}", {g}, 16]]' for g in range(3)]
    assert _read(fresh, units[1:])["key"].tolist() == _read(reader, units)["key"].tolist()[16:]


def test_a_changed_tar_is_indexed_anew(tmp_path, monkeypatch):
    _pieces(monkeypatch)
    cache = str(tmp_path / "cache")
    path = write_webdataset_shards(tmp_path / "wds", copies=1, rows_per_shard=40, side=16, stats=False)[0]
    _, shards = list_shards([str(path)], count_cache=cache)
    assert shards[0].row_groups == (16, 16, 8)
    with tarfile.open(path) as tar:
        old = tar.getmembers()[: 3 * 20]  # the first 20 samples
        blobs = [tar.extractfile(m).read() for m in old]
    with tarfile.open(path, "w") as tar:  # rewritten: 20 samples, the first 2 gone
        for member, blob in list(zip(old, blobs))[6:]:
            _member(tar, member.name, blob)
    os.utime(path, ns=(1, 2_000_000_000))
    _, shards = list_shards([str(path)], count_cache=cache)
    assert shards[0].rows == 18 and shards[0].row_groups == (16, 2)
    reader = ShardReader(PreprocessSettings(image_size=8, context_length=8), count_cache=cache)
    keys = _read(reader, pass_units(shards, 0))["key"].tolist()
    assert keys == [m.name.split(".")[0] for m in old[6::3]]


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("piece", [128, 4], ids=["one-piece", "pieces-of-4"])
def test_corrupt_members_keep_their_place_and_are_counted_with_a_reason(twins, tmp_path, monkeypatch, piece):
    from training.ingest import REJECT_REASONS, Rebatcher

    _pieces(monkeypatch, piece)
    good = (twins / "parquet").glob("*.parquet")  # any real JPEG will do
    import pyarrow.parquet as pq

    jpegs = pq.read_table(next(iter(sorted(good))), columns=["jpg"])["jpg"].to_pylist()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _member(tar, "a.jpg", jpegs[0])
        _member(tar, "a.txt", b"a cat")
        _member(tar, "b.jpg", jpegs[1])  # no caption
        _member(tar, "c.txt", b"no image here")
        _member(tar, "c.json", b"{}")
        _member(tar, "d.jpg", b"GIF89a not really")  # not an image
        _member(tar, "d.txt", b"broken")
        _member(tar, "e.png", jpegs[2])
        _member(tar, "e.txt", b"the last whole sample")
        _member(tar, "f.jpg", jpegs[3])
        _member(tar, "f.txt", b"cut off")
    data = buf.getvalue()
    folder = tmp_path / "bad"
    folder.mkdir()
    cut = data.index(b"f.jpg") + 512 + 100  # inside f.jpg's data (after its 512-byte header)
    (folder / "00000.tar").write_bytes(data[:cut])
    (folder / "00000_stats.json").write_text(json.dumps({"successes": 7}))  # the writer's count: 7
    _, shards = list_shards([str(folder)], count_cache=str(tmp_path / "cache"))
    assert shards[0].rows == 7 and shards[0].row_groups == ((4, 3) if piece == 4 else ())
    settings = PreprocessSettings(image_size=16, context_length=8)
    reader = ShardReader(settings, rows_per_batch=4, count_cache=str(tmp_path / "cache"))
    out = _read(reader, pass_units(shards, 0))
    assert out["key"].tolist()[:5] == ["a", "b", "c", "d", "e"] and len(out["key"]) == 7
    reasons = [REJECT_REASONS[s] for s in out["status"]]
    assert reasons == ["ok", "no_caption", "no_image", "not_an_image", "ok", "truncated", "truncated"]
    rebatcher = Rebatcher(2)
    batches = list(
        rebatcher.add(
            {
                k: torch.from_numpy(v) if k != "key" else list(v)
                for k, v in {**out, "pass": np.zeros(7, np.int32)}.items()
            }
        )
    )
    assert [k for b in batches for k in b.keys] == ["a", "e"]
    assert rebatcher.rejected == {"no_caption": 1, "no_image": 1, "not_an_image": 1, "truncated": 2}
    # Counted from the cut tar itself (no stats): the samples before the cut, the last partial one dropped.
    (folder / "00000_stats.json").unlink()
    assert list_shards([str(folder)], count_cache=str(tmp_path / "cache"))[1][0].rows == 6


@pytest.mark.slow
def test_webdataset_stream_follows_the_parquet_order_and_resumes_at_the_same_position(twins, ray_local, tmp_path):
    def stream(folder, start):
        fs, shards = list_shards([str(folder)], count_cache=str(tmp_path))
        settings = StreamSettings(
            local_batch=8,
            preprocess=PreprocessSettings(image_size=16, context_length=8, seed=3),
            num_actors=1,
            cpus_per_actor=0.5,
            data_cpus=0.5,
            shuffle_rows=60,
        )
        return ShardStream(shards, fs, rank=0, world_size=2, seed=3, start=start, settings=settings, max_passes=2)

    tar = list(stream(twins / "wds", DataPosition(0, 0)))
    # Worker 0's passes 0 and 1 over the Parquet twin, read in this process without Ray.
    _, pq_shards = list_shards([str(twins / "parquet")])
    reader = ShardReader(PreprocessSettings(image_size=16, context_length=8, seed=3))
    expected = []
    for p in range(2):
        read = _read(reader, PassPlanner(pq_shards, seed=3, shuffle_rows=60, num_workers=2).units(p, 0))
        expected += [k for k, status in zip(read["key"].tolist(), read["status"]) if status == 0]
    keys = [k for b in tar for k in b.keys]
    assert keys == expected[: len(keys)] and len(expected) - len(keys) < 8 and len(tar) >= 8
    cut = 5
    rest = list(stream(twins / "wds", tar[cut - 1].position))
    assert [b.keys for b in rest] == [b.keys for b in tar[cut:]]
    torch.testing.assert_close(rest[0].images, tar[cut].images)


@pytest.mark.slow
def test_tar_shards_on_s3_are_listed_by_brace_range_and_read_like_local_ones(twins, tmp_path, monkeypatch):
    from storage import StorageConfig
    from tests.support.s3_server import S3TestServer

    _pieces(monkeypatch)
    with S3TestServer() as s3:
        s3.create_bucket("data")
        fs = s3.filesystem()
        for path in sorted((twins / "wds").iterdir())[:4]:  # 00000.tar, 00000_stats.json, 00001.tar, ...
            fs.put(str(path), f"data/wds/{path.name}")
        fs.put(str(twins / "wds" / "00002.tar"), "data/nostats/00002.tar")
        storage = StorageConfig(s3_endpoint_url=s3.endpoint_url, storage_options=s3.credentials)
        cache = str(tmp_path / "cache")
        s3_fs, shards = list_shards(
            ["s3://data/wds/{00000..00001}.tar", "s3://data/nostats"], storage, count_cache=cache
        )
        _, local = list_shards([str(twins / "wds" / "{00000..00002}.tar")], count_cache=cache)
        shards = sorted(shards, key=lambda s: s.path.rsplit("/", 1)[1])  # nostats/00002.tar sorts first
        assert [s.rows for s in shards] == [s.rows for s in local]
        # Remote: a tar counted here is pieced (the count's walk gave the offsets); one with
        # _stats.json is one piece (its offsets would cost a request per member).
        assert [s.row_groups for s in shards] == [(), (), (16, 16, 16)]
        reader = ShardReader(PreprocessSettings(image_size=8, context_length=8), s3_fs, count_cache=cache)
        local_reader = ShardReader(PreprocessSettings(image_size=8, context_length=8), count_cache=cache)
        remote = _read(reader, pass_units(shards, 0))  # file order: the pieces differ, the rows do not
        here = _read(local_reader, pass_units(local, 0))
        assert remote["key"].tolist() == here["key"].tolist()
        np.testing.assert_array_equal(remote["image"], here["image"])
