"""The job config: typed, validated on load, and every error names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clipray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_typo_in_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.batchsize=64"])
    msg = str(err.value)
    assert "train.batchsize" in msg
    assert "did you mean 'train.batch_size'" in msg


def test_typo_in_section_suggests_the_section():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(overrides=["trian.batch_size=64"])


def test_wrong_type_names_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.batch_size=abc"])
    msg = str(err.value)
    assert "train.batch_size = 'abc'" in msg
    assert "integer" in msg


def test_impossible_value_lists_allowed_choices():
    with pytest.raises(ConfigError, match=r"train.precision = 'fp8'.*'fp32', 'amp_bf16' or 'amp_fp16'"):
        load_config(overrides=["train.precision=fp8"])


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.batch_size=-1", "data.resize_mode=squash"])
    msg = str(err.value)
    assert "train.batch_size" in msg and "data.resize_mode" in msg


def test_yaml_file_and_overrides_compose(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  batch_size: 32\n  lr: 0.001\nmodel:\n  name: RN50\n")
    cfg = load_config(path, ["train.batch_size=64", "model.width_mult=0.5", "train.data=[a, b]"])
    assert cfg.train.batch_size == 64
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.model.name == "RN50"
    assert cfg.model.width_mult == 0.5
    assert cfg.train.data == ["a", "b"]


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(overrides=["train.batch_size"])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="'batch_size' is a value"):
        load_config(overrides=["train.batch_size=4", "train.batch_size.x=1"])


@pytest.mark.parametrize("example", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(example):
    load_config(example)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipray", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_cli_exits_2_on_config_typo_before_any_work():
    proc = _cli("train", "--set", "train.batchsize=64")
    assert proc.returncode == 2
    assert "train.batchsize" in proc.stderr and "train.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_exits_2_on_wrong_type():
    proc = _cli("train", "--set", "train.batch_size=abc")
    assert proc.returncode == 2
    assert "train.batch_size = 'abc'" in proc.stderr


def test_stage_module_is_the_same_command_as_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--set", "train.batchsize=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "clipray train" in proc.stderr and "train.batchsize" in proc.stderr


@pytest.mark.parametrize("command", ["demo", "pipeline", "train", "tune", "eval"])
def test_every_command_has_help_with_an_example(command):
    proc = _cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "example" in proc.stdout


def test_help_lists_the_config_keys_of_the_stage():
    out = _cli("train", "--help").stdout
    assert "train.batch_size" in out and "model.width_mult" in out


def test_print_config_shows_validated_values():
    proc = _cli("pipeline", "--set", "data.image_size=128", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "image_size: 128" in proc.stdout


@pytest.mark.parametrize(
    "overrides, ok",
    [
        (["data.verify_hash=[sha256, sha256]"], True),  # img2dataset's form
        (["data.verify_hash.column=hash", "data.verify_hash.algorithm=md5"], True),
        (["data.verify_hash=[sha256, crc32]"], False),
        (["data.verify_hash=[sha256]"], False),
        (["data.extra_cols=[expected_hash]"], False),  # an internal column's name
    ],
)
def test_verify_hash_config(overrides, ok):
    if ok:
        assert load_config(None, overrides=overrides).data.verify_hash is not None
    else:
        with pytest.raises(ConfigError, match="data.verify_hash|data.extra_cols"):
            load_config(None, overrides=overrides)
