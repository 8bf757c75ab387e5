"""Elastic worker groups (`train.num_workers: [min, max]`): the config accepts a range only when the
global batch (and the micro-batch) splits evenly at every size the group may take, and a run on a
real two-node cluster that loses one node mid-run restarts from its latest checkpoint with the one
worker left and finishes with the full step count and a final model."""

from __future__ import annotations

import json
from collections import Counter
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipray.config import ConfigError, load_config, parse_override
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# --- the config ------------------------------------------------------------------------------


def train(*overrides: str) -> TrainConfig:
    return load_config(None, list(overrides)).train


def test_a_range_gives_the_group_its_bounds_and_a_number_stays_a_fixed_group():
    elastic = train("train.num_workers=[1, 4]", "train.batch_size=96")
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic) == (1, 4, True)
    assert elastic.num_workers == (1, 4) and list(elastic.world_sizes) == [1, 2, 3, 4]
    fixed = train("train.num_workers=4", "train.batch_size=96")
    assert (fixed.num_workers, fixed.min_workers, fixed.max_workers, fixed.elastic) == (4, 4, 4, False)
    assert train("train.num_workers=[2, 2]").num_workers == 2  # [n, n] is the fixed group n


@pytest.mark.parametrize(
    "value, message",
    [
        ("[0, 2]", r"train.num_workers \[0, 2\]: \[min, max\] needs 1 <= min <= max"),
        ("[3, 2]", r"train.num_workers \[3, 2\]: \[min, max\] needs 1 <= min <= max"),
        ("[1, 2, 4]", r"train.num_workers \[1, 2, 4\]: give a positive integer or \[min, max\]"),
        ("[1, 2.5]", r"train.num_workers \[1, 2.5\]: give a positive integer or \[min, max\]"),
        ("0", "train.num_workers 0: give a positive integer"),
        ("many", "train.num_workers 'many': give a positive integer"),
    ],
)
def test_a_malformed_worker_count_is_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        train(f"train.num_workers={value}")


def test_the_batch_must_split_evenly_at_every_size_of_the_range():
    # 64 splits over 1, 2 and 4 workers, not over 3.
    with pytest.raises(ConfigError, match=r"not divisible by the world size 3 that train.num_workers \[1, 4\]"):
        train("train.num_workers=[1, 4]", "train.batch_size=64")
    with pytest.raises(ConfigError, match=r"world sizes 3, 5, 6, 7 .*\(use a multiple of 840"):
        train("train.num_workers=[1, 8]", "train.batch_size=256")
    assert train("train.num_workers=[1, 8]", "train.batch_size=840").max_workers == 8


def test_the_micro_batch_must_divide_the_local_batch_at_every_size():
    # 96 pairs: 96, 48, 32 per worker at 1, 2, 3 workers; micro-batches of 32 do not fit 48.
    with pytest.raises(
        ConfigError, match=r"micro_batch_size 32 does not divide the per-worker batch \(48 at 2 workers\)"
    ):
        train("train.num_workers=[1, 3]", "train.batch_size=96", "train.micro_batch_size=32")
    ok = train("train.num_workers=[1, 3]", "train.batch_size=96", "train.micro_batch_size=16")
    assert all((ok.batch_size // w) % 16 == 0 for w in ok.world_sizes)


def test_the_train_rayjob_entrypoint_with_a_quoted_range_validates():
    """The elastic form infra/kuberay/rayjob-train.yaml and docs/cluster.md describe: the range,
    shell-quoted in the entrypoint, reaches the config as [min, max]."""
    from tests.support.kuberay_manifests import KUBERAY, load

    entrypoint = load(KUBERAY / "rayjob-train.yaml")["spec"]["entrypoint"]
    assert "train.num_workers=8" in entrypoint
    elastic = entrypoint.replace("train.num_workers=8", '"train.num_workers=[4, 8]" --set train.batch_size=3360')
    argv = shlex.split(elastic.replace("${CLIPRAY_BUCKET}", "bucket"))
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config = ROOT / "configs" / Path(argv[argv.index("--config") + 1]).name
    assert parse_override("train.num_workers=[4, 8]") == (["train", "num_workers"], [4, 8])
    assert load_config(config, overrides).train.num_workers == (4, 8)


def test_preprocessing_is_sized_for_the_largest_group():
    from training.driver import preprocess_actors

    elastic = TrainConfig(num_workers=(1, 2), batch_size=32, samples=64, cpus_per_worker=3)
    # 8 CPUs, 2 workers x 3 CPUs: 2 left, 1 actor per worker (a group of 1 alone would get 5).
    assert preprocess_actors(elastic, cluster_cpus=8) == 1


# --- a real two-node cluster losing a node -------------------------------------------------------

CPUS_PER_NODE = 4
CPUS_PER_WORKER = 3  # > CPUS_PER_NODE / 2: one worker per node, so losing a node leaves one worker
BATCH, STEPS, CHECKPOINT_EVERY = 32, 12, 2
# Fast node-death detection (GCS health checks) and a bounded wait for a group the lost node was
# counted in (Ray Data's resource coordinator refreshes its node list every 20 s).
FAST_FAILURE_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_world_sizes(run: Path) -> dict[int, int]:
    """{step: world size} of each kept checkpoint (its trainer_state.json; one still being copied
    into place is left out)."""
    out = {}
    for state in sorted(run.glob("checkpoint_*/trainer_state.json")):
        try:
            saved = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        out[int(saved["step"])] = int(saved["world_size"])
    return out


@pytest.mark.slow
@pytest.mark.heavy
def test_an_elastic_run_loses_a_node_and_finishes_on_the_workers_left(tmp_path):
    from tests.support.ray_head import LocalRayCluster
    from tests.support.train_runs import trained_samples
    from tests.support.train_shards import write_shards
    from training.worker import SAMPLE_LOG_ENV

    write_shards(tmp_path / "shards", copies=1, rows_per_shard=100, side=64)
    run = tmp_path / "runs" / "elastic"
    argv = [
        sys.executable,
        "-m",
        "training",
        *("--set", "model.name=ViT-Tiny", "--set", "model.width_mult=0.5"),
        *("--set", f"train.data=[{tmp_path / 'shards'}]", "--set", f"train.storage_path={tmp_path / 'runs'}"),
        *("--set", "train.name=elastic", "--set", "train.num_workers=[1, 2]"),
        *("--set", f"train.cpus_per_worker={CPUS_PER_WORKER}", "--set", "train.num_preprocess_actors=1"),
        *("--set", f"train.batch_size={BATCH}", "--set", f"train.samples={BATCH * STEPS}"),
        *("--set", f"train.checkpoint_every={CHECKPOINT_EVERY}", "--set", "train.keep_checkpoints=20"),
        *("--set", f"train.log_every={CHECKPOINT_EVERY}", "--set", "train.max_failures=2"),
        *("--set", "train.warmup=2", "--set", "train.lr=0.001", "--set", "ray.shared_filesystem=true"),
    ]
    with LocalRayCluster(num_cpus=CPUS_PER_NODE, env=FAST_FAILURE_ENV) as cluster:
        cluster.add_node(num_cpus=CPUS_PER_NODE)
        (tmp_path / "samples").mkdir()
        proc = subprocess.Popen(
            [*argv, "--set", f"ray.address={cluster.gcs_address}"],
            env={**cluster.env, SAMPLE_LOG_ENV: str(tmp_path / "samples")},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # Take node 1 away once both workers have written a checkpoint together.
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if 2 in checkpoint_world_sizes(run).values():
                    break
                time.sleep(0.5)
            assert proc.poll() is None, f"the run ended before losing a node:\n{proc.stdout.read()[-4000:]}"
            before = max(checkpoint_world_sizes(run))
            assert before < STEPS, "the run finished before the node went away"
            os.kill(cluster.raylet_pid(1), signal.SIGKILL)
            output, _ = proc.communicate(timeout=480)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, output[-6000:]
    table = metrics(run)
    assert [r["step"] for r in table] == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)), table
    assert all(r["samples_seen"] == r["step"] * BATCH for r in table)
    sizes = checkpoint_world_sizes(run)
    assert sizes[before] == 2 and sizes[STEPS] == 1, sizes  # two workers, then the one left
    assert table[-1]["restored_from_step"] >= before
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "model_config.json").exists()
    # The one worker left read what the two had left of each pass: no sample twice in a pass, and
    # pass 0 (300 rows, 384 samples trained) whole.
    records = trained_samples(tmp_path / "samples")
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1))
    seen = Counter((p, k) for r in records for p, k in zip(r["passes"], r["keys"]))
    assert sum(seen.values()) == STEPS * BATCH and max(seen.values()) == 1
    assert sum(1 for p, _ in seen if p == 0) == 300
