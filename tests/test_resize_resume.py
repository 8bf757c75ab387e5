"""A run resumed on another number of workers (issue: world-size-independent data position).

Fast: `worker.start_position` keeps a checkpoint's positions for a group of the same size, deals
what is left of the passes begun to a group of another size, and starts the next pass when the data
changed. Heavy (Ray Train, 4 and 2 CPU workers): a run killed mid-pass on 4 workers resumes on 2
(and 2 -> 4) and ends with the step count, learning rates and samples of an uninterrupted run; the
per-sample log (`CLIPRAY_TEST_SAMPLE_LOG`) shows every sample of each finished pass exactly once.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.train_runs import WorkerKiller, local_checkpoint, rows, trained_samples
from tests.support.train_shards import write_shards
from training.config import ModelConfig, TrainConfig
from training.ingest import DataPosition, PassPlanner, Shard
from training.worker import Placement, start_position

SHARDS = tuple(Shard(f"s{i}.parquet", 64, (16, 16, 16, 16)) for i in range(4))


def _plan(plan_id="p1"):
    train = SimpleNamespace(seed=3, shuffle_rows=32, source_weights=())
    return SimpleNamespace(shards=SHARDS, train=train, plan_id=plan_id)


def _place(rank, world):
    return Placement(rank, world, None, 32 // world)


def _saved(positions, bases=None):
    return {
        "step": 5,
        "plan": "p1",
        "world_size": len(positions),
        "positions": [{"pass": p, "rows": r} for p, r in positions],
        "bases": bases or {},
    }


def test_the_same_group_size_keeps_every_workers_position_and_basis():
    planner = PassPlanner(SHARDS, seed=3, shuffle_rows=32, num_workers=2)
    bases = {1: {0: 32, 3: 5}}
    saved = _saved([(1, 40), (2, 7)], planner.encode(bases))
    assert start_position(_plan(), saved, _place(1, 2)) == (DataPosition(2, 7), 5, bases)


def test_another_group_size_is_dealt_what_is_left_and_changed_data_starts_the_next_pass():
    saved = _saved([(0, 40), (0, 24), (1, 8), (0, 64)])
    starts = [start_position(_plan(), saved, _place(r, 2)) for r in range(2)]
    assert starts[0] == starts[1]
    position, step, bases = starts[0]
    assert position == DataPosition(0, 0) and step == 5
    old = PassPlanner(SHARDS, seed=3, shuffle_rows=32, num_workers=4)
    assert sum(bases[0].values()) == 40 + 24 + old.remaining(0, {}) // 4 + 64  # rank 2 finished its pass 0
    assert sum(bases[1].values()) == 8
    # Another plan id (other shards, seed, weights or windows): a fresh pass after the last one begun.
    assert start_position(_plan("p2"), saved, _place(0, 2)) == (DataPosition(2, 0), 5, {})


# ------------------------------------------------------------------------------ end to end, heavy
MODEL = ModelConfig(name="ViT-Tiny", width_mult=0.5)
BATCH = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("resize-data")
    paths = write_shards(root / "shards", copies=1, rows_per_shard=64, side=64, row_group_size=16)
    import pyarrow.parquet as pq

    return root / "shards", sum(pq.read_metadata(p).num_rows for p in paths)


def _config(data: Path, storage: Path, name: str, workers: int, pass_rows: int, **overrides) -> TrainConfig:
    values = dict(
        data=[str(data)],
        storage_path=str(storage),
        name=name,
        num_workers=workers,
        cpus_per_worker=0.5,
        batch_size=BATCH,
        # Three passes' worth: workers drift apart by up to a window per pass (the deal balances
        # rows by whole windows), so passes 0 and 1 are complete by the end whatever the deal.
        samples=3 * pass_rows,
        lr=1e-3,
        warmup=2,
        checkpoint_every=4,
        keep_checkpoints=2,
        log_every=2,
        num_preprocess_actors=1,
        preprocess_cpus=0.25,
        shuffle_rows=32,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _check_passes(records: list[dict], run_dir: Path, total_steps: int, pass_rows: int) -> Counter:
    assert sorted({r["step"] for r in records}) == list(range(1, total_steps + 1))
    for step in range(1, total_steps + 1):
        assert sum(len(r["keys"]) for r in records if r["step"] == step) == BATCH
    seen = Counter((p, k) for r in records for p, k in zip(r["passes"], r["keys"]))
    assert max(seen.values()) == 1, [x for x, n in seen.items() if n > 1][:5]  # no sample twice in a pass
    per_pass = Counter(p for p, _ in seen)
    assert per_pass[0] == per_pass[1] == pass_rows  # passes 0 and 1: every sample exactly once
    # The last checkpoint's world-size-independent count of each pass's consumed samples agrees.
    saved = json.loads((run_dir / f"checkpoint_{total_steps:09d}" / "data_position.json").read_text())
    assert {int(q): n for q, n in saved["consumed"].items()} == {
        q: n for q, n in per_pass.items() if q >= min(map(int, saved["consumed"]))
    }
    return seen


def _run(cfg: TrainConfig, log_dir: Path, monkeypatch):
    from training.driver import run_training
    from training.worker import SAMPLE_LOG_ENV

    log_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(log_dir))
    return run_training(MODEL, cfg)


@pytest.fixture(scope="module")
def uninterrupted(shards, ray_local, tmp_path_factory):
    data, pass_rows = shards
    storage = tmp_path_factory.mktemp("resize-runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _run(_config(data, storage, "straight", 4, pass_rows), storage / "log-straight", monkeypatch)
    return storage / "straight", trained_samples(storage / "log-straight")


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)])
def test_a_run_killed_mid_pass_resumes_on_another_number_of_workers_like_an_uninterrupted_run(
    before, after, shards, uninterrupted, ray_local, tmp_path, monkeypatch
):
    import ray.train

    data, pass_rows = shards
    ref_dir, ref_records = uninterrupted
    name, log_dir = "resized", tmp_path / "log"
    total = _config(data, tmp_path, name, before, pass_rows).total_steps
    run_dir = tmp_path / name
    with WorkerKiller(lambda: rows(run_dir), local_checkpoint(run_dir), min_step=4, rank=before - 1) as killer:
        with pytest.raises(ray.train.TrainingFailedError):
            _run(_config(data, tmp_path, name, before, pass_rows, max_failures=0), log_dir, monkeypatch)
    assert killer.killed_at is not None and killer.killed_at < total
    result = _run(_config(data, tmp_path, name, after, pass_rows), log_dir, monkeypatch)
    table, ref = rows(run_dir), rows(ref_dir)
    assert result.metrics["step"] == total and table[-1]["restored_from_step"] >= 4
    assert [r["step"] for r in table] == [r["step"] for r in ref]
    assert [r["lr"] for r in table] == pytest.approx([r["lr"] for r in ref], rel=1e-9)
    assert [r["samples_seen"] for r in table] == [r["samples_seen"] for r in ref]
    records = trained_samples(log_dir)
    assert {r["world_size"] for r in records} == {before, after}  # both groups trained
    seen = _check_passes(records, run_dir, total, pass_rows)
    ref_seen = _check_passes(ref_records, ref_dir, total, pass_rows)
    for p in (0, 1):  # the same samples as the uninterrupted run in every finished pass
        assert {k for q, k in seen if q == p} == {k for q, k in ref_seen if q == p}
