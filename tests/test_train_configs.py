"""The example training configs load and satisfy the train section's checks; the train section
refuses impossible batch arithmetic with messages that name the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipray.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name", ["cc3m-rn50", "cc3m-vit-b-32", "laion400m-vit-b-32", "datacomp-small", "datacomp-medium"]
)
def test_example_training_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.batch_size % cfg.train.max_workers == 0 and cfg.train.use_gpu


def test_laion_config_has_the_clip_papers_hyperparameters_and_fits_one_node_with_accumulation():
    cfg = load_config(
        CONFIGS / "laion400m-vit-b-32.yaml", overrides=["train.num_workers=8", "train.micro_batch_size=512"]
    )
    t = cfg.train
    assert (t.batch_size, t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.warmup) == (
        32768,
        5e-4,
        0.9,
        0.98,
        1e-6,
        0.2,
        2000,
    )
    assert t.batch_size // t.max_workers // t.micro_batch_size == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.batch_size=100", "train.num_workers=3"],
            "train.batch_size 100 is not divisible by train.num_workers 3",
        ),
        (
            ["train.batch_size=64", "train.num_workers=2", "train.micro_batch_size=5"],
            "train.micro_batch_size 5 does not divide the per-worker batch 32",
        ),
        (["train.samples=10", "train.batch_size=64"], "train.samples 10 is less than one global batch"),
        (["train.val_every=100"], "train.val_every is set but train.val_data is empty"),
        (
            ["train.num_workers=[1, 3]", "train.batch_size=64"],
            r"train.batch_size 64 is not divisible by the world size 3 that train.num_workers \[1, 3\]",
        ),
    ],
)
def test_impossible_train_sections_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides=overrides)


@pytest.mark.parametrize("samples, batch, steps", [(1024, 128, 8), (1025, 128, 9), (128, 128, 1)])
def test_a_run_is_its_samples_in_whole_global_batches(samples, batch, steps):
    from training.config import TrainConfig

    assert TrainConfig(data=["x"], samples=samples, batch_size=batch, num_workers=1).total_steps == steps


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", True),
        ("false", False),
        ("max-autotune", "max-autotune"),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ],
)
def test_compile_is_a_switch_or_a_torch_compile_mode(value, expected):
    cfg = load_config(None, overrides=[f"train.compile={value}"])
    assert cfg.train.compile == expected


def test_a_misspelt_compile_mode_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, overrides=["train.compile=max-autotun"])


def test_the_config_and_the_loop_know_the_same_compile_modes():
    from typing import get_args

    from training.config import TrainConfig
    from training.loop import COMPILE_MODES

    literal = [a for a in get_args(TrainConfig.model_fields["compile"].annotation) if a is not bool][0]
    assert get_args(literal) == COMPILE_MODES
