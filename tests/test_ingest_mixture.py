"""Weighted source mixing (`train.data: [{path, weight}]`): each source's share of the passes is its
weight, shards are used before they repeat, the pass plan is a pure function of the seed, and a
worker's stream resumes at the exact row (repeated shards included)."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from tests.support.train_shards import write_shards, write_webdataset_shards
from training.config import TrainConfig
from training.ingest import (
    DataPosition,
    PreprocessSettings,
    Shard,
    ShardReader,
    ShardStream,
    StreamSettings,
    list_training_shards,
    mix_pass,
    plan_fingerprint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_data_takes_paths_or_weighted_sources_but_not_both():
    cfg = TrainConfig(data=[{"path": "cc3m/shards", "weight": 1}, {"path": "cc12m/shards", "weight": 2.5}])
    assert cfg.source_weights == (1.0, 2.5) and TrainConfig(data=["a", "b"]).source_weights == ()
    with pytest.raises(ValidationError, match="train.data mixes plain paths and"):
        TrainConfig(data=["a", {"path": "b", "weight": 1}])
    with pytest.raises(ValidationError, match="weight"):
        TrainConfig(data=[{"path": "b", "weight": 0}])
    with pytest.raises(ValidationError, match="wieght"):
        TrainConfig(data=[{"path": "b", "wieght": 1}])


def test_each_source_gets_its_weight_of_every_pass_and_uses_all_its_shards_before_repeating():
    small = [Shard(f"a/{i}", 64, source=0) for i in range(3)]  # 192 rows
    large = [Shard(f"b/{i}", 50, source=1) for i in range(12)]  # 600 rows
    shards, weights = small + large, (1.0, 3.0)
    passes = [mix_pass(shards, weights, seed=4, pass_index=p) for p in range(12)]
    rows = Counter()
    for plan in passes:
        for s in plan:
            rows[s.source] += s.rows
    total = 792 * 12
    assert abs(rows[0] - total / 4) <= 64 and abs(rows[1] - 3 * total / 4) <= 50
    stream = [s.path for plan in passes for s in plan if s.source == 0]
    for start in range(0, len(stream) - 2, 3):  # the small source cycles through all 3 before repeating
        assert sorted(stream[start : start + 3]) == ["a/0", "a/1", "a/2"]
    assert passes[5] == mix_pass(shards, weights, seed=4, pass_index=5)
    assert passes[5] != mix_pass(shards, weights, seed=5, pass_index=5)
    assert mix_pass(shards, (), 4, 5) == shards  # plain paths: every shard once, as before
    assert plan_fingerprint(shards, 4, weights) != plan_fingerprint(shards, 4, (1.0, 2.0))


def test_weighted_sources_of_both_formats_stream_deterministically_and_resume_at_the_row(tmp_path):
    write_shards(tmp_path / "a", copies=1, rows_per_shard=40, side=16, row_group_size=40)
    write_webdataset_shards(tmp_path / "b", copies=1, rows_per_shard=40, side=16, split="val", seed=1)
    cfg = TrainConfig(data=[{"path": str(tmp_path / "a"), "weight": 3}, {"path": str(tmp_path / "b"), "weight": 1}])
    fs, shards = list_training_shards(cfg.data, cfg, count_cache=str(tmp_path / "cache"))
    assert {s.source for s in shards if s.path.endswith(".parquet")} == {0}
    assert {s.source for s in shards if s.path.endswith(".tar")} == {1}
    settings = StreamSettings(
        local_batch=8, preprocess=PreprocessSettings(image_size=8, context_length=8), source_weights=cfg.source_weights
    )
    stream = ShardStream(shards, fs, rank=1, world_size=2, seed=3, start=DataPosition(0, 0), settings=settings)
    units = stream.planner.units(2, 1)
    reader = ShardReader(PreprocessSettings(image_size=8, context_length=8), fs, rows_per_batch=32)

    def keys(units):
        return [k for u in units for part in reader.read(u) for k in part["key"]]

    whole = keys(units)
    assert {k.split("-")[0] for k in whole} <= {"train", "val"}
    source = {s.path: s.source for s in shards}
    rows = Counter()
    for window in stream.planner.windows(2):  # the whole pass, both workers: 3 : 1 within a shard
        for path, _, n in window.pieces:
            rows[source[path]] += n
    total = sum(s.rows for s in shards)
    assert abs(rows[0] - 0.75 * total) <= 40 and abs(rows[1] - 0.25 * total) <= 40
    assert keys(stream.planner.units(2, 1, start_row=61)) == whole[61:]
    again = ShardStream(shards, fs, rank=1, world_size=2, seed=3, start=DataPosition(0, 0), settings=settings)
    assert again.planner.units(2, 1) == units


def test_sweep_trials_get_weighted_sources_with_absolute_local_paths(tmp_path, monkeypatch):
    from training.config import ModelConfig
    from training.tune.runner import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    train = TrainConfig(data=[{"path": "cc3m/shards", "weight": 2}, {"path": "s3://b/cc12m", "weight": 1}])
    _, trial = absolute_local_paths(ModelConfig(), train)
    assert [(s.path, s.weight) for s in trial.data] == [(str(tmp_path / "cc3m" / "shards"), 2.0), ("s3://b/cc12m", 1.0)]
