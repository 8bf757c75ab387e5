"""A real sweep on the session's local Ray: Ray Tune runs one Ray Train run per trial on demo-style
shards; ASHA stops a trailing trial (and its TorchTrainer: no placement group outlives it); an
impossible width fails its trials without failing the sweep; results.csv, best.json and sweep.png
are written, and `clipray train --config best.json` trains the winner.

Four trials: temperature_init 0.5 / 0.01 (learn_temperature off) x width_mult 1 / 4096, one at a
time in grid order, so the T=0.01 trial (whose logits are 100x cosine similarity: a far higher
loss after two steps) reaches ASHA's rung after the T=0.5 trial recorded its value there: it is
stopped, deterministically (the sweep ranks by `val_loss` here for that reason; the default
metric, retrieval recall, would not separate two-step models). Width 4096 turns ViT-Tiny into a ~10^13-parameter model, which the
trial refuses before allocating anything. (The 6-trial acceptance sweep on the demo shards, with
trials side by side, is `benchmarks/tune_demo.py`.)
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from clipray.cli import main as clipray_main
from clipray.config import load_config
from tests.support.train_shards import write_shards

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune-shards")
    write_shards(root / "train", copies=1, rows_per_shard=150, side=64)
    write_shards(root / "val", copies=1, rows_per_shard=300, side=64, split="heldout", seed=1)
    return {"train": root / "train", "val": root / "val"}


@pytest.mark.heavy
def test_sweep_stops_a_trailing_trial_reports_failures_and_its_best_config_trains(ray_local, shards, tmp_path, capsys):
    from training.tune import run_sweep

    sweeps = tmp_path / "sweeps"
    cfg = load_config(
        overrides=[
            "model.name=ViT-Tiny",
            f"train.data=[{shards['train']}]",
            f"train.val_data=[{shards['val']}]",
            "train.batch_size=16",
            "train.samples=64",
            "train.val_every=2",
            "train.log_every=1",
            "train.checkpoint_every=4",
            "train.warmup=1",
            "train.lr=0.0005",
            "train.num_workers=1",
            "tune.temperature_init=[0.5, 0.01]",
            "tune.learn_temperature=[false]",
            "tune.metric=val_loss",  # its temperature dependence makes the ASHA stop below deterministic
            "tune.width_mult=[1, 4096]",
            "tune.grace_period=32",
            "tune.reduction_factor=2",
            "tune.max_concurrent_trials=1",
            f"tune.storage_path={sweeps}",
            "tune.name=t",
        ]
    )
    pgs_before = set(ray_local.util.placement_group_table())

    summary = run_sweep(cfg.model, cfg.train, cfg.tune)

    sweep = sweeps / "t"
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert len(rows) == 4
    by_config = {(float(r["temperature_init"]), float(r["width_mult"])): r for r in rows}
    assert set(by_config) == {(t, w) for t in (0.5, 0.01) for w in (1.0, 4096.0)}

    for t in (0.5, 0.01):  # the impossible width: failed, with the reason, and nothing trained
        failed = by_config[(t, 4096.0)]
        assert failed["status"] == "failed", failed
        assert "MemoryError" in failed["stop_reason"] and "width_mult=4096" in failed["stop_reason"]
        assert failed["final_val_loss"] == "" and not (Path(failed["run_dir"]) / "metrics.jsonl").exists()

    stopped = by_config[(0.01, 1.0)]
    assert stopped["status"] == "early_stopped", rows
    assert stopped["stop_reason"].startswith("stopped by ASHA at 32 samples")
    assert int(stopped["steps"]) < 4 and not (Path(stopped["run_dir"]) / "final").exists()

    best = by_config[(0.5, 1.0)]  # the first trial reaching a rung always goes on
    assert best["status"] == "completed", rows
    assert int(best["steps"]) == 4 and int(best["samples_seen"]) == 64
    assert (Path(best["run_dir"]) / "final" / "model.safetensors").exists()
    assert float(best["final_val_loss"]) < float(stopped["final_val_loss"])
    metrics = [json.loads(line) for line in (Path(best["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]
    assert rows[0]["trial_id"] == best["trial_id"] and summary["best"]["trial_id"] == best["trial_id"]
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "warning: that trial will fail" not in out  # warnings go to stderr
    assert f"*1    {best['trial_id']}" in out and "failed" in out and "early stopped" in out

    # Stopping trials stopped their TorchTrainers: every placement group the sweep made is gone
    # and the cluster's CPUs are all free again.
    def released():
        table = ray_local.util.placement_group_table()
        new = {pg: info for pg, info in table.items() if pg not in pgs_before}
        cpus = ray_local.available_resources().get("CPU", 0.0)
        return (
            new
            and all(info["state"] == "REMOVED" for info in new.values())
            and cpus == ray_local.cluster_resources()["CPU"]
        )

    _wait_for(released, 60, "the sweep's placement groups to be removed and CPUs freed")

    # best.json is a job config `clipray train` runs as it is (here for a few samples).
    best_config = load_config(sweep / "best.json")
    assert best_config.train.temperature_init == float(best["temperature_init"])
    assert best_config.train.learn_temperature is False and best_config.model.width_mult == 1.0
    rc = clipray_main(
        [
            "train",
            "--config",
            str(sweep / "best.json"),
            "--set",
            "train.samples=32",
            "--set",
            f"train.storage_path={tmp_path / 'runs'}",
        ]
    )
    assert rc == 0
    final = tmp_path / "runs" / "t-best" / "final"
    assert (final / "model.safetensors").exists()
    assert json.loads((final / "model_config.json").read_text())["vision_cfg"]["width"] == 128
