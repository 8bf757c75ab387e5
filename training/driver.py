"""Ray Train V2 driver: `run_training(model, train) -> TrainingResult`.

The driver takes the run folder's lock, lists the shards, sizes the preprocessing, builds one typed
`WorkerPlan` and starts a `TorchTrainer` whose workers run `training.worker.train_worker`. The
controller callbacks (`training.callbacks`) write metrics.jsonl and TensorBoard files and print a
progress line per report.

Layout under `{train.storage_path}/{train.name}/`: `checkpoint_<step>/` (model.safetensors,
model_config.json, the trainer state, data_position.json), `metrics.jsonl`, `tensorboard/`, `final/`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from storage import Folder, FolderLock, join
from training.config import ModelConfig, TrainConfig
from training.worker import FINAL_DIR, SAMPLE_LOG_ENV, WorkerPlan, train_worker

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    path: str  # the run directory ({storage_path}/{name}), as a local path or URL
    final_dir: str  # {path}/final
    metrics: dict = field(default_factory=dict)  # the last reported row (rank 0's, global values)
    checkpoint: Optional[str] = None  # the latest checkpoint's path


def run_folder(train: TrainConfig) -> Folder:
    """The run's folder `{train.storage_path}/{train.name}` (local path or URI)."""
    return Folder(join(train.storage_path, train.name), train)


def preprocess_actors(train: TrainConfig, cluster_cpus: float) -> int:
    """Preprocessing actors per worker: `train.num_preprocess_actors`, or as many as the CPUs left
    by the Train workers allow (1 to 8 per worker), counted for the largest group the run may have
    (an elastic group may grow to `max`)."""
    if train.num_preprocess_actors is not None:
        return train.num_preprocess_actors
    workers = train.max_workers
    free = cluster_cpus - workers * train.cpus_per_worker
    return int(max(1, min(8, math.floor(free / (workers * train.preprocess_cpus)))))


def architecture(model: ModelConfig, train: TrainConfig):
    """`model.name`, or, when only `model.pretrained` is given, the config that checkpoint carries
    (ours, open_clip's or Hugging Face's), so fine-tuning needs no matching name."""
    from training.model.external_dirs import stored_config

    if model.pretrained and "name" not in model.model_fields_set:
        found = stored_config(model.pretrained, train)
        if found is not None:
            log.info("train: architecture from model.pretrained %s", model.pretrained)
            return found
    return model.name


def check_locks(model_dict: dict, train: TrainConfig) -> None:
    """Unlocked group counts within the towers (before any worker starts)."""
    from training.model.lock import group_counts

    image, text = group_counts(model_dict)
    for key, groups in (("lock_image_unlocked_groups", image), ("lock_text_unlocked_layers", text)):
        if getattr(train, key) > groups:
            raise ValueError(f"train.{key} {getattr(train, key)} is more than the tower's {groups} groups")
    if train.lock_image and train.lock_text and not train.learn_temperature and train.loss == "clip":
        if not (train.lock_image_unlocked_groups or train.lock_text_unlocked_layers):
            raise ValueError(
                "train.lock_image and train.lock_text lock both towers and the temperature is fixed: "
                "nothing would train (unlock groups or set train.learn_temperature)"
            )


def worker_plan(model: ModelConfig, train: TrainConfig, cluster_cpus: float) -> WorkerPlan:
    """List the shards and size the preprocessing: the plan every worker runs (no Ray needed)."""
    from training.flops import clip_forward_flops
    from training.ingest import list_shards, list_training_shards, plan_fingerprint
    from training.model.config import resolve_config

    data_fs, shards = list_training_shards(train.data, train, what="train.data")
    val_fs, val_shards = (None, [])
    if train.val_data:
        val_fs, val_shards = list_shards(train.val_data, train, what="train.val_data")
    model_dict = resolve_config(architecture(model, train), model.width_mult)
    check_locks(model_dict, train)
    actors = preprocess_actors(train, cluster_cpus)
    data_cpus = actors * train.preprocess_cpus
    per_worker = train.cpus_per_worker + data_cpus
    if train.min_workers * per_worker > cluster_cpus:
        log.warning(
            "train: %d workers x (%.2f CPU + %d preprocessing actors x %.2f CPU) = %.1f CPUs, but the "
            "cluster has %.1f; the run waits until the cluster grows (lower train.num_preprocess_actors "
            "or train.preprocess_cpus otherwise)",
            train.min_workers,
            train.cpus_per_worker,
            actors,
            train.preprocess_cpus,
            train.min_workers * per_worker,
            cluster_cpus,
        )
    elif train.max_workers * per_worker > cluster_cpus:
        log.info(
            "train: the cluster's %.1f CPUs hold fewer than train.num_workers' max %d workers (%.1f CPUs "
            "each with their preprocessing); the elastic group starts smaller and grows with the cluster",
            cluster_cpus,
            train.max_workers,
            per_worker,
        )
    log.info(
        "train: %d shards, %d rows; %d steps of %d; %d preprocessing actors per worker",
        len(shards),
        sum(s.rows for s in shards),
        train.total_steps,
        train.batch_size,
        actors,
    )
    return WorkerPlan(
        model=model,
        train=train,
        model_dict=model_dict,
        shards=tuple(shards),
        data_fs=data_fs,
        val_shards=tuple(val_shards),
        val_fs=val_fs,
        plan_id=plan_fingerprint(shards, train.seed, train.source_weights, train.shuffle_rows),
        preprocess_actors=actors,
        data_cpus=data_cpus,
        # Forward FLOPs per sample for each number of text positions the tower may run (it stops
        # after the batch's longest caption unless compiled).
        flops_by_text_tokens=tuple(
            clip_forward_flops(model_dict, text_tokens=n)["total"]
            for n in range(model_dict["text_cfg"]["context_length"] + 1)
        ),
        run=run_folder(train),
        sample_log=os.environ.get(SAMPLE_LOG_ENV) or None,
    )


def refuse_legacy_checkpoint(run: Folder) -> None:
    """Stop before any worker starts when the run's latest checkpoint holds only the pickled trainer
    state of an older clipray (each worker would refuse it, once per restart)."""
    from training.trainer_state import JSON_FILE, LEGACY_FILE, legacy_checkpoint_error

    try:
        entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in run.fs.ls(run.root, detail=False)]
    except FileNotFoundError:
        return
    checkpoints = sorted(e for e in entries if e.startswith("checkpoint_"))
    if (
        checkpoints
        and run.exists(f"{checkpoints[-1]}/{LEGACY_FILE}")
        and not run.exists(f"{checkpoints[-1]}/{JSON_FILE}")
    ):
        raise legacy_checkpoint_error(run.full_url(checkpoints[-1]))


def run_training(model: ModelConfig, train: TrainConfig, *, callbacks: Optional[list] = None) -> TrainingResult:
    """Train a CLIP as `train` says, on the running Ray cluster; see the module docstring."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_compat import data_context
    from training.callbacks import MetricsCallback, ProgressCallback

    if not ray.is_initialized():
        raise RuntimeError("run_training needs a running Ray: call ray.init() (the CLI's init_ray does)")
    plan = worker_plan(model, train, float(ray.cluster_resources().get("CPU", 0.0)))
    run = plan.run
    refuse_legacy_checkpoint(run)
    storage_fs, storage_root = Folder(train.storage_path, train).pyarrow()
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    if train.elastic and train.max_failures == 0:
        log.warning(
            "train: train.num_workers %s is elastic but train.max_failures is 0: a lost worker ends "
            "the run (only drained, preempted nodes restart it); set train.max_failures (-1: always)",
            list(train.num_workers),
        )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan},
        # A (min, max) tuple makes Ray Train's group elastic (docs/training.md, "Elastic worker groups").
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=train.name,
            storage_path=storage_root,
            storage_filesystem=None if run.local else storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            callbacks=[MetricsCallback(run), ProgressCallback(train.name, train.total_steps), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level=train.log_level),
        ),
    )
    data_context()  # Ray Train reads it in fit(); built here without Ray 2.60's spurious warnings
    with FolderLock(run, f"clipray train {train.name}"):
        result = trainer.fit()
    checkpoint = getattr(result, "checkpoint", None)
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    return TrainingResult(
        path=run.url,
        final_dir=f"{run.url}/{FINAL_DIR}",
        metrics=metrics,
        checkpoint=None if checkpoint is None else checkpoint.path,
    )
