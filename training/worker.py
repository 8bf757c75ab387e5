"""What each Ray Train worker runs: `train_worker({"plan": WorkerPlan})`.

The driver (`training/driver.py`) builds one typed `WorkerPlan`, checked once; every worker then:
starts its data stream first (the preprocessing actors start up while the model is built), from the
position stored in the latest checkpoint; builds the model with the same initial weights on every
rank; restores the checkpoint; steps `training.loop.TrainLoop`; every `train.log_every` steps
reports global metrics through `ray.train.report` (the only per-step Ray call), with a checkpoint
every `train.checkpoint_every` steps; and at the end rank 0 writes `final/`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from storage import Folder
from training.config import ModelConfig, TrainConfig
from training.ingest import DataPosition, Shard
from training.model import CheckpointError

log = logging.getLogger(__name__)

FINAL_DIR = "final"
POSITION_FILE = "data_position.json"  # in each checkpoint: step, plan id, positions, the passes' bases
SAMPLE_LOG_ENV = "CLIPRAY_TEST_SAMPLE_LOG"  # tests only: a folder where each worker logs the keys it trained on


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, built and checked once by the driver (picklable)."""

    model: ModelConfig
    train: TrainConfig
    model_dict: dict  # the resolved open_clip-layout model config (width-scaled)
    shards: tuple[Shard, ...]
    data_fs: Any  # pyarrow filesystem of the shards
    val_shards: tuple[Shard, ...]
    val_fs: Any
    plan_id: str  # fingerprint of (shards, seed, weights, shuffle windows): a data position refers to it
    preprocess_actors: int  # per worker
    data_cpus: float  # Ray Data CPU limit per worker
    flops_by_text_tokens: tuple[float, ...]  # forward FLOPs per sample for 0..context_length text positions
    run: Folder  # {storage_path}/{name}
    sample_log: Optional[str] = None  # tests only: the driver's CLIPRAY_TEST_SAMPLE_LOG (`_sample_log`)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("a worker plan needs at least one shard")
        context = self.model_dict["text_cfg"]["context_length"]
        if len(self.flops_by_text_tokens) != context + 1:
            raise ValueError(
                f"flops_by_text_tokens has {len(self.flops_by_text_tokens)} entries, expected {context + 1}"
            )
        if self.preprocess_actors < 1:
            raise ValueError(f"preprocess_actors must be >= 1, got {self.preprocess_actors}")
        if self.train.val_every is not None and not self.val_shards:
            raise ValueError("train.val_every is set but the plan has no validation shards")


@dataclass(frozen=True)
class Placement:
    """This worker's place in the group."""

    rank: int
    world_size: int
    device: Any  # torch.device
    local_batch: int


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config` is `{"plan": WorkerPlan}`."""
    import ray.train

    from ray_compat import set_train_report_log_level

    plan: WorkerPlan = config["plan"]
    set_train_report_log_level(plan.train.log_level)
    place = _placement(plan)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else nullcontext(None) as folder:
        position, done, bases = start_position(plan, read_position(folder), place)
        stream = _start_stream(plan, place, position, done, bases)
        try:
            loop = _build_loop(plan, place, folder)
        except CheckpointError as exc:  # name the checkpoint where it lives, not its local copy
            raise CheckpointError(str(exc).replace(str(folder), checkpoint.path)) from None
    run_loop(plan, place, loop, stream, position, restored_from=loop.step_count if folder is not None else None)
    write_final(plan, place, loop)


def _placement(plan: WorkerPlan) -> Placement:
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(plan.train.cpus_per_worker)))  # the CPUs this worker holds
    world = ctx.get_world_size()
    return Placement(ctx.get_world_rank(), world, device, plan.train.batch_size // world)


def read_position(folder: Optional[str]) -> Optional[dict]:
    """The checkpoint's data_position.json, or None without a checkpoint."""
    if folder is None:
        return None
    path = os.path.join(folder, POSITION_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {folder} has no {POSITION_FILE}: it was not written by clipray's trainer")
    with open(path) as fh:
        return json.load(fh)


def start_position(
    plan: WorkerPlan, saved: Optional[dict], place: Placement
) -> tuple[DataPosition, int, dict[int, dict]]:
    """(this worker's data position, steps already done, the passes' bases) from a checkpoint's
    data_position.json. A group of another size resumes what is left of the passes begun
    (`training.ingest.passes.resize`): no sample of them is skipped or read twice."""
    from training.ingest import resize

    if saved is None:
        return DataPosition(0, 0), 0, {}
    step = int(saved["step"])
    positions = [(int(p["pass"]), int(p["rows"])) for p in saved.get("positions") or []]
    if saved.get("plan") != plan.plan_id or not positions:
        # Other shards, seed, weights or shuffle windows: positions do not map; start a fresh pass.
        next_pass = 1 + max((p for p, _ in positions), default=-1)
        if place.rank == 0:
            log.warning(
                "train: the shards, train.seed, the source weights or train.shuffle_rows changed since the "
                "checkpoint; the data position cannot be kept, continuing with pass %d from its start",
                next_pass,
            )
        return DataPosition(next_pass, 0), step, {}
    old = _planner(plan, len(positions), saved.get("bases") or {})
    if len(positions) == place.world_size:
        return DataPosition(*positions[place.rank]), step, old.bases
    start, bases = resize(old, positions, place.world_size)
    if place.rank == 0:
        left = {q: old.remaining(q, state) for q, state in bases.items()}
        log.warning(
            "train: %d workers resume a checkpoint of %d: pass %d goes on with what is left of it (%s samples "
            "of the passes begun), dealt anew; nothing is skipped or read twice",
            place.world_size,
            len(positions),
            start[0],
            ", ".join(f"pass {q}: {n}" for q, n in sorted(left.items())) or "none",
        )
    return DataPosition(*start), step, bases


def _planner(plan: WorkerPlan, num_workers: int, bases: dict[str, dict]):
    """The passes of a group of `num_workers` with the checkpoint's (JSON) `bases`."""
    from training.ingest import PassPlanner

    def planner(decoded=None):
        return PassPlanner(
            plan.shards,
            seed=plan.train.seed,
            shuffle_rows=plan.train.shuffle_rows,
            num_workers=num_workers,
            weights=plan.train.source_weights,
            bases=decoded,
        )

    return planner(planner().decode(bases)) if bases else planner()


def stream_settings(plan: WorkerPlan, place: Placement, *, train: bool = True):
    from training.ingest import PreprocessSettings, StreamSettings

    vision, text, cfg = plan.model_dict["vision_cfg"], plan.model_dict["text_cfg"], plan.train
    preprocess = PreprocessSettings(
        image_size=vision["image_size"],
        context_length=text["context_length"],
        train=train,
        seed=cfg.seed,
        crop_scale_min=cfg.crop_scale_min,
        decoder=cfg.decoder,
    )
    return StreamSettings(
        local_batch=place.local_batch,
        preprocess=preprocess,
        num_actors=plan.preprocess_actors,
        cpus_per_actor=cfg.preprocess_cpus,
        prefetch_batches=cfg.prefetch_batches,
        pin_memory=place.device.type == "cuda",
        data_cpus=plan.data_cpus,
        shuffle_rows=cfg.shuffle_rows,
        source_weights=cfg.source_weights,
    )


def _start_stream(plan: WorkerPlan, place: Placement, position: DataPosition, done: int, bases: dict):
    """The worker's stream from `position`, started now; None when the run is already complete."""
    from training.ingest import ShardStream

    steps = plan.train.total_steps
    if done >= steps:
        return None
    return ShardStream(
        plan.shards,
        plan.data_fs,
        rank=place.rank,
        world_size=place.world_size,
        seed=plan.train.seed,
        start=position,
        settings=stream_settings(plan, place),
        rows_needed=(steps - done) * place.local_batch,
        bases=bases,
    ).start()


def _build_loop(plan: WorkerPlan, place: Placement, folder: Optional[str]):
    """The TrainLoop with the same initial weights on every rank, restored from `folder`."""
    import numpy as np
    import torch

    from training.loop import LoopSettings, TrainLoop
    from training.model import create_model, load_model
    from training.model.lock import lock_image_tower, lock_text_tower
    from training.trainer_state import load_checkpoint

    cfg = plan.train
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    clip = create_model(
        plan.model_dict,
        temperature_init=cfg.temperature_init,
        learn_temperature=cfg.learn_temperature,
        patch_dropout=plan.model.patch_dropout,
        grad_checkpointing=plan.model.grad_checkpointing,
    )
    if plan.model.pretrained and folder is None:
        clip.load_state_dict(load_model(plan.model.pretrained, storage=cfg).state_dict(), strict=True)
    # Locks before the optimizer is built (it takes the trainable parameters only), on a resume too,
    # so the restored optimizer state finds the same parameters.
    if cfg.lock_image:
        lock_image_tower(clip, cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        lock_text_tower(clip, cfg.lock_text_unlocked_layers)
    # From here on every rank draws its own random numbers (patch dropout).
    torch.manual_seed(cfg.seed * 1000 + place.rank + 1)
    np.random.seed((cfg.seed * 1000 + place.rank + 1) % 2**32)
    loop = TrainLoop(clip, LoopSettings.from_train_config(cfg, cfg.total_steps), place.device)
    if folder is not None:
        load_checkpoint(loop, folder)
    return loop


def run_loop(
    plan: WorkerPlan, place: Placement, loop, stream, position: DataPosition, restored_from: Optional[int]
) -> None:
    """Step until `train.total_steps`, reporting (and checkpointing, validating) on schedule."""
    import torch

    from training.trainer_state import gather_objects

    if stream is None:
        return
    cfg, total = plan.train, plan.train.total_steps
    reporter = Reporter(plan, place, loop, stream, pids=gather_objects(os.getpid()), restored_from=restored_from)
    loss_sum = torch.zeros((), device=place.device)
    steps_in_window = 0
    sample_log = _sample_log(plan, place)
    for batch in stream:
        reporter.count(batch.tokens)
        result = loop.step(batch.images, batch.tokens)
        position = batch.position
        if sample_log is not None:
            sample_log(loop.step_count, batch)
        loss_sum += result.loss
        steps_in_window += 1
        step = loop.step_count
        last = step >= total
        checkpoint_due = step % cfg.checkpoint_every == 0 or last
        val_due = cfg.val_every is not None and (step % cfg.val_every == 0 or last)
        if step % cfg.log_every == 0 or checkpoint_due or val_due:
            reporter.report(position, loss_sum, steps_in_window, result.lr, checkpoint_due, val_due, last)
            loss_sum = torch.zeros((), device=place.device)
            steps_in_window = 0
        if last:
            break
    stream.close()
    if loop.step_count < total:
        raise RuntimeError(
            f"train.data ran out after step {loop.step_count} of {total}: rank {place.rank} "
            f"rejected {dict(stream.rebatcher.rejected)} rows; check the shards"
        )


def _sample_log(plan: WorkerPlan, place: Placement):
    """Tests only (`CLIPRAY_TEST_SAMPLE_LOG` in the driver's environment): a function appending each
    step's samples to `{folder}/{pid}.jsonl` as {"started" (this attempt's start, the same on every
    rank), "rank", "world_size", "step", "keys", "passes"}; None when unset. Every rank calls it."""
    from training.trainer_state import gather_objects

    if not plan.sample_log:
        return None
    started = min(gather_objects(time.time()))  # the same for every rank of this attempt
    path = os.path.join(plan.sample_log, f"{os.getpid()}.jsonl")

    def write(step: int, batch) -> None:
        line = {"started": started, "rank": place.rank, "world_size": place.world_size, "step": step}
        line.update(keys=[str(k) for k in batch.keys], passes=[int(p) for p in batch.passes])
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    return write


class Reporter:
    """Windowed throughput/loss statistics, `ray.train.report` and checkpoints."""

    def __init__(self, plan: WorkerPlan, place: Placement, loop, stream, *, pids: list, restored_from: Optional[int]):
        from training.validation import Validator

        self.plan, self.place, self.loop, self.stream = plan, place, loop, stream
        self.pids, self.restored_from = pids, restored_from
        self.validator = None
        if plan.train.val_every is not None:
            self.validator = Validator(
                plan.train,
                plan.val_shards,
                plan.val_fs,
                loop,
                rank=place.rank,
                world_size=place.world_size,
                settings=stream_settings(plan, place),
            )
        self._start_window()

    def _start_window(self) -> None:
        self._flops = 0.0
        self._t0 = time.perf_counter()
        self._samples0 = self.loop.samples_seen
        self._wait0 = self.stream.data_wait_s

    def count(self, tokens) -> None:
        """Add this worker's batch's forward FLOPs: the text tower runs up to the last end-of-text
        token rounded up to 8 (all positions when compiled), as training/model does."""
        table = self.plan.flops_by_text_tokens
        context = len(table) - 1
        if self.plan.train.compile:
            self._flops += table[context] * tokens.shape[0]
            return
        last = int(tokens.argmax(dim=-1).max()) + 1
        self._flops += table[min(context, -(-last // 8) * 8)] * tokens.shape[0]

    def report(
        self, position: DataPosition, loss_sum, steps: int, lr: float, with_checkpoint: bool, validate: bool, last: bool
    ) -> None:
        import ray.train

        metrics = self._metrics(position, loss_sum, steps, lr)
        if validate:
            metrics.update(self.validator.evaluate())
        if last:
            metrics["_last"] = True
        if with_checkpoint:
            self._report_with_checkpoint(metrics, position)
        else:
            ray.train.report(metrics)
        self._start_window()

    def _metrics(self, position: DataPosition, loss_sum, steps: int, lr: float) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        from training.flops import mfu, peak_flops

        loop, place = self.loop, self.place
        elapsed = time.perf_counter() - self._t0
        stats = torch.stack(
            [
                loss_sum.float().detach(),
                torch.tensor(float(steps), device=place.device),
                torch.tensor(self.stream.data_wait_s - self._wait0, device=place.device),
                torch.tensor(self._flops, device=place.device),
            ]
        )
        if place.world_size > 1:
            dist.all_reduce(stats)
        loss, wait = (stats[0] / stats[1]).item(), (stats[2] / stats[1]).item()
        forward_flops = stats[3].item()  # all workers, this window
        samples_per_s = (loop.samples_seen - self._samples0) / max(elapsed, 1e-9)
        scale = loop.module.clip.logit_scale.detach().exp().item()
        metrics: dict[str, Any] = {
            "step": loop.step_count,
            "samples_seen": loop.samples_seen,
            "loss": loss,
            "lr": lr,
            "logit_scale": scale,
            "temperature": 1.0 / scale,
            "samples_per_s": samples_per_s,
            "step_time_s": elapsed / max(steps, 1),
            "data_wait_s": wait,
            "pass": position.pass_index,
            "rejected": sum(self.stream.rebatcher.rejected.values()),
            "pids": self.pids,
        }
        if loop.module.logit_bias is not None:
            metrics["logit_bias"] = loop.module.logit_bias.item()
        if self.restored_from is not None:
            metrics["restored_from_step"] = self.restored_from
        if place.device.type == "cuda":
            peak = peak_flops(torch.cuda.get_device_name(place.device), self.plan.train.precision)
            samples = max(1, loop.samples_seen - self._samples0)
            value = mfu(samples_per_s, forward_flops / samples, peak, place.world_size)
            if value is not None:
                metrics["mfu"] = value
        return metrics

    def _passes(self, positions: list[dict]) -> dict[str, Any]:
        """The data position's world-size-independent part: every worker's position, the bases of
        the passes begun, and the samples of each consumed by the whole group."""
        planner = self.stream.planner
        at = [(int(p["pass"]), int(p["rows"])) for p in positions]
        first, last = min(p for p, _ in at), max(p for p, _ in at)
        return {
            "world_size": len(positions),
            "positions": positions,
            "bases": planner.encode({q: b for q, b in planner.bases.items() if q >= first}),
            "consumed": {str(q): sum(planner.state(q, at).values()) for q in range(first, last + 1)},
        }

    def _report_with_checkpoint(self, metrics: dict, position: DataPosition) -> None:
        import ray.train

        from training.trainer_state import gather_objects, save_checkpoint

        positions = gather_objects(position.as_dict())
        saved = {"step": self.loop.step_count, "plan": self.plan.plan_id, **self._passes(positions)}
        with tempfile.TemporaryDirectory(prefix="clipray-ckpt-") as folder:
            save_checkpoint(self.loop, folder, {"data": saved})
            if self.place.rank == 0:
                with open(os.path.join(folder, POSITION_FILE), "w") as fh:
                    json.dump(saved, fh)
            # Under FSDP every rank wrote its own shards: Ray uploads each rank's folder into the
            # same checkpoint directory. Otherwise rank 0 holds the whole checkpoint.
            uploads = self.place.rank == 0 or self.loop.fsdp
            checkpoint = ray.train.Checkpoint.from_directory(folder) if uploads else None
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.loop.step_count:09d}"
            )


def write_final(plan: WorkerPlan, place: Placement, loop) -> None:
    """Rank 0 writes `final/` (model.safetensors + model_config.json); every rank must call (FSDP
    gathers the weights)."""
    from training.model import create_model, save_model

    state = loop.model_state_dict()
    if place.rank != 0:
        return
    clip = create_model(loop.module.clip.config, device="meta")
    clip.load_state_dict(state, strict=True, assign=True)
    with _local_folder(plan.run, FINAL_DIR) as folder:
        save_model(clip, folder)


@contextmanager
def _local_folder(run: Folder, name: str) -> Iterator[str]:
    """A local folder for `name` under the run: the folder itself on a local disk, else a temporary
    one uploaded when the block ends."""
    if run.local:
        yield run.path(name)
        return
    with tempfile.TemporaryDirectory(prefix="clipray-final-") as folder:
        yield folder
        run.upload(folder, name)
