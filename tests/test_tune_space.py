"""The `tune` section: search-space validation, Ray Tune's space, trial sections, concurrency."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
from ray import tune as rt

from clipray.config import ConfigError, load_config
from training.config import ModelConfig, TrainConfig, TuneConfig
from training.tune.resources import TrialDemand, max_concurrent_trials, trial_demand
from training.tune.runner import asha_rungs
from training.tune.space import SEED_AXIS, count_trials, param_space
from training.tune.trial import check_model_fits, trial_sections, trial_values


def _tune(**keys) -> TuneConfig:
    return load_config(overrides=[f"tune.{k}={v}" for k, v in keys.items()]).tune


def test_grids_and_ranges_become_ray_tune_domains():
    tune = _tune(
        width_mult="[0.5, 1, 2]",
        temperature_init="{loguniform: [0.01, 0.1]}",
        learn_temperature="[true, false]",
        lr="{uniform: [0.0001, 0.001]}",
        batch_size="{choice: [32, 64]}",
    )
    space = param_space(tune)
    assert space["width_mult"] == {"grid_search": [0.5, 1, 2]}
    assert space["learn_temperature"] == {"grid_search": [True, False]}
    assert isinstance(space["temperature_init"], rt.search.sample.Float)
    assert (space["temperature_init"].lower, space["temperature_init"].upper) == (0.01, 0.1)
    assert isinstance(space["temperature_init"].get_sampler(), rt.search.sample.LogUniform)
    assert isinstance(space["lr"].get_sampler(), rt.search.sample.Uniform)
    assert space["batch_size"].categories == [32, 64]
    assert SEED_AXIS not in space  # num_samples 1: no repeats to tell apart


def test_trial_count_is_grid_points_times_num_samples():
    tune = _tune(width_mult="[0.5, 1, 2]", temperature_init="[0.03, 0.1]", num_samples=2)
    assert count_trials(tune) == 12
    assert SEED_AXIS in param_space(tune)  # repeats of a grid point draw their own seed
    assert count_trials(_tune(temperature_init="{loguniform: [0.01, 0.1]}", num_samples=5)) == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.width_mult=[0, 1]", "tune.width_mult values must be > 0, got 0"),
        ("tune.width_mult=2", "is not a search space"),
        ("tune.width_mult=[]", "empty grid"),
        ("tune.width_mult=[1, 1]", "repeats a value"),
        ("tune.learn_temperature=[1, 0]", "must be true or false"),
        ("tune.batch_size=[64, 1.5]", "positive integers"),
        ("tune.batch_size={loguniform: [16, 64]}", "takes a grid or {choice"),
        ("tune.temperature_init={loguniform: [0.1, 0.01]}", "low < high"),
        ("tune.temperature_init={loguniform: [0, 0.1]}", "must be > 0"),
        ("tune.lr={normal: [0.1, 0.2]}", "expected exactly one of loguniform, uniform, choice"),
        ("tune.name=a/b", "plain folder name"),
        ("tune.mode=best", "tune.mode"),
        ("tune.metric=loss", "choose one of val_loss"),
        ("tune.reduction_factor=1", "tune.reduction_factor"),
        ("tune.widths=[1]", "unknown key 'tune.widths'"),
    ],
)
def test_bad_search_space_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)
    assert override.split("=")[0].split(".")[1] in str(err.value)


def test_mode_follows_the_metric_and_a_contrary_mode_is_refused():
    assert (_tune().metric, _tune().mode) == ("val_mean_retrieval_recall@1", "max")  # the default
    assert _tune(metric="val_loss").mode == "min"
    assert _tune(metric="val_image_retrieval_recall@5").mode == "max"
    assert _tune(metric="zeroshot_acc1", mode="max").mode == "max"
    with pytest.raises(ConfigError, match="would rank the worst trial first"):
        _tune(metric="val_loss", mode="max")
    with pytest.raises(ConfigError, match="tune.metric 'val_acc' is not a metric the trials report"):
        _tune(metric="val_acc")


def test_trial_values_replace_the_model_and_train_keys():
    model = ModelConfig(name="ViT-Tiny", width_mult=1.0)
    train = TrainConfig(data=["shards"], batch_size=128, lr=1e-3, temperature_init=0.07, storage_path="runs", name="x")
    values = {
        "width_mult": 2,
        "temperature_init": 0.03,
        "learn_temperature": False,
        "lr": 5e-4,
        "batch_size": 32,
        SEED_AXIS: 7,
    }
    m, t = trial_sections(model, train, values, runs_dir="/sweeps/s/runs", run_name="abc_00001")
    assert m.width_mult == 2.0 and m.name == "ViT-Tiny"
    assert (t.temperature_init, t.learn_temperature, t.lr, t.batch_size, t.seed) == (0.03, False, 5e-4, 32, 7)
    assert (t.storage_path, t.name, t.data) == ("/sweeps/s/runs", "abc_00001", ["shards"])
    assert (model.width_mult, train.batch_size, train.name) == (1.0, 128, "x")  # bases untouched
    config = {**values, "_sweep": {"model": {}}, "other": 1}
    assert trial_values(config) == values


def test_trial_values_are_validated_like_the_job_config():
    with pytest.raises(ValueError, match="batch_size"):
        trial_sections(ModelConfig(), TrainConfig(), {"batch_size": 0}, runs_dir="r", run_name="n")
    with pytest.raises(ValueError, match="not sweep axes"):
        trial_sections(ModelConfig(), TrainConfig(), {"depth": 2}, runs_dir="r", run_name="n")


def test_a_width_too_large_for_the_node_fails_with_the_numbers():
    model, train = ModelConfig(name="ViT-Tiny", width_mult=1.0), TrainConfig()
    params = check_model_fits(model, train, node_memory_bytes=24 * 2**30)
    assert 5e6 < params < 50e6
    huge = ModelConfig(name="ViT-Tiny", width_mult=512.0)
    with pytest.raises(MemoryError) as err:
        check_model_fits(huge, train, node_memory_bytes=24 * 2**30)
    text = str(err.value)
    assert "model.width_mult=512" in text and "ViT-Tiny" in text and "24.0 GiB" in text
    assert "tune.width_mult" in text


def test_concurrency_is_what_the_cluster_holds_for_the_trials_demand():
    train = TrainConfig(num_workers=2, cpus_per_worker=1.0)
    demand = trial_demand(train, trial_cpus=0.25, data_cpus_per_worker=0.5)
    assert demand == TrialDemand(cpus=3.25, gpus=0.0)
    n, why = max_concurrent_trials({"CPU": 8.0}, demand, num_trials=6)
    assert n == 2 and "8 CPUs" in why
    assert max_concurrent_trials({"CPU": 64.0}, demand, num_trials=6)[0] == 6  # never more than trials
    gpu = trial_demand(TrainConfig(num_workers=2, use_gpu=True, cpus_per_worker=4), 0.25, 1.0)
    assert gpu == TrialDemand(cpus=10.25, gpus=2.0)
    assert max_concurrent_trials({"CPU": 96.0, "GPU": 8.0}, gpu, num_trials=12)[0] == 4  # GPU-bound
    assert max_concurrent_trials({"CPU": 24.0, "GPU": 8.0}, gpu, num_trials=12)[0] == 2  # CPU-bound
    n, why = max_concurrent_trials({"CPU": 8.0}, demand, num_trials=6, requested=5)
    assert n == 5 and "holds 2" in why
    with pytest.raises(ValueError, match="one trial needs 3.25 CPU"):
        max_concurrent_trials({"CPU": 2.0}, demand, num_trials=6)


def test_asha_rungs_double_from_the_grace_period_below_the_budget():
    assert asha_rungs(640, 2.0, 3200) == [640, 1280, 2560]
    assert asha_rungs(250_000, 2.0, 2_000_000) == [250_000, 500_000, 1_000_000]
    assert asha_rungs(1000, 4.0, 1000) == []


# ---------------------------------------------------------------- checks before any trial starts
@pytest.fixture
def shards(tmp_path):
    from tests.support.train_shards import write_shards

    write_shards(tmp_path / "train", copies=1, rows_per_shard=300, side=32)
    return tmp_path / "train"


def _job(shards, *overrides):
    return load_config(
        overrides=[
            f"train.data=[{shards}]",
            f"train.val_data=[{shards}]",
            "train.val_every=10",
            "train.batch_size=32",
            "train.samples=640",
            *overrides,
        ]
    )


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            ["train.val_data=[]", "train.val_every=null"],
            ValueError,
            "set train.val_data (held-out shard folders) and train.val_every",
        ),
        (["train.val_every=null"], ValueError, "train.val_every (steps between validations)"),
        (["tune.metric=zeroshot_acc1"], ValueError, "set train.zeroshot_data"),
        (["model.name=ViT-Huge-99"], ValueError, "'ViT-Huge-99' is neither a registered model nor a model JSON"),
        (["tune.grace_period=640"], ValueError, "ASHA could never stop a trial"),
        (
            ["train.num_workers=2", "tune.batch_size=[32, 33]"],
            ValueError,
            "tune.batch_size 33 cannot run: train.batch_size 33 is not divisible by train.num_workers 2",
        ),
        (["tune.batch_size={choice: [32, 1024]}"], ValueError, "train.samples 640 is less than one global batch"),
    ],
)
def test_a_sweep_that_cannot_run_stops_before_any_trial(shards, overrides, error, message):
    from training.tune import check_sweep

    cfg = _job(shards, *overrides)
    with pytest.raises(error) as err:
        check_sweep(cfg.model, cfg.train, cfg.tune)
    assert message in str(err.value)


def test_missing_shards_are_named_before_any_trial(shards, tmp_path):
    from training.tune import check_sweep

    cfg = _job(shards, f"train.data=[{tmp_path / 'nope'}]")
    with pytest.raises(FileNotFoundError, match="train.data: .*nope does not exist"):
        check_sweep(cfg.model, cfg.train, cfg.tune)
    cfg = _job(shards)
    check_sweep(cfg.model, cfg.train, cfg.tune)  # the good config passes


def test_resuming_a_sweep_with_a_changed_config_is_refused(shards, tmp_path):
    from training.tune.runner import _fingerprint, _guard_resume
    from training.tune.storage import sweep_folder

    cfg = _job(shards, "tune.width_mult=[0.5, 1]", f"tune.storage_path={tmp_path / 'sweeps'}", "tune.name=s")
    storage = sweep_folder(cfg.tune, cfg.train)
    assert storage.url == str(tmp_path / "sweeps" / "s") and storage.full_url("runs") == f"{storage.url}/runs"
    fingerprint = _fingerprint(cfg.model, cfg.train, cfg.tune)
    assert _guard_resume(storage, fingerprint, {"max_concurrent_trials": 3}) is None  # a first start
    recorded = json.loads((tmp_path / "sweeps" / "s" / "sweep_config.json").read_text())
    assert recorded["tune"]["width_mult"] == [0.5, 1] and recorded["started_with"] == {"max_concurrent_trials": 3}
    (tmp_path / "sweeps" / "s" / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for

    # retry_failed may change on resume; it reports what the sweep started with ...
    same = _job(
        shards,
        "tune.width_mult=[0.5, 1]",
        f"tune.storage_path={tmp_path / 'sweeps'}",
        "tune.name=s",
        "tune.retry_failed=true",
    )
    assert _guard_resume(storage, _fingerprint(same.model, same.train, same.tune), {}) == {"max_concurrent_trials": 3}
    # ... anything that changes what trials compute (or how many run at once) is refused.
    changed = _job(
        shards,
        "tune.width_mult=[0.5, 2]",
        "train.lr=0.01",
        "tune.max_concurrent_trials=1",
        f"tune.storage_path={tmp_path / 'sweeps'}",
        "tune.name=s",
    )
    with pytest.raises(ValueError) as err:
        _guard_resume(storage, _fingerprint(changed.model, changed.train, changed.tune), {})
    assert "differs in: train.lr, tune.max_concurrent_trials, tune.width_mult" in str(err.value)
    assert "new tune.name" in str(err.value)


def test_sweep_files_round_trip_on_s3(shards):
    from tests.support.s3_server import S3TestServer
    from training.tune.storage import sweep_folder

    with S3TestServer() as s3:
        s3.create_bucket("sweeps")
        cfg = _job(
            shards, "tune.storage_path=s3://sweeps/team", "tune.name=s", f"train.s3_endpoint_url={s3.endpoint_url}"
        )
        with mock.patch.dict(os.environ, s3.env()):
            storage = sweep_folder(cfg.tune, cfg.train)
            assert storage.url == "s3://sweeps/team/s" and storage.full_url("runs") == "s3://sweeps/team/s/runs"
            assert not storage.local and storage.read_text("results.csv") is None
            storage.write_bytes("results.csv", b"rank,trial_id\n")
            assert storage.read_text("results.csv") == "rank,trial_id\n" and storage.exists("results.csv")
            assert s3.filesystem().cat("sweeps/team/s/results.csv") == b"rank,trial_id\n"


def test_grid_widths_that_cannot_fit_are_named_up_front():
    from training.tune.checks import impossible_widths

    cfg = load_config(overrides=["model.name=ViT-Tiny", "tune.width_mult=[0.5, 4096, 1]"])
    (reason,) = impossible_widths(cfg.model, cfg.train, cfg.tune, memory=24 * 2**30)
    assert "model.width_mult=4096" in reason
    assert impossible_widths(cfg.model, cfg.train, _tune(width_mult="{uniform: [0.5, 2]}"), memory=1) == []


def test_trials_get_absolute_local_paths_because_tune_runs_them_in_their_own_folder(tmp_path, monkeypatch):
    from training.tune.runner import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "templates.txt").write_text("a {c}\n")
    model = ModelConfig(name="model.json", pretrained="missing.pt")
    train = TrainConfig(
        data=["shards/train", "s3://bucket/shards"],
        val_data=["shards/val"],
        zeroshot_templates="templates.txt",
        zeroshot_classnames="imagenet",
    )
    trial_model, trial_train = absolute_local_paths(model, train)
    assert trial_model.name == str(tmp_path / "model.json")
    assert trial_model.pretrained == "missing.pt"  # not a file here: left for the loader to report
    assert trial_train.data == [str(tmp_path / "shards/train"), "s3://bucket/shards"]
    assert trial_train.val_data == [str(tmp_path / "shards/val")]
    assert trial_train.zeroshot_templates == str(tmp_path / "templates.txt")
    assert trial_train.zeroshot_classnames == "imagenet"  # a built-in name, not a path
    assert model.name == "model.json" and train.data[0] == "shards/train"  # the user's sections unchanged
