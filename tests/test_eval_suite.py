"""`clipray eval --suite`: DataComp's task list format, the sets found under a data root, one table."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from evaluation.config import EvalConfig
from evaluation.run import run_evaluation
from evaluation.suite import load_suite, main_metric_value, task_folder
from tests.support.wds_sets import write_wds_set
from tests.test_eval_datasets import write_color_folder
from training.model import create_model, save_model

SUITE = """
alpha:
  name: Alpha
  main_metric: acc1
  num_classes: 3
  tags: []
retrieval/beta:
  name: Beta
  main_metric: mean_recall@1
  tags: [retrieval]
gamma:
  name: Gamma
  main_metric: mean_per_class_recall
delta:
  name: Delta (not downloaded)
epsilon:
  name: Epsilon (no class names)
misc/winogavil:
  name: WinoGAViL
  main_metric: jaccard_score_10-12
"""


def test_datacomp_task_list_is_shipped_and_read():
    tasks = {t.key: t for t in load_suite("datacomp")}
    assert len(tasks) == 40 and tasks["imagenet1k"].main_metric == "acc1"
    assert tasks["vtab/pets"].main_metric == "mean_per_class_recall" and tasks["vtab/pets"].task == "zeroshot"
    flickr = tasks["retrieval/flickr30k"]
    assert flickr.task == "retrieval" and flickr.main_metric == "mean_recall@1" and flickr.unsupported() == ""
    assert "jaccard" in tasks["misc/winogavil"].unsupported() and "fairness" in tasks["fairness/geode"].unsupported()
    assert main_metric_value({"image_retrieval_recall@1": 0.2, "text_retrieval_recall@1": 0.4}, "mean_recall@1") == (
        pytest.approx(0.3)
    )


def test_task_folders_follow_datacomp_then_clip_benchmark_names(tmp_path):
    tasks = {t.key: t for t in load_suite("datacomp")}
    (tmp_path / "wds_vtab-cifar100_test").mkdir()
    (tmp_path / "wds_mscoco_captions").mkdir()
    cifar, _ = task_folder(tasks["vtab/cifar100"], str(tmp_path), EvalConfig())
    coco, _ = task_folder(tasks["retrieval/mscoco_2014_5k_test_image_text_retrieval"], str(tmp_path), EvalConfig())
    flickr, looked = task_folder(tasks["retrieval/flickr30k"], str(tmp_path), EvalConfig())
    assert cifar.endswith("/wds_vtab-cifar100_test") and coco.endswith("/wds_mscoco_captions")
    assert flickr is None and looked[0] == "wds_retrieval-flickr30k_test"


def test_a_bad_task_entry_is_named(tmp_path):
    path = tmp_path / "suite.yml"
    path.write_text("cars:\n  task: detection\n")
    with pytest.raises(ValueError, match="entry 'cars' has task 'detection'"):
        load_suite(str(path))


def test_a_suite_without_its_data_root_is_refused_before_any_work(capsys):
    from clipray.cli import main

    assert main(["eval", "--suite", "datacomp", "--set", "eval.model=runs/x/final"]) == 2
    assert "eval.suite 'datacomp' needs eval.data_root and eval.output" in capsys.readouterr().err


@pytest.mark.slow
def test_suite_runs_present_sets_in_one_ray_pass_and_skips_the_rest(tmp_path, ray_local, capsys):
    from clipray.cli import main

    torch.manual_seed(0)
    model_dir = tmp_path / "run" / "final"
    save_model(create_model("ViT-Tiny"), model_dir)
    root = tmp_path / "data"
    write_wds_set(root / "wds_alpha_test", per_class=3, shards=2)
    write_wds_set(root / "wds_retrieval-beta_test", kind="retrieval", per_class=2, shards=1)
    write_color_folder(root / "gamma", per_class=2)
    write_wds_set(root / "wds_epsilon_test", per_class=1, shards=1)
    (root / "wds_epsilon_test" / "classnames.txt").unlink()  # integer labels, nothing to prompt with
    (tmp_path / "suite.yml").write_text(SUITE)
    out = tmp_path / "results"
    args = ["--set", f"eval.model={model_dir}", "--set", f"eval.data_root={root}", "--set", f"eval.output={out}"]
    args += ["--set", "eval.report=false"]  # per-task reports: tests/test_eval_run.py
    code = main(["eval", "--suite", str(tmp_path / "suite.yml"), *args, "--set", "eval.engine=ray"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped delta (Delta (not downloaded)): no data set under" in printed
    assert "skipped misc/winogavil (WinoGAViL): main metric jaccard_score_10-12" in printed
    assert "failed epsilon (Epsilon (no class names)): the labels are integers" in printed

    rows = {r["task"]: r for r in csv.DictReader((out / "suite.csv").open())}
    assert set(rows) == {"alpha", "retrieval/beta", "gamma", "delta", "epsilon", "misc/winogavil", "average"}
    alpha = json.loads((out / "alpha.json").read_text())
    beta = json.loads((out / "retrieval_beta.json").read_text())
    gamma = json.loads((out / "gamma.json").read_text())
    assert alpha["dataset"] == "alpha" and alpha["task"] == "zeroshot_classification"
    assert beta["task"] == "zeroshot_retrieval" and "mean_recall@1" in beta["metrics"]
    scores = [alpha["metrics"]["acc1"], beta["metrics"]["mean_recall@1"], gamma["metrics"]["mean_per_class_recall"]]
    assert [float(rows[k]["score"]) for k in ("alpha", "retrieval/beta", "gamma")] == pytest.approx(scores, abs=1e-6)
    assert float(rows["average"]["score"]) == pytest.approx(sum(scores) / 3, abs=1e-6)
    assert rows["delta"]["score"] == "" and rows["delta"]["status"].startswith("skipped: no data set")
    table = (out / "suite.md").read_text()
    assert "**Average over 3 of 6 tasks:" in table and "| gamma | Gamma | mean_per_class_recall |" in table
    # The shared Ray pass gives each set what a run of its own gives.
    alone = run_evaluation(EvalConfig(model=str(model_dir), dataset=str(root / "wds_alpha_test"), engine="local"))
    assert alone["metrics"] == alpha["metrics"]
