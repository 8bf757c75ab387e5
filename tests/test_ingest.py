"""Training ingest: shard listing, the per-pass plan, preprocessing, exact re-batching with data
positions, and the Ray Data stream (order = plan, resume = the exact remainder)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.support.train_shards import write_shards
from training.ingest import (
    REJECT_REASONS,
    DataPosition,
    Preprocess,
    PreprocessSettings,
    Rebatcher,
    Shard,
    ShardReader,
    ShardStream,
    StreamSettings,
    crop_box,
    list_shards,
    PassPlanner,
    pass_units,
    plan_fingerprint,
    split_rows,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, copies=1, rows_per_shard=64, side=64, corrupt_keys={"train-00005", "train-00130"})
    return folder


def test_list_shards_counts_rows_from_footers_in_path_order(shards_dir):
    _, shards = list_shards([str(shards_dir)])
    assert [s.path.rsplit("/", 1)[1] for s in shards] == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
        "00003.parquet",
        "00004.parquet",
    ]
    assert [s.rows for s in shards] == [64, 64, 64, 64, 44]
    assert shards[0].row_groups == (64,)
    _, globbed = list_shards([str(shards_dir / "0000[01].parquet")])
    assert [s.rows for s in globbed] == [64, 64]


def test_list_shards_names_the_bad_location_or_column(tmp_path, shards_dir):
    with pytest.raises(FileNotFoundError, match="train.data: .*nowhere does not exist"):
        list_shards([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no .parquet or .tar shard"):
        list_shards([str(tmp_path / "empty")])
    pq.write_table(pa.table({"key": ["a"], "text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet lacks column\(s\) caption, jpg \(has: key, text\)"):
        list_shards([str(tmp_path / "bad.parquet")])
    with pytest.raises(ValueError, match="train.data is empty"):
        list_shards([])


def test_the_plan_fingerprint_names_the_data_not_the_worker_count():
    shards = [Shard(f"f{i}", rows) for i, rows in enumerate([100, 90, 80])]
    same = plan_fingerprint(shards, 1, shuffle_rows=4096)
    assert same == plan_fingerprint(list(shards), 1, shuffle_rows=4096)
    assert same != plan_fingerprint(shards, 2, shuffle_rows=4096)  # seed
    assert same != plan_fingerprint(shards, 1, shuffle_rows=100)  # other windows
    assert same != plan_fingerprint([Shard("f0", 100, (50, 50)), *shards[1:]], 1, shuffle_rows=4096)  # row groups


def test_random_crop_depends_on_pass_and_key_and_stays_inside_the_image():
    settings = PreprocessSettings(image_size=32, crop_scale_min=0.5)
    boxes = {crop_box(f"k{i}", 100, 60, settings, 0) for i in range(50)}
    assert len(boxes) > 40
    for x, y, side in boxes:
        assert 0 <= x and x + side <= 100 and 0 <= y and y + side <= 60
        assert round(60 * 0.5**0.5) - 1 <= side <= 60
    assert crop_box("k1", 100, 60, settings, 0) == crop_box("k1", 100, 60, settings, 0)
    assert crop_box("k1", 100, 60, settings, 0) != crop_box("k1", 100, 60, settings, 1)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_preprocess_decodes_crops_resizes_tokenizes_and_flags_bad_rows():
    left_red = np.zeros((48, 96, 3), dtype=np.uint8)
    left_red[:, :48] = (255, 0, 0)
    left_red[:, 48:] = (0, 0, 255)
    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "caption": np.array(["a red and blue picture", None, "x"], dtype=object),
        "jpg": np.array([_jpeg(left_red), b"garbage", None], dtype=object),
    }
    for decoder in ("cv2", "pil"):
        out = Preprocess(PreprocessSettings(image_size=24, context_length=16, train=False, decoder=decoder))(batch)
        assert out["image"].shape == (3, 24, 24, 3) and out["image"].dtype == np.uint8
        assert out["tokens"].shape == (3, 16) and out["tokens"].dtype == np.int32
        assert [REJECT_REASONS[s] for s in out["status"]] == ["ok", "not_an_image", "no_image"]
        # Centre crop of a red|blue image: red on the left half, blue on the right (RGB order).
        img = out["image"][0].astype(int)
        assert img[:, :10, 0].mean() > 200 and img[:, :10, 2].mean() < 60
        assert img[:, -10:, 2].mean() > 200 and img[:, -10:, 0].mean() < 60
        assert out["tokens"][0, 0] == 49406 and 49407 in out["tokens"][0]
        assert out["tokens"][1, 1] == 49407  # a missing caption tokenizes as empty text


def _rows(n: int, start: int, bad=(), pass_index=0):
    status = torch.zeros(n, dtype=torch.uint8)
    for i in bad:
        status[i - start] = 1
    ids = torch.arange(start, start + n)
    return {
        "image": ids.view(n, 1, 1, 1).expand(n, 2, 2, 3).to(torch.uint8),
        "tokens": ids.view(n, 1).int(),
        "status": status,
        "key": [f"p{pass_index}r{i}" for i in ids.tolist()],
        "pass": torch.full((n,), pass_index, dtype=torch.int32),
        "row": ids,
    }


def test_rebatcher_yields_exact_batches_without_rejected_rows_and_tracks_position():
    rb = Rebatcher(4)
    out = rb.add(_rows(6, 0, bad=(2,)))  # rows 0..5, row 2 rejected
    assert [b.keys for b in out] == [["p0r0", "p0r1", "p0r3", "p0r4"]]
    assert out[0].position == DataPosition(0, 5)
    out = rb.add(_rows(5, 6))
    assert [b.keys for b in out] == [["p0r5", "p0r6", "p0r7", "p0r8"]]
    assert out[0].position == DataPosition(0, 9)
    out = rb.add(_rows(3, 0, pass_index=1))
    assert [b.keys for b in out] == [["p0r9", "p0r10", "p1r0", "p1r1"]]  # spans the pass boundary
    assert out[0].position == DataPosition(1, 2)
    assert out[0].tokens.flatten().tolist() == [9, 10, 0, 1]
    assert rb.rejected == Counter({"not_an_image": 1})
    out = rb.add(_rows(4, 50, pass_index=2))
    assert [b.keys for b in out] == [["p1r2", "p2r50", "p2r51", "p2r52"]]
    # Nothing buffered and a clean full batch: handed on as is, without a copy.
    part = _rows(4, 7)
    assert Rebatcher(4).add(part)[0].images is part["image"]


def test_pass_units_cover_rows_by_row_group_from_any_start():
    import json

    files = [Shard("a", 10, (4, 6)), Shard("b", 5, (5,))]
    units = pass_units(files, 3, start_row=6)
    assert [(json.loads(u["pieces"]), u["row"], u["skip"], u["take"]) for u in units] == [
        ([["a", 1, 6]], 6, 2, 4),
        ([["b", 0, 5]], 10, 0, 5),
    ]
    assert not any(u["shuffle"] for u in units)
    units = pass_units(files, 0, 2, 5)
    assert [(json.loads(u["pieces"]), u["skip"], u["take"]) for u in units] == [
        ([["a", 0, 4]], 2, 2),
        ([["a", 1, 6]], 0, 1),
    ]
    # Shuffle windows gather whole row groups until they hold window_rows rows; a window's order
    # is keyed by its first row ("perm").
    windows = pass_units(files, 1, window_rows=8, seed=5)
    assert [(json.loads(u["pieces"]), u["row"], u["perm"], u["take"]) for u in windows] == [
        ([["a", 0, 4], ["a", 1, 6]], 0, 0, 10),
        ([["b", 0, 5]], 10, 10, 5),
    ]
    assert all(u["shuffle"] and u["seed"] == 5 and u["pass"] == 1 for u in windows)


def test_split_rows_gives_each_worker_a_contiguous_share():
    import json

    shards = [Shard("a", 5), Shard("b", 3), Shard("c", 4)]
    shares = [split_rows(shards, r, 2) for r in range(2)]
    assert [(json.loads(u["pieces"])[0][0], u["skip"], u["take"]) for u in shares[0]] == [("a", 0, 5), ("b", 0, 1)]
    assert [(json.loads(u["pieces"])[0][0], u["skip"], u["take"]) for u in shares[1]] == [("b", 1, 2), ("c", 0, 4)]


def _keys_of(reader, units):
    return [k for u in units for part in reader.read(u) for k in part["key"]]


def test_shard_reader_reads_a_unit_from_its_row_and_tags_pass_and_row(shards_dir):
    _, shards = list_shards([str(shards_dir)])
    reader = ShardReader(PreprocessSettings(image_size=16, context_length=8, seed=1), rows_per_batch=10)
    unit = pass_units(shards[:1], 4, start_row=3, stop_row=28)[0]
    parts = list(reader({k: np.array([v], dtype=object) for k, v in unit.items()}))
    keys = [k for p in parts for k in p["key"]]
    expected = pq.read_table(shards[0].path, columns=["key"])["key"].to_pylist()[3:28]
    assert keys == expected
    assert np.concatenate([p["row"] for p in parts]).tolist() == list(range(3, 28))
    assert {int(x) for p in parts for x in p["pass"]} == {4}
    assert all(p["image"].shape[1:] == (16, 16, 3) for p in parts)


def test_shuffle_windows_mix_files_deterministically_and_resume_inside_a_window(shards_dir):
    _, shards = list_shards([str(shards_dir)])
    reader = ShardReader(PreprocessSettings(image_size=8, context_length=8), rows_per_batch=50)
    units = pass_units(shards, 0, window_rows=128, seed=2)
    keys = _keys_of(reader, units)
    in_order = [k for s in shards for k in pq.read_table(s.path, columns=["key"])["key"].to_pylist()]
    assert sorted(keys) == sorted(in_order) and keys != in_order
    assert len({int(k.split("-")[1]) // 64 for k in keys[:16]}) > 1  # a batch spans several row groups
    assert keys == _keys_of(reader, pass_units(shards, 0, window_rows=128, seed=2))
    assert keys != _keys_of(reader, pass_units(shards, 1, window_rows=128, seed=2))
    assert _keys_of(reader, pass_units(shards, 0, start_row=150, window_rows=128, seed=2)) == keys[150:]


# --------------------------------------------------------------------------------- Ray Data stream
def _stream(shards_dir, start, rank=0, world=2, max_passes=2):
    fs, shards = list_shards([str(shards_dir)])
    settings = StreamSettings(
        local_batch=16,
        preprocess=PreprocessSettings(image_size=32, seed=3),
        num_actors=1,
        cpus_per_actor=0.5,
        data_cpus=0.5,
        shuffle_rows=100,
    )
    return ShardStream(
        shards, fs, rank=rank, world_size=world, seed=3, start=start, settings=settings, max_passes=max_passes
    ), shards


@pytest.mark.slow
def test_stream_follows_the_plan_and_a_resume_continues_with_the_exact_remainder(shards_dir, ray_local):
    stream, shards = _stream(shards_dir, DataPosition(0, 0))
    batches = list(stream)
    keys = [k for b in batches for k in b.keys]
    # The same units read in this process, without Ray: worker 0's passes 0 and 1.
    reader = ShardReader(PreprocessSettings(image_size=32, seed=3))
    expected = []
    planner = PassPlanner(shards, seed=3, shuffle_rows=100, num_workers=2)
    for p in range(2):
        units = planner.units(p, 0)
        expected += [k for k in _keys_of(reader, units) if k not in ("train-00005", "train-00130")]
    assert keys == expected[: len(keys)] and len(expected) - len(keys) < 16
    assert all(b.images.shape == (16, 32, 32, 3) and b.images.dtype == torch.uint8 for b in batches)
    assert stream.rebatcher.rejected["not_an_image"] >= 1

    # Resume after batch 7 (inside a shuffle window): the rest is identical, crops included.
    cut = 7
    resumed, _ = _stream(shards_dir, batches[cut - 1].position)
    rest = list(resumed)
    assert [k for b in rest for k in b.keys] == keys[cut * 16 :]
    torch.testing.assert_close(rest[0].images, batches[cut].images)
