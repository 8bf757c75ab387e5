"""Ray Train V2 runner: `run_training(model, train) -> TrainingResult`.

The driver lists the shards, sizes the preprocessing, and starts a `TorchTrainer` whose workers
each run `_Worker`: build the model, restore the latest checkpoint if there is one (rerun with the
same name, or a restart after a failure), read their own deterministic stream of the shards
(`training.data.ShardStream`), step `training.loop.TrainLoop`, and every `train.log_every` steps
call `ray.train.report` (the only per-step Ray call; every `train.checkpoint_every` steps with a
checkpoint). A controller-side callback writes metrics.jsonl and TensorBoard files. At the end
rank 0 writes `final/` (model.safetensors + model_config.json).

Layout under `{train.storage_path}/{train.name}/`: `checkpoint_<step>/` (model.safetensors,
model_config.json, trainer_state.pt), `metrics.jsonl`, `tensorboard/`, `final/`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from training.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

FINAL_DIR = "final"
POSITION_FILE = "data_position.json"  # in each checkpoint: step, plan fingerprint, every worker's position


@contextmanager
def _no_folder():
    yield None


def _read_position(folder: Optional[str]) -> Optional[dict]:
    if folder is None:
        return None
    path = os.path.join(folder, POSITION_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {folder} has no {POSITION_FILE}: it was not written by clipray's trainer")
    with open(path) as fh:
        return json.load(fh)


@dataclass
class TrainingResult:
    path: str  # the run directory ({storage_path}/{name}), as a local path or URL
    final_dir: str  # {path}/final
    metrics: dict = field(default_factory=dict)  # the last reported row (rank 0's, global values)
    checkpoint: Optional[str] = None  # the latest checkpoint's path


# ----------------------------------------------------------------------------------- storage
@dataclass
class Storage:
    """Where the run lives: `uri` for people, (`filesystem`, `fs_path`) for code."""

    uri: str
    filesystem: Any  # pyarrow filesystem
    root_fs_path: str  # storage_path inside the filesystem
    fs_path: str  # run directory inside the filesystem
    local: bool


def s3_filesystem(endpoint_url: Optional[str]):
    """A pyarrow S3FileSystem for an S3-compatible endpoint; credentials and region from the
    standard AWS environment variables (read here, at the edge, once)."""
    from pyarrow import fs as pafs

    scheme, _, host = endpoint_url.partition("://") if endpoint_url else ("https", "", "")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                              or "us-east-1"}
    if host:
        kwargs.update(endpoint_override=host, scheme=scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    return pafs.S3FileSystem(**kwargs)


def resolve_storage(train: TrainConfig) -> Storage:
    from pyarrow import fs as pafs

    path = train.storage_path
    if "://" not in path or path.startswith("file://"):
        root = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
        run = os.path.join(root, train.name)
        return Storage(run, pafs.LocalFileSystem(), root, run, True)
    endpoint = train.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if path.startswith("s3://"):
        filesystem = s3_filesystem(endpoint)
        root = path[len("s3://"):].rstrip("/")
    else:
        filesystem, root = pafs.FileSystem.from_uri(path)
    return Storage(f"{path.rstrip('/')}/{train.name}", filesystem, root, f"{root}/{train.name}", False)


def data_filesystem(train: TrainConfig, locations: list[str]):
    """The filesystem for shard locations: the S3 endpoint's for s3:// ones, else inferred."""
    if any(loc.startswith("s3://") for loc in locations):
        endpoint = train.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return s3_filesystem(endpoint)
    return None


# ------------------------------------------------------------------------------------ driver
def preprocess_actors(train: TrainConfig, cluster_cpus: float) -> int:
    """Preprocessing actors per worker: `train.num_preprocess_actors`, or as many as the CPUs left
    by the Train workers allow (1 to 8 per worker)."""
    if train.num_preprocess_actors is not None:
        return train.num_preprocess_actors
    free = cluster_cpus - train.num_workers * train.cpus_per_worker
    return int(max(1, min(8, math.floor(free / (train.num_workers * train.preprocess_cpus)))))


def run_training(model: ModelConfig, train: TrainConfig, *, callbacks: Optional[list] = None) -> TrainingResult:
    """Train a CLIP as `train` says, on the running Ray cluster; see the module docstring."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_compat import data_context
    from training.data import list_shards, plan_fingerprint
    from training.flops import clip_forward_flops
    from training.model.config import resolve_config

    if not ray.is_initialized():
        raise RuntimeError("run_training needs a running Ray: call ray.init() (the CLI's init_ray does)")
    storage = resolve_storage(train)
    data_fs, shards = list_shards(train.data, data_filesystem(train, train.data), what="train.data")
    val_fs, val_shards = (None, [])
    if train.val_data:
        val_fs, val_shards = list_shards(train.val_data, data_filesystem(train, train.val_data), what="train.val_data")
    model_dict = resolve_config(model.name, model.width_mult)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    actors = preprocess_actors(train, cluster_cpus)
    data_cpus = actors * train.preprocess_cpus
    needed = train.num_workers * (train.cpus_per_worker + data_cpus)
    if needed > cluster_cpus:
        log.warning("train: %d workers x (%.2f CPU + %d preprocessing actors x %.2f CPU) = %.1f CPUs, but the "
                    "cluster has %.1f; the run waits until the cluster grows (lower train.num_preprocess_actors "
                    "or train.preprocess_cpus otherwise)", train.num_workers, train.cpus_per_worker, actors,
                    train.preprocess_cpus, needed, cluster_cpus)
    total_samples = sum(s.rows for s in shards)
    log.info("train: %d shards, %d rows; %d steps of %d; %d preprocessing actors per worker",
             len(shards), total_samples, train.total_steps, train.batch_size, actors)

    metrics_cb = MetricsCallback(storage)
    progress_cb = ProgressCallback(train.name, train.total_steps)
    config = {
        "model": model.model_dump(mode="json"), "model_dict": model_dict, "train": train.model_dump(mode="json"),
        "shards": shards, "data_fs": data_fs, "val_shards": val_shards, "val_fs": val_fs,
        "plan": plan_fingerprint(shards, train.num_workers, train.seed),
        "preprocess_actors": actors, "data_cpus": data_cpus,
        # Forward FLOPs per sample for each number of text positions the tower may run (it stops
        # after the batch's longest caption unless compiled).
        "flops_by_text_tokens": [clip_forward_flops(model_dict, text_tokens=n)["total"]
                                 for n in range(model_dict["text_cfg"]["context_length"] + 1)],
        "storage": storage,
    }
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=train.name,
            storage_path=storage.root_fs_path,
            storage_filesystem=None if storage.local else storage.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            callbacks=[metrics_cb, progress_cb, *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level=train.log_level),
        ),
    )
    data_context()  # Ray Train reads it in fit(); built here without Ray 2.60's spurious warnings
    result = trainer.fit()
    checkpoint = getattr(result, "checkpoint", None)
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    return TrainingResult(path=storage.uri, final_dir=f"{storage.uri}/{FINAL_DIR}", metrics=metrics,
                          checkpoint=None if checkpoint is None else checkpoint.path)


# --------------------------------------------------------------------------- controller side
def _user_callback_base():
    from ray.train import UserCallback

    return UserCallback


class MetricsCallback(_user_callback_base()):
    """On the Ray Train controller: every report's rank-0 row -> metrics.jsonl + TensorBoard.
    Remote storage: written to a staging folder and uploaded at each checkpoint and at the end."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._writer = None
        self._staging: Optional[str] = None

    def _open(self):
        from training.metrics import METRICS_FILE, MetricsWriter, download_file

        if self._writer is None:
            if self.storage.local:
                folder = self.storage.fs_path
            else:
                self._staging = tempfile.mkdtemp(prefix="clipray-metrics-")
                folder = self._staging
                download_file(self.storage.filesystem, f"{self.storage.fs_path}/{METRICS_FILE}",
                              os.path.join(folder, METRICS_FILE))
            self._writer = MetricsWriter(folder)
        return self._writer

    def after_report(self, run_context, metrics: list, checkpoint) -> None:
        if not metrics:
            return
        row = {k: v for k, v in metrics[0].items() if not k.startswith("_")}
        writer = self._open()
        writer.write(row)
        if checkpoint is not None or metrics[0].get("_last"):
            self._upload()
        if metrics[0].get("_last"):
            self._close()

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        # Keep what was logged (a failed run's metrics matter most), then close: if Ray Train
        # restarts the worker group (train.max_failures), the next report reopens the writer.
        self._upload()
        self._close()

    def _upload(self) -> None:
        """A remote run: copy the staging folder (metrics.jsonl, tensorboard/) to the run folder."""
        if not self.storage.local and self._staging is not None:
            from training.metrics import upload_folder

            upload_folder(self._staging, self.storage.filesystem, self.storage.fs_path)

    def _close(self) -> None:
        """Close the writer; a remote run's staging folder is already uploaded and goes."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


class ProgressCallback(_user_callback_base()):
    """On the Ray Train controller: one short progress line per report (at most one every
    `every_s` seconds, and always for checkpoints and the last step), in place of Ray Train's
    per-report log records (`train.log_level` hides those)."""

    def __init__(self, name: str, total_steps: int, every_s: float = 10.0):
        self.name, self.total_steps, self.every_s = name, total_steps, every_s
        self._last_print = -math.inf

    def after_report(self, run_context, metrics: list, checkpoint) -> None:
        if not metrics:
            return
        row, now = metrics[0], time.monotonic()
        if checkpoint is None and not row.get("_last") and now - self._last_print < self.every_s:
            return
        self._last_print = now
        print(progress_line(self.name, self.total_steps, row, checkpoint is not None), flush=True)


def progress_line(name: str, total_steps: int, row: dict, checkpointed: bool = False) -> str:
    """`train demo: step 100/391 (26%) loss 2.141 | 342 samples/s | data wait 1% | checkpoint`"""
    step = row.get("step", 0)
    parts = [f"train {name}: step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    if isinstance(row.get("loss"), (int, float)):
        parts[0] += f" loss {row['loss']:.3f}"
    if isinstance(row.get("val_loss"), (int, float)):
        parts.append(f"val loss {row['val_loss']:.3f}")
    if isinstance(row.get("samples_per_s"), (int, float)):
        parts.append(f"{row['samples_per_s']:,.0f} samples/s")
    wait, step_time = row.get("data_wait_s"), row.get("step_time_s")
    if isinstance(wait, (int, float)) and isinstance(step_time, (int, float)) and step_time > 0:
        parts.append(f"data wait {100 * wait / step_time:.0f}%")
    if checkpointed:
        parts.append("checkpoint")
    return " | ".join(parts)


# ------------------------------------------------------------------------------- worker side
def _train_worker(config: dict) -> None:
    _Worker(config).run()


class _Worker:
    """One Ray Train worker. The data stream starts first (its actors start up while the model is
    built and the checkpoint restored), from the position stored in the checkpoint."""

    def __init__(self, config: dict):
        import numpy as np
        import ray.train
        import ray.train.torch
        import torch

        from ray_compat import set_train_report_log_level
        from training.data import PreprocessSettings, ShardStream, StreamSettings
        from training.loop import LoopSettings, TrainLoop, gather_objects, load_checkpoint
        from training.model import create_model, load_model

        self.config = config
        self.train = train = TrainConfig.model_validate(config["train"])
        model = ModelConfig.model_validate(config["model"])
        set_train_report_log_level(train.log_level)
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))  # the CPUs this worker holds
        self.total_steps = train.total_steps
        self.local_batch = train.batch_size // self.world_size
        self.gather = gather_objects

        checkpoint = ray.train.get_checkpoint()
        with (checkpoint.as_directory() if checkpoint is not None else _no_folder()) as folder:
            saved = _read_position(folder)
            self.position, done = self._start_position(saved)
            vision, text = config["model_dict"]["vision_cfg"], config["model_dict"]["text_cfg"]
            preprocess = PreprocessSettings(image_size=vision["image_size"], context_length=text["context_length"],
                                            train=True, seed=train.seed, crop_scale_min=train.crop_scale_min,
                                            decoder=train.decoder)
            self.stream_settings = StreamSettings(
                local_batch=self.local_batch, preprocess=preprocess, num_actors=config["preprocess_actors"],
                cpus_per_actor=train.preprocess_cpus, prefetch_batches=train.prefetch_batches,
                pin_memory=self.device.type == "cuda", data_cpus=config["data_cpus"], shuffle_rows=train.shuffle_rows)
            self.stream = None
            if done < self.total_steps:
                self.stream = ShardStream(config["shards"], config["data_fs"], rank=self.rank,
                                          world_size=self.world_size, seed=train.seed, start=self.position,
                                          settings=self.stream_settings,
                                          rows_needed=(self.total_steps - done) * self.local_batch).start()

            torch.manual_seed(train.seed)  # the same initial weights on every rank
            clip = create_model(config["model_dict"], temperature_init=train.temperature_init,
                                learn_temperature=train.learn_temperature, patch_dropout=model.patch_dropout,
                                grad_checkpointing=model.grad_checkpointing)
            if model.pretrained and folder is None:
                clip.load_state_dict(load_model(model.pretrained).state_dict(), strict=True)
            # From here on every rank draws its own random numbers (patch dropout).
            torch.manual_seed(train.seed * 1000 + self.rank + 1)
            np.random.seed((train.seed * 1000 + self.rank + 1) % 2 ** 32)
            self.loop = TrainLoop(clip, LoopSettings.from_train_config(train, self.total_steps), self.device)
            self.pids = gather_objects(os.getpid())
            self.restored_from = None
            if folder is not None:
                load_checkpoint(self.loop, folder)
                self.restored_from = self.loop.step_count
        self.val_data = None
        self.val_loaded = False
        self.zeroshot = None

    def _start_position(self, saved: Optional[dict]):
        """(this worker's DataPosition, steps already done) from a checkpoint's data_position.json."""
        from training.data import DataPosition

        if saved is None:
            return DataPosition(0, 0), 0
        positions = saved.get("positions") or []
        if saved.get("plan") == self.config["plan"] and len(positions) == self.world_size:
            return DataPosition.from_dict(positions[self.rank]), int(saved["step"])
        # Other shards or another worker count: positions do not map; start a fresh pass.
        next_pass = 1 + max((p["pass"] for p in positions), default=-1)
        if self.rank == 0:
            log.warning("train: the shards or train.num_workers changed since the checkpoint; the data position "
                        "cannot be kept, continuing with pass %d from its start", next_pass)
        return DataPosition(next_pass, 0), int(saved["step"])

    # ------------------------------------------------------------------------- main loop
    def run(self) -> None:
        import torch

        train, loop, stream = self.train, self.loop, self.stream
        if stream is not None:
            self._window_start(stream)
            loss_sum = torch.zeros((), device=self.device)
            steps_in_window = 0
            for batch in stream:
                self._flops += self._batch_flops(batch.tokens)
                result = loop.step(batch.images, batch.tokens)
                self.position = batch.position
                loss_sum += result.loss
                steps_in_window += 1
                step = loop.step_count
                last = step >= self.total_steps
                checkpoint_due = step % train.checkpoint_every == 0 or last
                val_due = train.val_every is not None and (step % train.val_every == 0 or last)
                if step % train.log_every == 0 or checkpoint_due or val_due:
                    self._report(stream, loss_sum, steps_in_window, result.lr, checkpoint_due, val_due, last)
                    loss_sum = torch.zeros((), device=self.device)
                    steps_in_window = 0
                    self._window_start(stream)
                if last:
                    break
            stream.close()
            if loop.step_count < self.total_steps:
                raise RuntimeError(
                    f"train.data ran out after step {loop.step_count} of {self.total_steps}: rank {self.rank} "
                    f"rejected {dict(stream.rebatcher.rejected)} rows; check the shards")
        self._write_final()

    def _batch_flops(self, tokens) -> float:
        """Forward FLOPs of this worker's batch: the text tower runs up to the last end-of-text
        token rounded up to 8 (all positions when compiled), as training/model does."""
        table = self.config["flops_by_text_tokens"]
        context = len(table) - 1
        if self.train.compile:
            return table[context] * tokens.shape[0]
        last = int(tokens.argmax(dim=-1).max()) + 1
        return table[min(context, -(-last // 8) * 8)] * tokens.shape[0]

    def _window_start(self, stream) -> None:
        self._flops = 0.0
        self._t0 = time.perf_counter()
        self._samples0 = self.loop.samples_seen
        self._wait0 = stream.data_wait_s

    # ------------------------------------------------------------------------- reporting
    def _report(self, stream, loss_sum, steps: int, lr: float, with_checkpoint: bool, validate: bool,
                last: bool) -> None:
        import ray.train
        import torch
        import torch.distributed as dist

        from training.flops import mfu, peak_flops
        from training.loop import save_checkpoint

        elapsed = time.perf_counter() - self._t0
        stats = torch.stack([loss_sum.float().detach(), torch.tensor(float(steps), device=self.device),
                             torch.tensor(stream.data_wait_s - self._wait0, device=self.device),
                             torch.tensor(self._flops, device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(stats)
        loss, wait = (stats[0] / stats[1]).item(), (stats[2] / stats[1]).item()
        forward_flops = stats[3].item()  # all workers, this window
        samples_per_s = (self.loop.samples_seen - self._samples0) / max(elapsed, 1e-9)
        scale = self.loop.module.clip.logit_scale.detach().exp().item()
        metrics: dict[str, Any] = {
            "step": self.loop.step_count, "samples_seen": self.loop.samples_seen, "loss": loss, "lr": lr,
            "logit_scale": scale, "temperature": 1.0 / scale, "samples_per_s": samples_per_s,
            "step_time_s": elapsed / max(steps, 1), "data_wait_s": wait, "pass": self.position.pass_index,
            "rejected": sum(stream.rebatcher.rejected.values()), "pids": self.pids,
        }
        if self.loop.module.logit_bias is not None:
            metrics["logit_bias"] = self.loop.module.logit_bias.item()
        if self.restored_from is not None:
            metrics["restored_from_step"] = self.restored_from
        if self.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(self.device), self.train.precision)
            samples = max(1, self.loop.samples_seen - self._samples0)
            value = mfu(samples_per_s, forward_flops / samples, peak, self.world_size)
            if value is not None:
                metrics["mfu"] = value
        if validate:
            metrics.update(self._validate())
        if last:
            metrics["_last"] = True
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        saved = {"step": self.loop.step_count, "plan": self.config["plan"],
                 "positions": self.gather(self.position.as_dict())}
        with tempfile.TemporaryDirectory(prefix="clipray-ckpt-") as folder:
            save_checkpoint(self.loop, folder, {"data": saved})
            if self.rank == 0:
                with open(os.path.join(folder, POSITION_FILE), "w") as fh:
                    json.dump(saved, fh)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_{self.loop.step_count:09d}")

    # ------------------------------------------------------------------------- validation
    def _validate(self) -> dict:
        import torch

        from training.data import PreprocessSettings, eval_dataset, iter_eval_batches
        from training.validation import ZeroShot, concat_features, contrastive_metrics

        train = self.train
        if not self.val_loaded:
            clip = self.loop.module.clip
            settings = PreprocessSettings(image_size=clip.image_size, context_length=clip.context_length,
                                          train=False, decoder=train.decoder)
            self.val_data = eval_dataset(self.config["val_shards"], self.config["val_fs"], rank=self.rank,
                                         world_size=self.world_size, settings=self.stream_settings,
                                         preprocess=settings)
            if train.zeroshot_data:
                self.zeroshot = ZeroShot(train.zeroshot_data, train.zeroshot_classnames, train.zeroshot_templates,
                                         rank=self.rank, world_size=self.world_size)
            self.val_loaded = True
        dim = int(self.loop.module.clip.config["embed_dim"])
        images, texts = [], []
        for batch in iter_eval_batches(self.val_data, self.local_batch):
            image_f, text_f = self.loop.embed(batch["image"], batch["tokens"])
            images.append(image_f.cpu())
            texts.append(text_f.cpu())
        gathered = self.gather((concat_features(images, dim), concat_features(texts, dim)))
        metrics: dict[str, Any] = {}
        if self.rank == 0:
            bias = self.loop.module.logit_bias
            metrics = contrastive_metrics(
                concat_features([g[0] for g in gathered], dim), concat_features([g[1] for g in gathered], dim),
                self.loop.module.clip.logit_scale.exp().item(), None if bias is None else bias.item(),
                loss=train.loss, chunk=train.val_batch_size or train.batch_size)
        if self.zeroshot is not None:
            with torch.no_grad():
                metrics.update(self.zeroshot.evaluate(self.loop.module.clip, self.device, self.gather))
        return metrics

    # ------------------------------------------------------------------------- final/
    def _write_final(self) -> None:
        from training.metrics import upload_folder
        from training.model import create_model, save_model

        state = self.loop.model_state_dict()  # every rank (gathers under FSDP)
        if self.rank != 0:
            return
        storage: Storage = self.config["storage"]
        clip = create_model(self.loop.module.clip.config, device="meta")
        clip.load_state_dict(state, strict=True, assign=True)
        if storage.local:
            save_model(clip, os.path.join(storage.fs_path, FINAL_DIR))
            return
        with tempfile.TemporaryDirectory(prefix="clipray-final-") as folder:
            save_model(clip, folder)
            upload_folder(folder, storage.filesystem, f"{storage.fs_path}/{FINAL_DIR}")
