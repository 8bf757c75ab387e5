"""`clipray eval` end to end: files written, numbers reproduced, bad input refused; the Ray engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.config import EvalConfig
from evaluation.run import evaluate_dataset, run_evaluation
from tests.test_eval_datasets import COLORS, color_image, write_color_shards
from training.model import create_model, load_model, save_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("run") / "final"
    save_model(create_model("ViT-Tiny"), directory)
    return directory


@pytest.mark.slow
def test_clipray_eval_writes_clip_benchmark_json_report_and_predictions(tmp_path, tiny_model_dir, ray_local):
    from clipray.cli import main

    write_color_shards(tmp_path / "held-out", per_class=4)
    out = tmp_path / "results" / "zeroshot.json"
    code = main(
        [
            "eval",
            "--set",
            f"eval.model={tiny_model_dir}",
            "--set",
            f"eval.dataset={tmp_path / 'held-out'}",
            "--set",
            "eval.label_col=color",
            "--set",
            "eval.templates=simple",
            "--set",
            f"eval.output={out}",
            "--dump-predictions",
        ]
    )
    assert code == 0
    obj = json.loads(out.read_text())
    assert set(obj) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert obj["task"] == "zeroshot_classification" and obj["dataset"] == "held-out"
    assert obj["pretrained"] == str(tiny_model_dir) and obj["clipray"]["num_samples"] == 12
    assert set(obj["metrics"]) == {"acc1", "mean_per_class_recall"}  # 3 classes: no acc5
    # The same numbers from the plain function on the same model and data.
    direct = evaluate_dataset(
        load_model(tiny_model_dir),
        EvalConfig(dataset=str(tmp_path / "held-out"), label_col="color", templates="simple"),
    )
    assert obj["metrics"] == direct.metrics
    assert (tmp_path / "results" / "zeroshot.md").read_text().startswith("# Evaluation: zeroshot_classification")
    assert (tmp_path / "results" / "zeroshot.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "results" / "zeroshot.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["key"] == "red0" and len(rows[0]["top5"]) == 3
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(obj["metrics"]["acc1"])


def test_retrieval_and_linear_probe_write_their_metrics(tmp_path, tiny_model_dir):
    write_color_shards(tmp_path / "test", per_class=3)
    write_color_shards(tmp_path / "train", per_class=6)
    ret = run_evaluation(
        EvalConfig(
            model=str(tiny_model_dir),
            task="retrieval",
            dataset=str(tmp_path / "test"),
            output=str(tmp_path / "ret.json"),
            recall_k=[1, 5],
        )
    )
    assert ret["task"] == "zeroshot_retrieval"
    assert set(ret["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)}
    assert json.loads((tmp_path / "ret.json").read_text())["metrics"] == ret["metrics"]
    probe = run_evaluation(
        EvalConfig(
            model=str(tiny_model_dir),
            task="linear_probe",
            dataset=str(tmp_path / "test"),
            train_dataset=str(tmp_path / "train"),
            label_col="color",
            output=str(tmp_path / "probe.json"),
        )
    )
    assert probe["task"] == "linear_probe"
    assert probe["metrics"]["acc1"] == 1.0  # solid colours are linearly separable in any feature space
    assert 1e-6 <= probe["metrics"]["C"] <= 1e6
    assert len(probe["clipray"]["C_search"]) >= 7
    assert "Regularisation search" in (tmp_path / "probe.md").read_text()


def test_bad_eval_configs_are_refused_before_any_work(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="eval.dataset is not set"):
        run_evaluation(EvalConfig(model=str(tiny_model_dir)))
    with pytest.raises(ValueError, match="--dump-predictions needs eval.output"):
        run_evaluation(EvalConfig(model=str(tiny_model_dir), dataset=str(tmp_path), dump_predictions=True))
    write_color_shards(tmp_path / "d", per_class=1)
    with pytest.raises(ValueError, match="needs eval.train_dataset"):
        run_evaluation(EvalConfig(model=str(tiny_model_dir), task="linear_probe", dataset=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="eval.label_col 'label' is not a column"):
        run_evaluation(EvalConfig(model=str(tiny_model_dir), dataset=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="eval.model is not set"):
        run_evaluation(EvalConfig(dataset=str(tmp_path / "d")))


@pytest.mark.slow
def test_ray_engine_gives_the_local_results(tmp_path, tiny_model_dir, ray_local):
    model = load_model(tiny_model_dir)
    write_color_shards(tmp_path / "shards", per_class=3, row_group_size=2)
    (tmp_path / "pairs").mkdir()
    lines = ["image,caption"]
    for c in COLORS:
        (tmp_path / "pairs" / f"{c}.png").write_bytes(color_image(c))
        lines += [f"{c}.png,a {c} square", f"{c}.png,something {c}"]
    (tmp_path / "pairs" / "pairs.csv").write_text("\n".join(lines) + "\n")
    for cfg in (
        EvalConfig(
            dataset=str(tmp_path / "shards"), label_col="color", templates="simple", batch_size=4, dump_predictions=True
        ),
        EvalConfig(
            dataset=str(tmp_path / "pairs" / "pairs.csv"),
            image_col="image",
            task="retrieval",
            batch_size=4,
            recall_k=[1, 2],
        ),
    ):
        local = evaluate_dataset(model, cfg.model_copy(update={"engine": "local"}))
        on_ray = evaluate_dataset(model, cfg.model_copy(update={"engine": "ray", "num_actors": 1}))
        assert on_ray.details["engine"] == "ray" and local.details["engine"] == "local"
        assert on_ray.metrics == pytest.approx(local.metrics, abs=1e-12)
        assert on_ray.num_samples == local.num_samples
        if local.predictions is not None:
            assert list(on_ray.predictions["key"]) == list(local.predictions["key"])
            np.testing.assert_allclose(on_ray.predictions["top5_logits"], local.predictions["top5_logits"], atol=1e-4)
