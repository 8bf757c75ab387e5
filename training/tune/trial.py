"""One trial: its values -> its `model` and `train` sections, and whether its model can fit.

Pure: no Ray. `width_mult` replaces `model.width_mult`; `temperature_init`, `learn_temperature`,
`lr`, `batch_size` and `seed` replace the `train` keys of the same names. Each trial's Ray Train
run lives under `{sweep}/runs/{run_name}`, so it has its own checkpoints, `metrics.jsonl` and
`final/`, and a resumed trial resumes its own run.
"""

from __future__ import annotations

from typing import Any, Mapping

from training.config import TUNE_AXES, ModelConfig, TrainConfig

from .space import SEED_AXIS

TRAIN_KEYS = tuple(axis for axis in TUNE_AXES if axis != "width_mult") + (SEED_AXIS,)
# Bytes per parameter a training worker holds at least: fp32 weights, gradients and AdamW's two
# moments (activations come on top). A GPU worker still builds the model in host memory first.
TRAIN_BYTES_PER_PARAM = 16
BUILD_BYTES_PER_PARAM = 4


def trial_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The searched values of a trial's config (Ray Tune's `result.config`), in axis order."""
    return {k: config[k] for k in (*TUNE_AXES, SEED_AXIS) if k in config}


def trial_sections(
    model: ModelConfig, train: TrainConfig, values: Mapping[str, Any], *, runs_dir: str, run_name: str
) -> tuple[ModelConfig, TrainConfig]:
    """The `model` and `train` sections one trial runs with (validated like a job config)."""
    unknown = set(values) - set(TUNE_AXES) - {SEED_AXIS}
    if unknown:
        raise ValueError(f"trial values {sorted(unknown)} are not sweep axes ({', '.join(TUNE_AXES)})")
    model_raw = model.model_dump()
    if "width_mult" in values:
        model_raw["width_mult"] = float(values["width_mult"])
    train_raw = train.model_dump()
    for key in TRAIN_KEYS:
        if key in values:
            train_raw[key] = values[key]
    train_raw.update(storage_path=runs_dir, name=run_name)
    return ModelConfig.model_validate(model_raw), TrainConfig.model_validate(train_raw)


def model_parameters(model: ModelConfig) -> int:
    """Parameter count of the (width-scaled) model, built on torch's meta device (no memory)."""
    import torch

    from training.model import create_model

    with torch.device("meta"):
        clip = create_model(model.name, width_mult=model.width_mult)
    return sum(p.numel() for p in clip.parameters())


def check_model_fits(model: ModelConfig, train: TrainConfig, node_memory_bytes: float) -> int:
    """Raise MemoryError when the model cannot be trained in one node's memory; else its size.

    The bound is a floor of what a worker needs (weights + gradients + Adam moments for CPU
    training, the weights for GPU training), so a trial that passes may still run out of memory,
    but one that fails never could have run: an impossible width fails this trial at once,
    with the numbers, instead of hanging or being killed by the OOM killer.
    """
    params = model_parameters(model)
    per_param = BUILD_BYTES_PER_PARAM if train.use_gpu else TRAIN_BYTES_PER_PARAM
    need = params * per_param
    if need > node_memory_bytes:
        raise MemoryError(
            f"model.width_mult={model.width_mult:g} makes {model.name} a {params / 1e6:,.0f}M-parameter "
            f"model: {'its weights' if train.use_gpu else 'its weights, gradients and Adam moments'} "
            f"alone need {need / 2**30:,.1f} GiB, more than the {node_memory_bytes / 2**30:,.1f} GiB "
            f"of the largest node; sweep smaller widths (tune.width_mult)"
        )
    return params
