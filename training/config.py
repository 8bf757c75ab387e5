"""The `model`, `train` and `tune` sections of the job config."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("ViT-B-32", description="a registered model (ViT-B-32, RN50, ...) or a model JSON path")
    width_mult: PositiveFloat = 1.0
    pretrained: Optional[str] = Field(None, description="checkpoint to start from (OpenAI/OpenCLIP/ours)")
    grad_checkpointing: bool = False
    patch_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="ViT only: fraction of patches dropped in training")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[str] = Field(default_factory=list, description="one or more shard folders")
    val_data: list[str] = Field(default_factory=list, description="held-out shard folders for validation")
    storage_path: str = "runs"
    name: str = "clip"
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    batch_size: PositiveInt = 256
    micro_batch_size: Optional[PositiveInt] = Field(None, description="per worker; enables exact accumulation")
    samples: PositiveInt = 1_000_000
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
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 3
    max_failures: int = Field(0, ge=-1)
    log_every: PositiveInt = 10
    val_every: Optional[PositiveInt] = None
    seed: int = 0
    num_preprocess_actors: Optional[PositiveInt] = None


Space = Union[list[Any], dict[str, list[float]]]


class TuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature_init: Optional[Space] = None
    learn_temperature: Optional[Space] = None
    width_mult: Optional[Space] = None
    lr: Optional[Space] = None
    batch_size: Optional[Space] = None
    num_samples: PositiveInt = 1
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    storage_path: str = "sweeps"
    name: str = "sweep"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1.0)
    max_concurrent_trials: Optional[PositiveInt] = None
