"""Sharded checkpoints of an FSDP `training.loop.TrainLoop` through `torch.distributed.checkpoint`.

Every rank writes only its own shards of the weights and of AdamW's moments, as safetensors files
(torch's `HuggingFaceStorageWriter`: each file's header records which slice of which tensor it
holds), into `shards/` of the checkpoint; rank 0 adds the rest of the trainer state as
`trainer_state.json` + `trainer_state.safetensors` (`training.trainer_state`'s format, with no
optimizer moments there). Tensors in `shards/` are named `model/<param>` and
`optimizer/<param>/{step,exp_avg,exp_avg_sq}`, parameters by their path in the loop's
`ContrastiveModel`.

Loading reads the same files through `HuggingFaceStorageReader` (safetensors headers and data, no
pickle: torch's default `.metadata` file is a pickle, so that format is not used) into whatever
layout the loop has now: FSDP on the same or another number of ranks, DDP, or one process; each
rank reads only the slices it holds. Every name and shape is checked against the loop first.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from training.loop import TrainLoop

SHARDS_DIR = "shards"


def is_sharded(directory: str | os.PathLike) -> bool:
    return os.path.isdir(os.path.join(directory, SHARDS_DIR))


def _dcp():
    """torch.distributed.checkpoint, with the safetensors storage layout (torch >= 2.8)."""
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "HuggingFaceStorageWriter"):
        raise RuntimeError(
            f"sharded FSDP checkpoints need torch.distributed.checkpoint's safetensors storage "
            f"(torch >= 2.8); this is torch {torch.__version__}: upgrade torch, or use train.strategy: ddp"
        )
    return dcp


def _live_state(loop: TrainLoop) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(model state, optimizer state, both flattened by name): the loop's own tensors, sharded as the
    loop holds them (DTensors under FSDP). AdamW's state is created (zeros) when it has none yet."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(loop.module)
    optimizer = get_optimizer_state_dict(loop.module, loop.optimizer)
    flat = {f"model/{name}": value for name, value in model.items()}
    for name, values in optimizer["state"].items():
        flat.update({f"optimizer/{name}/{key}": value for key, value in values.items()})
    return model, optimizer, flat


def save_shards(loop: TrainLoop, directory: str | os.PathLike) -> list:
    """Write this rank's shards into `directory/shards/`; returns the optimizer's param groups
    (parameters by name). Every rank must call; each writes to its own `directory` (a shared one or
    one per rank that the caller uploads into one checkpoint)."""
    dcp = _dcp()
    _, optimizer, flat = _live_state(loop)
    path = os.path.join(os.fspath(directory), SHARDS_DIR)
    os.makedirs(path, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(path, save_distributed=True), no_dist=_no_dist())
    return optimizer["param_groups"]


def load_shards(loop: TrainLoop, directory: str | os.PathLike, param_groups: Optional[list]) -> None:
    """Load `directory/shards/` into the loop's weights and AdamW state (with `param_groups`, the
    checked groups of trainer_state.json). Every rank must call."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    dcp = _dcp()
    path = os.path.join(os.fspath(directory), SHARDS_DIR)
    model, optimizer, flat = _live_state(loop)
    _check(dcp.HuggingFaceStorageReader(path).read_metadata(), flat, path)
    with warnings.catch_warnings():
        # torch warns on every load without a process group, even when asked for one explicitly.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(path), no_dist=_no_dist())
    set_model_state_dict(loop.module, model)
    groups = optimizer["param_groups"] if param_groups is None else param_groups
    set_optimizer_state_dict(loop.module, loop.optimizer, {"state": optimizer["state"], "param_groups": groups})


def _no_dist() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def _check(metadata, wanted: dict[str, torch.Tensor], path: str) -> None:
    from training.model import CheckpointError

    saved = metadata.state_dict_metadata
    problems = [f"no tensor {k!r}" for k in wanted if k not in saved]
    problems += [f"an unexpected tensor {k!r}" for k in saved if k not in wanted]
    for key, value in wanted.items():
        if key in saved and tuple(saved[key].size) != tuple(value.shape):
            problems.append(f"{key!r} of shape {list(saved[key].size)}, the model's is {list(value.shape)}")
    if problems:
        raise CheckpointError(
            f"{path}: the sharded checkpoint does not fit this model ({'; '.join(problems[:5])}"
            f"{f'; {len(problems) - 5} more' if len(problems) > 5 else ''}): saved with another model or "
            "train.loss? The checkpoint is not loaded (resume from another checkpoint, or start fresh)"
        )
