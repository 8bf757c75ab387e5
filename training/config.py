"""The `model`, `train` and `tune` sections of the job config."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from storage import StorageConfig


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("ViT-B-32", description="a registered model (ViT-B-32, RN50, ...) or a model JSON path")
    width_mult: PositiveFloat = 1.0
    pretrained: Optional[str] = Field(
        None,
        description="checkpoint to start from: ours, OpenAI/OpenCLIP files, open_clip or Hugging Face "
        "model dirs; without model.name its architecture is used",
    )
    grad_checkpointing: bool = False
    patch_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="ViT only: fraction of patches dropped in training")


class DataSource(BaseModel):
    """One weighted source of `train.data` (training/ingest/mixture.py): its shards' share of every
    pass is `weight / sum(weights)`, whatever its size (open_clip's upsampling factors)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="shard folder/file/glob/{0..9} range (Parquet or WebDataset)")
    weight: PositiveFloat = Field(1.0, description="sampling proportion relative to the other sources")


class TrainConfig(StorageConfig):
    """The `train` section: contrastive pretraining with Ray Train (see docs/training.md). Its storage
    keys (`storage_options`, `s3_endpoint_url`, `s3_region`) serve `data`, `val_data`,
    `storage_path` and a sweep's folder."""

    model_config = ConfigDict(extra="forbid")

    data: list[Union[str, DataSource]] = Field(
        default_factory=list,
        description="shard folders/files/globs/{0..9} ranges (Parquet or WebDataset .tar), read as one "
        "source; or weighted sources [{path, weight}, ...]",
    )
    val_data: list[str] = Field(default_factory=list, description="held-out shard folders for validation")
    storage_path: str = Field("runs", description="folder or s3:// URL; the run lives in {storage_path}/{name}")
    name: str = "clip"
    num_workers: Union[PositiveInt, tuple[PositiveInt, PositiveInt]] = Field(
        1,
        description="Ray Train workers: a number, or [min, max] for an elastic group that restarts "
        "from its latest checkpoint with the workers the cluster has (docs/training.md)",
    )
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    batch_size: PositiveInt = Field(256, description="global batch (all workers together)")
    micro_batch_size: Optional[PositiveInt] = Field(None, description="per worker; enables exact accumulation")
    samples: PositiveInt = Field(1_000_000, description="training length in samples seen")
    lr: PositiveFloat = 5e-4
    warmup: int = Field(2000, ge=0, description="warmup steps")
    weight_decay: float = Field(0.2, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.98, ge=0.0, lt=1.0)
    eps: PositiveFloat = 1e-6
    grad_clip: Optional[PositiveFloat] = None
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    loss: Literal["clip", "siglip"] = "clip"
    temperature_init: PositiveFloat = 0.07
    learn_temperature: bool = True
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = Field(
        False,
        description="torch.compile the model: true (mode 'default') or a torch.compile mode; "
        "'reduce-overhead' and 'max-autotune' add CUDA graphs (one GPU, fixed shapes)",
    )
    strategy: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 3
    max_failures: int = Field(0, ge=-1)
    log_every: PositiveInt = 10
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING",
        description="level of Ray Train's own console logs (INFO shows every report); clipray prints "
        "a progress line either way",
    )
    val_every: Optional[PositiveInt] = Field(None, description="steps between validations (needs val_data)")
    val_batch_size: Optional[PositiveInt] = Field(
        None, description="pairs per validation-loss chunk (default: batch_size)"
    )
    zeroshot_data: Optional[str] = Field(None, description="labelled set for zero-shot accuracy at each validation")
    zeroshot_classnames: Optional[str] = Field(None, description="class names file or built-in name")
    zeroshot_templates: Optional[str] = Field(None, description="prompt templates file or built-in name")
    seed: int = 0
    num_preprocess_actors: Optional[PositiveInt] = Field(None, description="per worker (default: from free CPUs)")
    preprocess_cpus: PositiveFloat = Field(1.0, description="CPUs per preprocessing actor")
    prefetch_batches: PositiveInt = 2
    shuffle_rows: int = Field(
        4096, ge=0, description="rows per shuffle window of a pass (whole row groups; 0: row groups in file order)"
    )
    crop_scale_min: float = Field(
        0.9, gt=0.0, le=1.0, description="smallest random crop, as a fraction of the largest square's area"
    )
    decoder: Literal["cv2", "pil"] = "cv2"
    # LiT (docs/model.md "Locked towers"): freeze a tower, optionally leaving its last N groups trainable.
    lock_image: bool = Field(False, description="freeze the image tower (LiT)")
    lock_image_unlocked_groups: int = Field(0, ge=0, description="with lock_image: last N image groups trainable")
    lock_image_freeze_bn_stats: bool = Field(
        True, description="with lock_image: locked BatchNorms (ResNet) keep their running statistics"
    )
    lock_text: bool = Field(False, description="freeze the text tower")
    lock_text_unlocked_layers: int = Field(0, ge=0, description="with lock_text: last N text groups trainable")

    @property
    def source_weights(self) -> tuple[float, ...]:
        """The weights of `data`'s sources; () when `data` is plain paths (one uniform source)."""
        return tuple(s.weight for s in self.data if isinstance(s, DataSource))

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: `samples` rounded up to whole global batches."""
        return -(-self.samples // self.batch_size)

    @property
    def min_workers(self) -> int:
        """The smallest world size the group runs at (`num_workers`, or `min` of `[min, max]`)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The largest world size the group runs at (`num_workers`, or `max` of `[min, max]`)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def world_sizes(self) -> range:
        """Every world size the group may take."""
        return range(self.min_workers, self.max_workers + 1)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_range(cls, value):
        """An int, or [min, max] with 1 <= min <= max ([n, n] is the fixed group n)."""

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if whole(value) and value >= 1:
            return value
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(map(whole, value)):
            raise ValueError(f"train.num_workers {value!r}: give a positive integer or [min, max], two integers")
        low, high = value
        if low < 1 or low > high:
            raise ValueError(f"train.num_workers {list(value)}: [min, max] needs 1 <= min <= max")
        return low if low == high else (low, high)

    def _batch_errors(self) -> Optional[str]:
        """Why train.batch_size and train.micro_batch_size do not split over every world size the
        group may take, or None: each worker takes batch_size / world pairs, in whole micro-batches."""
        sizes, micro = list(self.world_sizes), self.micro_batch_size
        uneven = [w for w in sizes if self.batch_size % w]
        if uneven and not self.elastic:
            return (
                f"train.batch_size {self.batch_size} is not divisible by train.num_workers "
                f"{self.max_workers}: every worker takes an equal share of the global batch"
            )
        group = f"train.num_workers {list(self.num_workers)}" if self.elastic else ""
        if uneven:
            return (
                f"train.batch_size {self.batch_size} is not divisible by the world size"
                f"{'s' if len(uneven) > 1 else ''} {', '.join(map(str, uneven))} that {group} may run at: every worker takes an equal "
                f"share of the global batch at any size (use a multiple of {math.lcm(*sizes)}, or a "
                "narrower range)"
            )
        bad = [w for w in sizes if micro is not None and (self.batch_size // w) % micro]
        if bad and not self.elastic:
            return (
                f"train.micro_batch_size {micro} does not divide the per-worker batch "
                f"{self.batch_size // bad[0]} (train.batch_size / train.num_workers)"
            )
        if bad:
            shares = ", ".join(f"{self.batch_size // w} at {w} workers" for w in bad)
            return (
                f"train.micro_batch_size {micro} does not divide the per-worker batch ({shares}) "
                f"that {group} may run at (train.batch_size / world size; use a train.batch_size "
                f"multiple of {math.lcm(*(w * micro for w in sizes))}, or another micro-batch size)"
            )
        return None

    @model_validator(mode="after")
    def _check_batches(self) -> "TrainConfig":
        error = self._batch_errors()
        if error:
            raise ValueError(error)
        if self.samples < self.batch_size:
            raise ValueError(
                f"train.samples {self.samples} is less than one global batch (train.batch_size {self.batch_size})"
            )
        if self.val_every is not None and not self.val_data:
            raise ValueError("train.val_every is set but train.val_data is empty: give held-out shard folders")
        for key, lock in (("lock_image_unlocked_groups", "lock_image"), ("lock_text_unlocked_layers", "lock_text")):
            if getattr(self, key) and not getattr(self, lock):
                raise ValueError(
                    f"train.{key} is set but train.{lock} is not: it says how much of a locked tower trains"
                )
        weighted = sum(isinstance(s, DataSource) for s in self.data)
        if 0 < weighted < len(self.data):
            raise ValueError(
                "train.data mixes plain paths and {path, weight} sources: give every entry as {path, weight} "
                "(or all as paths, read as one uniform source)"
            )
        if self.zeroshot_data is not None and self.val_every is None:
            raise ValueError("train.zeroshot_data is set but train.val_every is not: zero-shot runs at validations")
        return self


# Axes a sweep may search, and what each value must be. `model.width_mult` and the four `train`
# keys of the same names take the trial's value.
TUNE_AXES: dict[str, str] = {
    "temperature_init": "positive",
    "learn_temperature": "bool",
    "width_mult": "positive",
    "lr": "positive",
    "batch_size": "positive_int",
}
SPACE_KINDS = ("loguniform", "uniform", "choice")
Space = Union[list[Any], dict[str, list[Any]]]
# Metrics a sweep can rank and stop trials by: what the training runner reports at validations
# (train.val_data, train.val_every) and, with train.zeroshot_data, zero-shot accuracy.
# `val_loss` is measured at each trial's own temperature: it ranks trials of one temperature only.
VALIDATION_METRICS = ("val_loss",) + tuple(
    f"val_{d}_retrieval_recall@{k}" for d in ("mean", "image", "text") for k in (1, 5, 10)
)
DEFAULT_TUNE_METRIC = "val_mean_retrieval_recall@1"  # independent of the temperature a trial runs at
ZEROSHOT_METRICS = ("zeroshot_acc1", "zeroshot_acc5", "zeroshot_mean_per_class_recall")


def _check_space_value(axis: str, value: Any) -> None:
    kind = TUNE_AXES[axis]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"tune.{axis} values must be true or false, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"tune.{axis} values must be numbers, got {value!r}")
    if kind == "positive_int" and (not isinstance(value, int) or value < 1):
        raise ValueError(f"tune.{axis} values must be positive integers, got {value!r}")
    if not value > 0:
        raise ValueError(f"tune.{axis} values must be > 0, got {value!r}")


def check_space(axis: str, space: Any) -> Any:
    """Validate one axis of the search space: a list (a grid) or {loguniform|uniform|choice: [...]}."""
    hint = (
        f"write tune.{axis} as a list (a grid, e.g. [0.5, 1, 2]) or as "
        "{loguniform: [low, high]} / {uniform: [low, high]} / {choice: [a, b, ...]}"
    )
    if isinstance(space, list):
        if not space:
            raise ValueError(f"tune.{axis} is an empty grid; {hint}")
        for value in space:
            _check_space_value(axis, value)
        if len(set(map(repr, space))) != len(space):
            raise ValueError(f"tune.{axis} grid {space!r} repeats a value (use tune.num_samples for repeats)")
        return space
    if not isinstance(space, dict):
        raise ValueError(
            f"tune.{axis} = {space!r} is not a search space; {hint} "
            f"(to fix one value for every trial, set it in the model/train section instead)"
        )
    if len(space) != 1 or next(iter(space)) not in SPACE_KINDS:
        raise ValueError(f"tune.{axis} = {space!r}: expected exactly one of {', '.join(SPACE_KINDS)}; {hint}")
    ((kind, values),) = space.items()
    if not isinstance(values, list) or not values:
        raise ValueError(f"tune.{axis}.{kind} must be a non-empty list, got {values!r}")
    for value in values:
        _check_space_value(axis, value)
    if kind == "choice":
        return space
    if TUNE_AXES[axis] != "positive":
        raise ValueError(f"tune.{axis} takes a grid or {{choice: [...]}}, not a {kind} range")
    if len(values) != 2 or not values[0] < values[1]:
        raise ValueError(f"tune.{axis}.{kind} must be [low, high] with low < high, got {values!r}")
    return space


class TuneConfig(BaseModel):
    """A Ray Tune sweep over temperature, width and optionally lr and batch size.

    Each trial runs the `train` section with the trial's values, under
    `{storage_path}/{name}/runs/{trial_id}`; ASHA stops trials whose `metric` trails at a rung.
    """

    model_config = ConfigDict(extra="forbid")

    temperature_init: Optional[Space] = Field(
        None, description="softmax temperature to start from: a grid or {loguniform: [low, high]}"
    )
    learn_temperature: Optional[Space] = Field(None, description="grid of true/false")
    width_mult: Optional[Space] = Field(
        None, description="width multiplier of both encoders, e.g. [0.5, 1, 2] (depth is kept)"
    )
    lr: Optional[Space] = Field(None, description="peak learning rate: a grid or {loguniform: [low, high]}")
    batch_size: Optional[Space] = Field(None, description="global batch size: a grid of integers")
    num_samples: PositiveInt = Field(
        1, description="repeats of the grid; random draws for loguniform/uniform/choice axes"
    )
    metric: str = Field(
        DEFAULT_TUNE_METRIC,
        description="validation metric to rank and stop trials by: val_{mean,image,text}_retrieval_recall@"
        "{1,5,10}, zeroshot_{acc1,acc5,mean_per_class_recall}, or val_loss (measured at each trial's own "
        "temperature: it compares trials of one temperature only)",
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None, validate_default=True, description="min or max; default: min for val_loss, max for recalls and accuracies"
    )
    storage_path: str = Field("sweeps", description="folder (or URI) holding the sweep folder")
    name: str = Field("sweep", description="the sweep's folder; rerunning with the same name resumes it")
    early_stopping: bool = Field(True, description="ASHA stops trials that trail at a rung")
    grace_period: Optional[PositiveInt] = Field(
        None, description="samples a trial sees before ASHA may stop it (default: train.samples / 4)"
    )
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA keeps 1/reduction_factor of trials per rung")
    max_concurrent_trials: Optional[PositiveInt] = Field(
        None, description="default: as many trials as the cluster's GPUs (or CPUs) hold at once"
    )
    trial_cpus: float = Field(
        0.25,
        gt=0.0,
        description="CPUs reserved for each trial's driver function (its TorchTrainer "
        "reserves the workers' own resources)",
    )
    retry_failed: bool = Field(False, description="on resume, rerun trials that failed")

    @field_validator(*TUNE_AXES, mode="before")
    @classmethod
    def _space(cls, value: Any, info: Any) -> Any:
        return None if value is None else check_space(info.field_name, value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or "/" in value or value in (".", ".."):
            raise ValueError(f"tune.name {value!r} must be a plain folder name (no '/')")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        known = VALIDATION_METRICS + ZEROSHOT_METRICS
        if value not in known:
            raise ValueError(
                f"tune.metric {value!r} is not a metric the trials report; choose one of {', '.join(known)}"
            )
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: Optional[str], info: Any) -> Optional[str]:
        metric = info.data.get("metric")
        if metric is None:  # the metric itself was refused
            return value
        natural = "min" if metric == "val_loss" else "max"
        if value is not None and value != natural:
            raise ValueError(
                f"tune.mode {value!r} would rank the worst trial first: {metric} is "
                f"{'a loss (lower is better)' if natural == 'min' else 'higher-is-better'}; "
                f"use tune.mode: {natural} or leave tune.mode out"
            )
        return natural

    def axes(self) -> dict[str, Any]:
        """The searched axes and their spaces, in TUNE_AXES order."""
        return {axis: getattr(self, axis) for axis in TUNE_AXES if getattr(self, axis) is not None}
