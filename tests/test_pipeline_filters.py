"""Filters, dedup decisions, CLIP-score cut, resume fingerprints and the manifest invariant (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline.config import DataConfig, FiltersConfig
from pipeline.dedup import bucket_prefix_length, later_duplicates, pair_digests, with_bucket
from pipeline.filters import RowFilters, clip_score_cut
from pipeline.manifest import InvariantError, build_manifest, redacted_config
from pipeline.reasons import REASONS, is_known
from pipeline.resume import fingerprint, fingerprint_changes


def test_caption_filters_give_stable_reasons():
    f = RowFilters(FiltersConfig(min_caption_chars=5, max_caption_chars=30, min_caption_words=2, max_caption_words=4))
    cases = {
        ("a red car", True): None,
        ("", True): "caption_empty",
        ("   \t", True): "caption_empty",
        (None, False): "caption_not_text",
        ("bad \ufffd", False): "caption_not_text",
        ("abc", True): "caption_too_short",
        ("x" * 31, True): "caption_too_long",
        ("single", True): "caption_too_few_words",
        ("one two three four five", True): "caption_too_many_words",
    }
    for (caption, ok), reason in cases.items():
        got = f.caption(caption, ok)
        assert (got.reason if got else None) == reason, caption
        if got:
            assert got.stage == "filter" and got.detail


def test_caption_filters_can_be_turned_off():
    f = RowFilters(FiltersConfig(drop_empty_captions=False, drop_non_text_captions=False))
    assert f.caption("", True) is None
    assert f.caption(None, False) is None


def test_image_size_filters_use_the_original_size():
    f = RowFilters(FiltersConfig(min_image_side=64, max_aspect_ratio=3.0))
    assert f.image(64, 64) is None
    assert f.image(63, 500).reason == "too_small"
    assert f.image(400, 100).reason == "aspect_ratio"
    assert f.image(300, 100) is None


def test_later_duplicates_keep_the_first_row_by_key():
    table = pa.table({"key": ["0003", "0001", "0002", "0005", "0004"], "digest": ["b", "a", "b", "a", "c"]})
    dups = later_duplicates(table, "digest")
    assert sorted(zip(dups.column("key").to_pylist(), dups.column("first_key").to_pylist())) == [
        ("0003", "0002"),
        ("0005", "0001"),
    ]
    assert later_duplicates(table.slice(0, 0), "digest").num_rows == 0


def test_pair_digests_separate_url_and_caption():
    d = pair_digests(["http://a/1", "http://a/1", "http://a/1c"], ["xyz", "xyz", "xyz"]).to_pylist()
    assert d[0] == d[1] and d[0] != d[2]
    assert pair_digests(["ab"], ["c"]).to_pylist() != pair_digests(["a"], ["bc"]).to_pylist()


def test_dedup_buckets_split_by_digest_prefix():
    assert bucket_prefix_length(1000) == 1
    assert bucket_prefix_length(400_000_000) == 3
    t = with_bucket(pa.table({"key": ["1", "2"], "d": ["abc", "f00"]}), "d", 2)
    assert t.column("bucket").to_pylist() == ["ab", "f0"]


def test_clip_score_cut_threshold_and_top_fraction():
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])
    assert clip_score_cut(scores, 0.25, None) == 0.25
    assert clip_score_cut(scores, None, 0.5) == 0.5  # keeps 0.9, 0.7, 0.5
    assert (scores >= clip_score_cut(scores, None, 0.5)).sum() == 3
    assert clip_score_cut(scores, 0.25, 0.5) == 0.7  # 4 left above 0.25, keep the best 2
    assert clip_score_cut(np.array([]), None, 0.3) == float("inf")
    tied = np.array([0.5, 0.5, 0.5, 0.1])
    assert (tied >= clip_score_cut(tied, None, 0.25)).sum() == 3  # ties at the cut are all kept


def test_fingerprint_names_changed_keys_and_ignores_tuning_keys():
    a = DataConfig(input="x.tsv", output="o")
    b = DataConfig(input="x.tsv", output="o", timeout_s=99, threads_per_actor=3, num_download_actors=5)
    assert fingerprint(a) == fingerprint(b)
    c = DataConfig(input="x.tsv", output="o", image_size=128, filters=FiltersConfig(min_caption_chars=3))
    assert fingerprint_changes(fingerprint(a), fingerprint(c)) == [
        "data.filters.min_caption_chars: None -> 3",
        "data.image_size: 256 -> 128",
    ]


def test_config_rejects_impossible_values_with_the_key():
    with pytest.raises(ValidationError, match="min_caption_chars"):
        FiltersConfig(min_caption_chars=10, max_caption_chars=5)
    with pytest.raises(ValidationError, match="compression level"):
        DataConfig(encode_format="png", encode_quality=95)
    with pytest.raises(ValidationError, match="threshold"):
        FiltersConfig(clip_score={"model": "m"})
    with pytest.raises(ValidationError, match="clash"):
        DataConfig(extra_cols=["sha256"])


def test_manifest_counts_every_row_and_checks_the_invariant():
    data = DataConfig(
        input="x",
        output="o",
        storage_options={"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://h"}},
    )
    shards = [{"name": "00000", "rows": 3}, {"name": "00001", "rows": 2}]
    download = {
        "00000": {
            "rows": 3,
            "accepted": 2,
            "rejected": 1,
            "reasons": {"http_404": 1},
            "stages": {"download": 1},
            "accepted_file": "shards/00000.parquet",
            "accepted_bytes": 10,
            "rejects_file": "rejects/00000.parquet",
        },
        "00001": {
            "rows": 2,
            "accepted": 0,
            "rejected": 2,
            "reasons": {"timeout": 1, "http_404": 1},
            "stages": {"download": 2},
            "accepted_file": None,
            "accepted_bytes": 0,
            "rejects_file": "rejects/00001.parquet",
        },
    }
    m = build_manifest(data, shards, download, None, 1.5, {"images_per_s": 1.0})
    assert (m["input_rows"], m["accepted"], m["rejected"]) == (5, 2, 3)
    assert m["reasons"] == {"http_404": 2, "timeout": 1}
    assert m["shards"] == [{"path": "shards/00000.parquet", "rows": 2, "bytes": 10}]
    assert m["config"]["storage_options"] == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "http://h"},
    }
    download["00001"]["rejected"] = 1
    with pytest.raises(InvariantError):
        build_manifest(data, shards, download, None, 1.5, {})
    assert "s3cr3t" not in str(redacted_config(data))


def test_every_reason_has_a_stage():
    for stage, meaning in REASONS.values():
        assert stage in ("download", "decode", "filter", "dedup") and meaning
    assert REASONS["malformed_row"][0] == "filter"
    assert is_known("http_418") and not is_known("http_x")


def test_global_pass_rewrites_a_shard_idempotently(tmp_path):
    """Applying the decisions twice (a resumed global pass) gives the same files, and a stale
    file from an interrupted attempt does not survive."""
    import pyarrow.parquet as pq

    from pipeline.global_pass import DUPLICATE_SCHEMA, apply_to_shard
    from pipeline.resume import ShardSpec
    from pipeline.shards import accepted_schema
    from storage import Folder

    out = Folder(str(tmp_path))
    spec = ShardSpec(
        id=3, name="00003", input="_work/input/x.arrow", rows=4, source="x", first_row=0, row_digits=1, global_pass=True
    )
    keys = ["000030", "000031", "000032", "000033"]
    table = pa.table(
        {
            "key": keys,
            "url": [f"http://a/{i}" for i in range(4)],
            "caption": list("abcd"),
            "jpg": [b"1", b"2", b"3", b"4"],
            "width": [1] * 4,
            "height": [1] * 4,
            "original_width": [1] * 4,
            "original_height": [1] * 4,
            "sha256": list("wxyz"),
        },
        schema=accepted_schema(pa.schema([])),
    )
    out.write_parquet(spec.accepted_file, table)
    out.write_parquet(spec.score_file, pa.table({"key": keys, "score": pa.array([0.9, 0.1, 0.5, 0.7], pa.float32())}))
    dups = pa.table({"key": ["000033"], "first_key": ["000010"], "by": ["image sha256"]}, schema=DUPLICATE_SCHEMA)
    out.write_bytes(spec.global_rejects_file, b"stale")  # left by a killed attempt

    first = apply_to_shard(spec, out, 0.4, "threshold 0.4", dups)
    files = {n: out.read_bytes(n) for n in (spec.final_file, spec.global_rejects_file)}
    second = apply_to_shard(spec, out, 0.4, "threshold 0.4", dups)
    assert {n: out.read_bytes(n) for n in files} == files
    assert {k: v for k, v in first.items() if k != "duration_s"} == {
        k: v for k, v in second.items() if k != "duration_s"
    }
    assert (first["accepted"], first["rejected"], first["reasons"]) == (2, 2, {"clip_score": 1, "duplicate": 1})
    assert pq.read_table(tmp_path / spec.final_file).column("key").to_pylist() == ["000030", "000032"]
    rejects = pq.read_table(tmp_path / spec.global_rejects_file).to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in rejects] == [
        ("000031", "filter", "clip_score"),
        ("000033", "dedup", "duplicate"),
    ]
    assert rejects[1]["detail"] == "same image sha256 as key 000010"
