"""End to end on a real Ray cluster: `ray start` twice on 127.0.0.1 (a simulated two-node
cluster) and an S3-compatible server (moto) on 127.0.0.1. The demo's URL list goes through
pipeline -> training -> resumed training -> evaluation, each a job submitted with infra/submit.sh
(`ray job submit --working-dir .`), with every path, the job config included, on s3://.

The cluster's nodes carry the S3 variables in their environment, as the KubeRay pods get them from
their Secret, so jobs reach s3:// with no credentials in the job itself. Each node has 4 CPUs and
each training worker asks for 3, so a two-worker training must put one worker on each node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.support.ray_head import LocalRayCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "infra" / "submit.sh"
BUCKET = "clipray-e2e"
CPUS_PER_NODE = 4
CPUS_PER_TRAIN_WORKER = 3  # > CPUS_PER_NODE / 2: two workers cannot share a node
JOB_TIMEOUT_S = 420

# Small but real: ViT-Tiny on 64 px images of the demo's shapes.
DATA_SETTINGS = {
    "allow_private_addresses": True,
    "image_size": 64,
    "rows_per_shard": 60,
    "num_download_actors": 2,
    "threads_per_actor": 4,
    "timeout_s": 5,
    "retries": 0,
    "extra_cols": ["color", "shape"],
}
TRAIN_CHECKPOINT_EVERY = 2
FIRST_SAMPLES, RESUMED_SAMPLES = 128, 224  # 4 then 7 steps of 32
TRAIN_SETTINGS = {
    "num_workers": 2,
    "cpus_per_worker": CPUS_PER_TRAIN_WORKER,
    "batch_size": 32,
    "lr": 0.001,
    "warmup": 2,
    "log_every": 2,
    "checkpoint_every": TRAIN_CHECKPOINT_EVERY,
}


# --- fixtures: one S3 server, one cluster, one demo data set for the whole module ---------------


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    from tests.support.s3_server import S3TestServer

    with S3TestServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def cluster(s3):
    with LocalRayCluster(num_cpus=CPUS_PER_NODE, env=s3.env()) as ray_cluster:
        ray_cluster.add_node(num_cpus=CPUS_PER_NODE)
        yield ray_cluster
    assert ray_cluster.owned_pids() == [], "processes of the test cluster outlived it"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's data generator and static server: a small URL list served on 127.0.0.1."""
    from clipray.demo_data import make_samples, write_split
    from clipray.demo_server import StaticServer

    root = tmp_path_factory.mktemp("demo")
    samples = make_samples("train", copies=1, seed=3)[:150]
    with StaticServer(root) as server:
        rows = write_split(samples, root / "images", server.url, root / "urls.parquet", side=64, bad_urls=True)
        yield {"root": root, "urls": root / "urls.parquet", "rows": rows, "url": server.url}


# --- helpers ---------------------------------------------------------------------------------


class Job:
    def __init__(self, cluster: LocalRayCluster, submission_id: str, proc: subprocess.CompletedProcess):
        self.cluster, self.submission_id, self.proc = cluster, submission_id, proc

    @property
    def info(self) -> dict:
        return self.cluster.get_json(f"/api/jobs/{self.submission_id}")

    def logs(self) -> str:
        return self.cluster.get_json(f"/api/jobs/{self.submission_id}/logs").get("logs", "")


def submit(cluster: LocalRayCluster, command: str, *args: str, name: str) -> Job:
    """`infra/submit.sh COMMAND ARGS` against the cluster; waits for the job to end."""
    submission_id = f"{name}-{int(time.time() * 1000)}"
    proc = subprocess.run(
        ["bash", str(SUBMIT), "--address", cluster.dashboard_url, "--submission-id", submission_id, command, *args],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    job = Job(cluster, submission_id, proc)
    status = job.info["status"]
    assert proc.returncode == 0 and status == "SUCCEEDED", (
        f"job {submission_id} ended {status} (submit.sh exit {proc.returncode})\n"
        f"--- output ---\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    return job


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def state(cluster: LocalRayCluster, kind: str, job: Job) -> list[dict]:
    """Ray's state API (tasks or actors) for one job, through the dashboard with the cluster token."""
    query = urllib.parse.urlencode(
        {
            "limit": 10000,
            "detail": "true",
            "filter_keys": "job_id",
            "filter_predicates": "=",
            "filter_values": job.info["job_id"],
        }
    )
    reply = cluster.get_json(f"/api/v0/{kind}?{query}")
    return reply["data"]["result"]["result"]


DATA_STAGE = re.compile(r"MapWorker|MapBatches|ReadParquet|Read[A-Z]\w*|Map\(")


def data_stage_work(cluster: LocalRayCluster, job: Job) -> list[dict]:
    """Ray Data's tasks and actor-pool calls of a job (not its bookkeeping actors)."""
    return [t for t in state(cluster, "tasks", job) if DATA_STAGE.search(t.get("name", ""))]


def nodes_of(entries: list[dict]) -> set[str]:
    return {e["node_id"] for e in entries if e.get("node_id")}


def read_jsonl(fs, path: str) -> list[dict]:
    with fs.open(path, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --- the tests: one flow, pipeline -> train -> resume -> eval, every path on s3:// ------------


@pytest.fixture(scope="module")
def flow(s3, demo):
    """The job config of the flow, itself on S3: URL list, shards, runs and results all on s3://."""
    import yaml

    fs = s3.filesystem()
    base = f"s3://{BUCKET}/flow"
    fs.put(str(demo["urls"]), f"{BUCKET}/flow/lists/urls.parquet")
    config = {
        "data": {"input": f"{base}/lists/urls.parquet", "output": f"{base}/data", **DATA_SETTINGS},
        "model": {"name": "ViT-Tiny"},
        "train": {
            "data": [f"{base}/data/shards"],
            "storage_path": f"{base}/runs",
            "name": "clip",
            "samples": FIRST_SAMPLES,
            **TRAIN_SETTINGS,
        },
        "eval": {
            "model": f"{base}/runs/clip/final",
            "dataset": f"{base}/data/shards",
            "task": "zeroshot",
            "label_col": "color",
            "output": f"{base}/eval/zeroshot-color.json",
            "report": False,
        },
        "ray": {"include_dashboard": False},
    }
    fs.pipe_file(f"{BUCKET}/flow/job.yaml", yaml.safe_dump(config).encode())
    return {"fs": fs, "bucket_dir": f"{BUCKET}/flow", "config": ["--config", f"{base}/job.yaml"]}


@pytest.fixture(scope="module")
def pipeline_job(cluster, flow):
    return submit(cluster, "pipeline", *flow["config"], name="pipeline")


@pytest.fixture(scope="module")
def train_job(cluster, flow, pipeline_job):
    return submit(cluster, "train", *flow["config"], name="train")


def test_submitted_pipeline_writes_shards_rejects_and_manifest_to_s3(pipeline_job, flow, demo):
    fs, d = flow["fs"], flow["bucket_dir"]
    manifest = json.loads(fs.cat_file(f"{d}/data/manifest.json"))
    assert manifest["input_rows"] == demo["rows"]
    assert manifest["accepted"] + manifest["rejected"] == manifest["input_rows"]
    assert manifest["rejected"] >= 3 and manifest["accepted"] >= demo["rows"] - 10  # the 3 broken URLs
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["accepted"]
    assert len(fs.glob(f"{d}/data/shards/*.parquet")) >= 2 and fs.glob(f"{d}/data/rejects/*.parquet")


def test_submitted_training_puts_one_worker_on_each_node_with_data_on_both(train_job, flow, cluster):
    fs, run = flow["fs"], f"{flow['bucket_dir']}/runs/clip"
    assert fs.exists(f"{run}/final/model.safetensors") and fs.exists(f"{run}/final/model_config.json")
    metrics = read_jsonl(fs, f"{run}/metrics.jsonl")
    assert metrics and metrics[-1]["samples_seen"] >= FIRST_SAMPLES
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    assert [p for p in fs.ls(run, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_")], fs.ls(run)

    actors = state(cluster, "actors", train_job)
    train_workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(train_workers) == 2, sorted(a["class_name"] for a in actors)
    assert len(nodes_of(train_workers)) == 2, "both training workers ran on one node"
    # Training's data stages (read, decode, crop, tokenize) ran on both nodes too.
    work = data_stage_work(cluster, train_job)
    assert len(nodes_of(work)) == 2, sorted({(t["name"], (t.get("node_id") or "-")[:6]) for t in work})


def test_submitted_training_resumes_from_its_checkpoint_on_s3(train_job, flow, cluster):
    fs, run = flow["fs"], f"{flow['bucket_dir']}/runs/clip"
    first = read_jsonl(fs, f"{run}/metrics.jsonl")
    # The same storage_path and name with more samples: the run continues where it stopped.
    resumed = submit(cluster, "train", *flow["config"], *sets(f"train.samples={RESUMED_SAMPLES}"), name="resume")
    after = read_jsonl(fs, f"{run}/metrics.jsonl")
    assert after[: len(first)] == first, "the resumed run rewrote the first run's metrics"
    new_rows = after[len(first) :]
    assert new_rows and new_rows[0]["step"] > first[-1]["step"] - TRAIN_CHECKPOINT_EVERY, (
        f"the second run started at step {new_rows[0]['step'] if new_rows else None}, not near {first[-1]['step']}"
    )
    assert after[-1]["samples_seen"] >= RESUMED_SAMPLES
    assert re.search(r"resum", resumed.logs(), re.I), "the resumed run's log does not say it resumed"


def test_submitted_eval_reads_the_model_from_s3_and_writes_results_there(train_job, flow, cluster):
    submit(cluster, "eval", *flow["config"], name="eval")
    result = json.loads(flow["fs"].cat_file(f"{flow['bucket_dir']}/eval/zeroshot-color.json"))
    assert result["task"] == "zeroshot_classification" and set(result["metrics"]) >= {"acc1", "mean_per_class_recall"}
    # acc5 is reported exactly when there are at least 5 classes (CLIP_benchmark's rule).
    assert ("acc5" in result["metrics"]) == (result["clipray"]["num_classes"] >= 5)
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0


def test_local_paths_are_refused_on_the_two_node_cluster_before_any_work(cluster, tmp_path):
    """The multi-node guard (clipray/shared_paths.py) against the real cluster: a training job whose
    storage_path is a local folder stops naming the key, and nothing is written there."""
    runs = tmp_path / "runs"
    argv = ["--set", f"ray.address={cluster.gcs_address}", "--set", f"train.storage_path={runs}"]
    argv += ["--set", "train.data=[s3://clipray-e2e/none]"]
    proc = subprocess.run(
        [sys.executable, "-m", "training", *argv], env=cluster.env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the Ray cluster has 2 nodes" in proc.stderr and f"train.storage_path = '{runs}'" in proc.stderr
    assert "train.data" not in proc.stderr.split("local paths")[-1]  # s3:// reaches every node
    assert not runs.exists()
