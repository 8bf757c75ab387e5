"""Sweep outputs from trial records: results.csv rows, the winner, best.json, the table, sweep.png."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from clipray.config import load_config
from training.config import ModelConfig, TrainConfig
from training.tune.plots import heat_maps, plot_sweep
from training.tune.results import (
    TrialRecord,
    best_config,
    best_json,
    format_table,
    results_csv,
    status_of,
    summarise,
    winner,
)


def _history(values, every=640):
    return [{"samples_seen": every * (i + 1), "step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(values)]


def _records():
    return [
        TrialRecord(
            "t_00000",
            {"width_mult": 0.5, "temperature_init": 0.03},
            _history([3.0, 2.6, 2.4, 2.3, 2.2]),
            completed=True,
            steps=50,
            samples_seen=3200,
            run_dir="/s/runs/t_00000",
        ),
        TrialRecord(
            "t_00001",
            {"width_mult": 1.0, "temperature_init": 0.03},
            _history([3.0, 2.5, 2.1, 1.9, 1.8]),
            completed=True,
            steps=50,
            samples_seen=3200,
            run_dir="/s/runs/t_00001",
        ),
        # Stopped early at a better-looking value than the winner's final one: must not win.
        TrialRecord(
            "t_00002",
            {"width_mult": 2.0, "temperature_init": 0.03},
            _history([1.7]),
            completed=False,
            steps=12,
            samples_seen=768,
            run_dir="/s/runs/t_00002",
        ),
        TrialRecord(
            "t_00003",
            {"width_mult": 0.5, "temperature_init": 0.1},
            _history([3.2, 3.1]),
            completed=False,
            steps=22,
            samples_seen=1408,
            run_dir="/s/runs/t_00003",
        ),
        TrialRecord(
            "t_00004",
            {"width_mult": 1e6, "temperature_init": 0.1},
            [],
            error="MemoryError: model.width_mult=1e+06 makes ViT-Tiny a ...",
            run_dir="/s/runs/t_00004",
        ),
    ]


def test_each_trial_gets_status_and_stop_reason():
    records = _records()
    assert status_of(records[1], early_stopping=True) == ("completed", "trained to the budget (3200 samples)")
    status, reason = status_of(records[2], early_stopping=True)
    assert status == "early_stopped" and "ASHA at 640 samples" in reason
    status, reason = status_of(records[4], early_stopping=True)
    assert status == "failed" and reason.startswith("failed: MemoryError: model.width_mult")
    assert status_of(records[3], early_stopping=False)[0] == "incomplete"
    assert status_of(TrialRecord("x", {}), early_stopping=True)[0] == "incomplete"


def test_rows_rank_completed_trials_by_final_metric_and_failed_last():
    rows = summarise(_records(), "val_loss", "min")
    assert [r["trial_id"] for r in rows] == ["t_00001", "t_00000", "t_00002", "t_00003", "t_00004"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    best = winner(rows, "val_loss")
    assert best["trial_id"] == "t_00001"
    assert best["final_val_loss"] == 1.8 and best["best_val_loss"] == 1.8
    assert rows[3]["final_val_loss"] == 3.1 and rows[3]["best_val_loss"] == 3.1
    assert rows[4]["final_val_loss"] is None and rows[4]["status"] == "failed"


def test_max_mode_ranks_the_highest_metric_first():
    records = [
        TrialRecord("a", {"width_mult": 1.0}, [{"samples_seen": 10, "acc1": 0.4}], completed=True),
        TrialRecord(
            "b",
            {"width_mult": 2.0},
            [{"samples_seen": 10, "acc1": 0.9}, {"samples_seen": 20, "acc1": 0.6}],
            completed=True,
        ),
    ]
    rows = summarise(records, "acc1", "max")
    assert [r["trial_id"] for r in rows] == ["b", "a"]
    assert rows[0]["final_acc1"] == 0.6 and rows[0]["best_acc1"] == 0.9


def test_without_completed_trials_the_best_reported_value_wins():
    records = [
        TrialRecord("a", {}, _history([2.0]), completed=False),
        TrialRecord("b", {}, _history([1.5]), completed=False),
        TrialRecord("c", {}, [], error="RuntimeError: boom"),
    ]
    rows = summarise(records, "val_loss", "min")
    assert winner(rows, "val_loss")["trial_id"] == "b"
    assert winner(summarise(records[2:], "val_loss", "min"), "val_loss") is None


def test_results_csv_has_one_row_per_trial_with_config_metrics_and_progress():
    text = results_csv(summarise(_records(), "val_loss", "min"), "val_loss")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 5
    assert list(rows[0]) == [
        "rank",
        "trial_id",
        "status",
        "stop_reason",
        "temperature_init",
        "width_mult",
        "final_val_loss",
        "best_val_loss",
        "steps",
        "samples_seen",
        "run_dir",
    ]
    first = rows[0]
    assert (first["trial_id"], first["status"], first["width_mult"], first["temperature_init"]) == (
        "t_00001",
        "completed",
        "1.0",
        "0.03",
    )
    assert float(first["final_val_loss"]) == 1.8 and first["steps"] == "50" and first["samples_seen"] == "3200"
    failed = rows[-1]
    assert failed["status"] == "failed" and failed["final_val_loss"] == "" and "MemoryError" in failed["stop_reason"]


def test_best_json_is_a_job_config_that_clipray_train_accepts(tmp_path):
    model = ModelConfig(name="ViT-Tiny")
    train = TrainConfig(
        data=["demo-run/pipeline/train/shards"],
        batch_size=64,
        samples=3200,
        storage_path="runs",
        name="demo",
        temperature_init=0.07,
    )
    best = winner(summarise(_records(), "val_loss", "min"), "val_loss")
    fragment = best_config(best, model, train, name="tune-demo-best")
    path = tmp_path / "best.json"
    path.write_text(best_json(fragment))
    assert set(json.loads(path.read_text())) == {"model", "train"}
    cfg = load_config(path, ["train.samples=128"])
    assert cfg.model.name == "ViT-Tiny" and cfg.model.width_mult == 1.0
    assert cfg.train.temperature_init == 0.03
    assert (cfg.train.storage_path, cfg.train.name, cfg.train.samples) == ("runs", "tune-demo-best", 128)
    assert cfg.train.data == ["demo-run/pipeline/train/shards"] and cfg.train.batch_size == 64


def test_summary_table_marks_the_winner_and_counts_outcomes():
    rows = summarise(_records(), "val_loss", "min")
    table = format_table(rows, "val_loss")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["rank", "trial_id", "status"]
    assert lines[2].startswith("*1") and "t_00001" in lines[2] and "1.8" in lines[2]
    assert lines[-1] == "2 completed, 2 early stopped, 1 failed"


def test_heat_map_holds_each_cells_final_metric_and_marks_stopped_and_failed_cells():
    rows = summarise(_records(), "val_loss", "min")
    (hm,) = heat_maps(rows, "val_loss", "min", base_temperature=0.07, base_width=1.0, base_learn=True)
    assert hm.temps == ["0.03", "0.1"] and hm.widths == ["0.5", "1", "2", "1e+06"]
    expected = np.array([[2.2, 1.8, 1.7, np.nan], [3.1, np.nan, np.nan, np.nan]])
    np.testing.assert_allclose(hm.values, expected)
    assert hm.notes.tolist() == [["", "", "ES", "n/a"], ["ES", "n/a", "n/a", "fail"]]
    assert hm.best == (0, 1)  # the winner (t_00001: T0 0.03, width 1) is outlined


def test_heat_maps_split_by_learn_temperature_and_bin_continuous_temperatures():
    rng = np.random.default_rng(0)
    rows = [
        {
            "trial_id": f"t{i}",
            "status": "completed",
            "temperature_init": float(t),
            "width_mult": w,
            "learn_temperature": lt,
            "final_val_loss": float(i),
        }
        for i, (t, w, lt) in enumerate(zip(rng.uniform(0.01, 0.1, 24), [0.5, 1.0, 2.0] * 8, [True, False] * 12))
    ]
    maps = heat_maps(rows, "val_loss", "min", base_temperature=0.07, base_width=1.0, base_learn=True)
    assert [m.title for m in maps] == [
        "final val_loss, learn_temperature=True",
        "final val_loss, learn_temperature=False",
    ]
    assert all(len(m.temps) == 6 and m.widths == ["0.5", "1", "2"] for m in maps)
    assert maps[0].temps[0].startswith("0.01")
    total = sum(np.isfinite(m.values).sum() for m in maps)
    assert 6 <= total <= 24


def test_sweep_png_is_drawn_with_curves_and_heat_map():
    records = _records()
    rows = summarise(records, "val_loss", "min")
    png = plot_sweep(
        records, rows, "val_loss", "min", base_temperature=0.07, base_width=1.0, base_learn=True, title="sweep test"
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert img.width > img.height > 300  # two panels side by side
    # Not a blank canvas: many distinct colours (curves + heat map).
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 200


@pytest.mark.parametrize("value", [math.nan, None, "x"])
def test_reports_without_a_numeric_metric_are_left_out_of_the_series(value):
    record = TrialRecord("a", {}, [{"samples_seen": 1, "val_loss": value}, {"samples_seen": 2, "val_loss": 1.0}])
    assert record.metric_series("val_loss") == [(2.0, 1.0)]


def test_default_metric_ranks_fixed_temperature_trials_by_retrieval_not_by_the_loss_scale():
    """Two trials differing only in their fixed temperature: A retrieves every pair at T=1, B misses
    6 of 32 at T=0.01. At its own temperature B's loss is the lower one (the scale alone), so
    val_loss picks B; the default metric picks A."""
    import torch
    import torch.nn.functional as F

    from training.config import TuneConfig
    from training.validation import contrastive_metrics

    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(16, 16, generator=g), dim=-1)
    # Pairs of near-duplicate images (2k, 2k+1): swapping their captions costs little loss.
    images = F.normalize(torch.repeat_interleave(base, 2, dim=0) + 0.03 * torch.randn(32, 16, generator=g), dim=-1)
    swapped = images.clone()
    for k in range(3):
        swapped[[2 * k, 2 * k + 1]] = images[[2 * k + 1, 2 * k]]
    a = contrastive_metrics(images, images, logit_scale=1.0)  # T = 1
    b = contrastive_metrics(images, swapped, logit_scale=100.0)  # T = 0.01
    assert a["val_mean_retrieval_recall@1"] == 1.0 and b["val_mean_retrieval_recall@1"] == 26 / 32
    assert b["val_loss"] < a["val_loss"]  # the scale, not the quality

    def record(trial_id, temperature, metrics):
        values = {"temperature_init": temperature, "learn_temperature": False}
        history = [{"samples_seen": 64, "step": 4, **metrics}]
        return TrialRecord(trial_id, values, history, completed=True, steps=4, samples_seen=64)

    records = [record("a", 1.0, a), record("b", 0.01, b)]
    tune = TuneConfig()
    assert winner(summarise(records, tune.metric, tune.mode), tune.metric)["trial_id"] == "a"
    assert winner(summarise(records, "val_loss", "min"), "val_loss")["trial_id"] == "b"
