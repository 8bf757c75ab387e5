"""`clipray demo`: its data set, its config, and (slow) one short run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from clipray.config import ConfigError
from clipray.demo import HELDOUT_COPIES, TRAIN_COPIES, embedded_config, run_demo
from clipray.demo_data import COLORS, POSITIONS, SHAPES, SIZES, draw_image, make_samples

ROOT = Path(__file__).resolve().parents[1]


def test_demo_data_covers_every_colour_shape_size_and_position():
    samples = make_samples("train", TRAIN_COPIES, seed=1)
    assert len(COLORS) >= 6 and len(SHAPES) >= 5 and len(SIZES) >= 2 and len(POSITIONS) >= 3
    assert len(samples) == len(COLORS) * len(SHAPES) * len(SIZES) * len(POSITIONS) * TRAIN_COPIES
    combos = {(s.color, s.shape, s.size, s.position) for s in samples}
    assert len(combos) == len(COLORS) * len(SHAPES) * len(SIZES) * len(POSITIONS)
    for s in samples:
        assert s.color in s.caption and s.shape in s.caption, s.caption
    assert len({s.caption.replace(s.color, "C").replace(s.shape, "S") for s in samples}) > 3  # several templates


def test_heldout_images_are_never_seen_in_training():
    train = make_samples("train", TRAIN_COPIES, seed=1)
    heldout = make_samples("heldout", HELDOUT_COPIES, seed=2)
    assert not {s.seed for s in train} & {s.seed for s in heldout}
    assert not {s.key for s in train} & {s.key for s in heldout}
    # Same combination, other seed: another picture (background, noise, jitter).
    a = next(s for s in train if (s.color, s.shape, s.size, s.position) == ("red", "star", "small", "left"))
    b = next(s for s in heldout if (s.color, s.shape, s.size, s.position) == ("red", "star", "small", "left"))
    pa, pb = np.asarray(draw_image(a), dtype=np.int16), np.asarray(draw_image(b), dtype=np.int16)
    assert np.abs(pa - pb).mean() > 5


def test_stage_config_repeats_the_embedded_demo_recipe():
    """configs/demo.yaml (the stage commands on a finished demo) trains what the demo trains."""
    embedded = embedded_config()
    stage = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for section in ("data", "train"):
        for key, value in stage[section].items():
            if key in embedded[section]:
                assert value == embedded[section][key], f"configs/demo.yaml {section}.{key}"
    for key in ("name", "batch_size", "samples", "lr", "warmup", "weight_decay", "num_workers"):
        assert stage["train"][key] == embedded["train"][key], key


@pytest.mark.parametrize(
    "override, key", [("train.batchsize=64", "train.batchsize"), ("train.batch_size=abc", "train.batch_size")]
)
def test_bad_override_fails_before_any_work(tmp_path, override, key):
    workdir = tmp_path / "demo"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_demo(str(workdir), [override])
    assert not workdir.exists()


def test_progress_line_reads_like_a_progress_bar():
    from training.callbacks import progress_line

    row = {"step": 100, "loss": 2.1314, "samples_per_s": 395.2, "data_wait_s": 0.004, "step_time_s": 0.4}
    assert progress_line("demo", 391, row, checkpointed=True) == (
        "train demo: step 100/391 (26%) loss 2.131 | 395 samples/s | data wait 1% | checkpoint"
    )
    assert (
        progress_line("demo", 391, {"step": 391, "val_loss": 0.5}) == "train demo: step 391/391 (100%) | val loss 0.500"
    )


@pytest.mark.slow
def test_short_demo_runs_end_to_end_and_writes_its_report(ray_local, tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert run_demo(str(workdir), ["train.samples=1280", "train.checkpoint_every=5"]) == 0

    out = capsys.readouterr().out  # the driver's own lines (the session's Ray does not forward workers')
    assert "wall time (s)" in out and "report:" in out

    manifest = json.loads((workdir / "pipeline" / "train" / "manifest.json").read_text())
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"]
    assert manifest["reasons"] == {"http_404": 1, "not_an_image": 1, "truncated_image": 1}
    for name in ("zeroshot-color", "zeroshot-shape", "retrieval"):
        result = json.loads((workdir / "eval" / f"{name}.json").read_text())
        assert result["metrics"], name
    report = (workdir / "report.md").read_text()
    for figure in ("loss_curve.png", "heldout_predictions.png"):
        assert figure in report and (workdir / figure).stat().st_size > 0
    assert (workdir / "runs" / "demo" / "final" / "model.safetensors").exists()
