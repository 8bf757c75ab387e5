"""The multi-node guard: on a cluster of more than one node, local paths of the command's keys are
refused before any work, each key named, unless `ray.shared_filesystem: true`. (A real two-node
cluster refusing a job: tests/test_infra_cluster.py.)"""

from __future__ import annotations

import pytest

from clipray.config import ConfigError, load_config
from clipray.shared_paths import check_shared_paths, local_paths


def job(*overrides: str):
    return load_config(None, list(overrides))


MIXED = (
    "train.data=[/data/shards, s3://bucket/more]",
    "train.storage_path=s3://bucket/runs",
    "tune.storage_path=sweeps",
    "data.input=s3://bucket/urls.parquet",
    "data.output=shards",
    "eval.dataset=s3://bucket/imagenet",
    "eval.output=results/zs.json",
)


def test_each_local_path_of_the_command_is_found_under_its_key(tmp_path):
    cfg = job(*MIXED)
    assert local_paths(cfg, "train") == [("train.data", "/data/shards")]
    assert local_paths(cfg, "tune") == [("train.data", "/data/shards"), ("tune.storage_path", "sweeps")]
    assert local_paths(cfg, "pipeline") == [("data.output", "shards")]
    assert local_paths(cfg, "eval") == [("eval.output", "results/zs.json")]
    assert local_paths(job("train.data=[file:///x]", "train.storage_path=gs://b/r"), "train") == [
        ("train.data", "file:///x")
    ]
    # The folders a pipeline reads local images under and a suite finds its sets under count too.
    roots = job(*MIXED, f"data.local_root={tmp_path}", "eval.data_root=/benchmarks")
    assert local_paths(roots, "pipeline") == [("data.local_root", str(tmp_path)), ("data.output", "shards")]
    assert ("eval.data_root", "/benchmarks") in local_paths(roots, "eval")


def test_local_paths_are_refused_on_two_nodes_naming_every_key():
    cfg = job(*MIXED)
    with pytest.raises(ConfigError) as err:
        check_shared_paths(cfg, "tune", nodes=2)
    message = str(err.value)
    assert "the Ray cluster has 2 nodes" in message
    assert "train.data = '/data/shards'; tune.storage_path = 'sweeps'" in message
    assert "ray.shared_filesystem: true" in message


def test_one_node_remote_paths_or_a_shared_filesystem_pass():
    check_shared_paths(job(*MIXED), "tune", nodes=1)
    check_shared_paths(job(*MIXED, "ray.shared_filesystem=true"), "tune", nodes=3)
    remote = job("train.data=[s3://b/shards]", "train.storage_path=s3://b/runs")
    check_shared_paths(remote, "train", nodes=4)


def test_the_shared_filesystem_key_is_typed():
    with pytest.raises(ConfigError, match="ray.shared_filesystem"):
        job("ray.shared_filesystem=sometimes")
