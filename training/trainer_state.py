"""Checkpoints of a `training.loop.TrainLoop` without pickle: the weights and the trainer state.

`save_checkpoint(loop, directory, extra)` writes into `directory`:
- `model.safetensors` + `model_config.json`: the CLIP weights (`training.model.save_model`);
- `trainer_state.safetensors`, every tensor of the trainer state:
  `optimizer/<param>/step` (float32 []) and `optimizer/<param>/exp_avg`, `.../exp_avg_sq` (AdamW's
  moments, the parameter's dtype and full shape); per rank r `rng/<r>/torch` (uint8 [5056]),
  `rng/<r>/cuda` (uint8 [n], GPU runs), `rng/<r>/numpy` (int64 [624], numpy's MT19937 key),
  `rng/<r>/python` (int64 [625], `random`'s Mersenne Twister words then its index); `logit_bias`
  (float32 [], SigLIP only);
- `trainer_state.json`: `format`, `version`, `step`, `samples_seen`, `world_size`, the optimizer's
  param groups (hyper-parameters and parameter names) and the parameters that have optimizer state,
  the LR scheduler's and grad scaler's state dicts, each rank's RNG scalars, whether `logit_bias`
  is saved, and `extra` (the caller's JSON object: the data position).

A parameter is named by its path in the loop's `ContrastiveModel` (`clip.visual.proj`,
`logit_bias`) under every strategy, so a checkpoint written under FSDP resumes under DDP or in one
process and back. RNG states are restored only when the world size is the saved one (rank r gets
rank r's states); otherwise the ranks keep their own streams.

`load_checkpoint` reads the files with safetensors and json only, never torch.load or pickle: a file
planted under `train.storage_path` can carry numbers but no code. Every entry is checked against the
loop being restored (keys, JSON types, tensor dtypes and shapes, parameter names) before anything is
applied; what does not fit raises `CheckpointError` naming the file and the entry. A folder that
holds only `trainer_state.pt` (the pickle older clipray wrote) is refused without being read.

Over 400 lines on purpose: the writer and the checked reader of one format, side by side, so an
entry added to one is seen in the other. safetensors and `training.model` are imported inside the
functions: `training.loop` re-exports `save_checkpoint`, `load_checkpoint` and `gather_objects`,
and importing it stays torch and numpy.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from training.loop import TrainLoop

FORMAT = "clipray.trainer_state"
VERSION = 1
TENSORS_FILE = "trainer_state.safetensors"
JSON_FILE = "trainer_state.json"
LEGACY_FILE = "trainer_state.pt"
_TOP_KEYS = (
    "format",
    "version",
    "step",
    "samples_seen",
    "world_size",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "logit_bias",
    "extra",
)
_MT_WORDS = 624  # Mersenne Twister state words (numpy's and Python's generators)


@dataclass
class TrainerState:
    """A loop's state besides the CLIP weights. optimizer: {"state": {param name: {"step", "exp_avg",
    "exp_avg_sq": tensor}}, "param_groups": [{hyper-parameters, "params": [param names]}]};
    rng: one `rng_snapshot` per rank; logit_bias: float32 [] or None (no SigLIP)."""

    optimizer: dict
    scheduler: dict
    scaler: dict
    step: int
    samples_seen: int
    world_size: int
    rng: list
    logit_bias: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------- RNG, gathering
def rng_snapshot(device: torch.device) -> dict[str, Any]:
    """This process's torch (CPU, CUDA), numpy and Python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------- loop <-> state
def param_names(loop: TrainLoop) -> list[list[str]]:
    """The optimizer's parameters, group by group, named by their path in `loop.module`."""
    names = {id(p): n for n, p in loop.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in loop.optimizer.param_groups]


def capture(loop: TrainLoop, sharded_groups: Optional[list] = None) -> TrainerState:
    """The trainer state of `loop`. Every rank must call (RNG states are gathered; under FSDP the
    optimizer state too, and only rank 0's copy then holds it). With `sharded_groups` (the
    optimizer's param groups, when its moments went to `training.checkpoint_shards`) it holds no
    optimizer moments."""
    if sharded_groups is not None:
        optimizer = {"state": {}, "param_groups": sharded_groups}
    else:
        optimizer = loop.optimizer_state_dict()
    if not loop.fsdp:  # torch numbers parameters 0..n-1 across the groups, in order
        flat = [n for group in param_names(loop) for n in group]
        optimizer = {
            "state": {flat[i]: values for i, values in optimizer["state"].items()},
            "param_groups": [{**g, "params": [flat[i] for i in g["params"]]} for g in optimizer["param_groups"]],
        }
    bias = loop.module.logit_bias
    return TrainerState(
        optimizer=optimizer,
        scheduler=loop.scheduler.state_dict(),
        scaler=loop.scaler.state_dict(),
        step=loop.step_count,
        samples_seen=loop.samples_seen,
        world_size=loop.world_size,
        rng=gather_objects(rng_snapshot(loop.device)),
        logit_bias=None if bias is None else bias.detach().cpu(),
    )


def restore(loop: TrainLoop, model_state: dict[str, torch.Tensor], state: TrainerState) -> None:
    """Load CLIP weights (OpenAI key layout) and `state` into `loop`; this rank's RNG states only when
    the world size is the saved one."""
    if loop.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        full = {f"clip.{k}": v for k, v in model_state.items()}
        if state.logit_bias is not None:
            full["logit_bias"] = state.logit_bias
        set_model_state_dict(loop.module, full, options=options)
        set_optimizer_state_dict(loop.module, loop.optimizer, state.optimizer, options=options)
    else:
        loop.module.clip.load_state_dict(model_state, strict=True)
        if state.logit_bias is not None:
            with torch.no_grad():
                loop.module.logit_bias.copy_(state.logit_bias)
        index = {n: i for i, n in enumerate(n for group in param_names(loop) for n in group)}
        loop.optimizer.load_state_dict(
            {
                "state": {index[n]: values for n, values in state.optimizer["state"].items()},
                "param_groups": [
                    {**g, "params": [index[n] for n in g["params"]]} for g in state.optimizer["param_groups"]
                ],
            }
        )
    restore_progress(loop, state)


def restore_progress(loop: TrainLoop, state: TrainerState) -> None:
    """The LR schedule, grad scaler, counters and (same world size only) this rank's RNG states."""
    loop.scheduler.load_state_dict(state.scheduler)
    loop.scaler.load_state_dict(state.scaler)  # a disabled scaler (not fp16) ignores it
    loop.step_count, loop.samples_seen = state.step, state.samples_seen
    if state.world_size == loop.world_size:
        restore_rng(state.rng[loop.rank], loop.device)


# --------------------------------------------------------------------------------- files
def encode(state: TrainerState) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for trainer_state.safetensors, document for trainer_state.json)."""
    tensors = {
        f"optimizer/{name}/{key}": value.detach().cpu().contiguous()
        for name, values in state.optimizer["state"].items()
        for key, value in values.items()
    }
    rng = []
    for rank, snapshot in enumerate(state.rng):
        tensors[f"rng/{rank}/torch"] = snapshot["torch"]
        if snapshot["cuda"] is not None:
            tensors[f"rng/{rank}/cuda"] = snapshot["cuda"].cpu()
        _, key, pos, has_gauss, cached_gaussian = snapshot["numpy"]
        tensors[f"rng/{rank}/numpy"] = torch.from_numpy(key.astype(np.int64))
        version, words, gauss_next = snapshot["python"]
        tensors[f"rng/{rank}/python"] = torch.tensor(words, dtype=torch.int64)
        rng.append(
            {
                "cuda": snapshot["cuda"] is not None,
                "numpy": {"pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
                "python": {"version": version, "gauss_next": gauss_next},
            }
        )
    if state.logit_bias is not None:
        tensors["logit_bias"] = state.logit_bias.detach().cpu().reshape(())
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "samples_seen": state.samples_seen,
        "world_size": state.world_size,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "with_state": list(state.optimizer["state"])},
        "scheduler": state.scheduler,
        "scaler": state.scaler,
        "rng": rng,
        "logit_bias": state.logit_bias is not None,
        "extra": state.extra,
    }
    return tensors, doc


def save_checkpoint(loop: TrainLoop, directory: str | os.PathLike, extra: Optional[dict] = None) -> None:
    """Write the weights (`model.safetensors`, `model_config.json`: loadable by
    `training.model.load_model`) and the trainer state (`trainer_state.safetensors` +
    `trainer_state.json`, with `extra`, a JSON object) into `directory`.

    Under FSDP the weights and optimizer moments are written sharded instead (every rank writes its
    own into `shards/`, see `training.checkpoint_shards`; no model.safetensors), so nothing is
    gathered onto one rank. Every rank must call; only rank 0 writes the rest.
    """
    extra = {} if extra is None else extra
    try:
        if not isinstance(extra, dict):
            raise TypeError(f"it is a {type(extra).__name__}")
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save_checkpoint: extra must be a JSON object (dict of str, numbers, lists, dicts): {e}"
        ) from None
    if loop.fsdp:
        from training.checkpoint_shards import save_shards

        state = capture(loop, sharded_groups=save_shards(loop, directory))
        if loop.rank != 0:
            return
    else:
        model_state = loop.model_state_dict()
        state = capture(loop)
        if loop.rank != 0:
            return
        from training.model import create_model, save_model

        os.makedirs(directory, exist_ok=True)
        clip = create_model(loop.module.clip.config, device="meta")
        clip.load_state_dict(model_state, strict=True, assign=True)
        save_model(clip, directory)
    from safetensors.torch import save_file

    state.extra = extra
    tensors, doc = encode(state)
    save_file(tensors, os.path.join(directory, TENSORS_FILE))
    with open(os.path.join(directory, JSON_FILE), "w") as fh:  # last: its presence marks a whole state
        json.dump(doc, fh, indent=1)


def load_checkpoint(loop: TrainLoop, directory: str | os.PathLike) -> dict:
    """Restore `loop` from a `save_checkpoint` directory; returns the saved `extra` dict.
    Everything is read and checked before the loop is touched (`CheckpointError` otherwise)."""
    from training.model import CheckpointError, load_state_dict
    from training.model.checkpoint import WEIGHTS_FILE, check_state_dict

    from training.checkpoint_shards import is_sharded, load_shards

    directory = os.fspath(directory)
    sharded = is_sharded(directory)
    names = (TENSORS_FILE, JSON_FILE) if sharded else (WEIGHTS_FILE, TENSORS_FILE, JSON_FILE)
    paths = {name: os.path.join(directory, name) for name in names}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if TENSORS_FILE in missing and JSON_FILE in missing and os.path.isfile(os.path.join(directory, LEGACY_FILE)):
        raise legacy_checkpoint_error(directory)
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} has no {', '.join(missing)}; it was not written by "
            "training.trainer_state.save_checkpoint"
        )
    state = read_trainer_state(loop, paths[TENSORS_FILE], paths[JSON_FILE])
    if sharded:
        load_shards(loop, directory, state.optimizer["param_groups"])
        restore_progress(loop, state)
        return state.extra
    weights = load_state_dict(paths[WEIGHTS_FILE])
    check_state_dict(loop.module.clip, weights, source=paths[WEIGHTS_FILE])
    restore(loop, weights, state)
    return state.extra


def legacy_checkpoint_error(directory: str):
    """The refusal of a checkpoint folder (local path or URL) that holds only the pickled
    `trainer_state.pt` of an older clipray."""
    from training.model import CheckpointError
    from training.model.checkpoint import WEIGHTS_FILE

    directory = directory.rstrip("/")
    return CheckpointError(
        f"{directory}/{LEGACY_FILE} is a pickle written by an older clipray; it is not loaded, because unpickling "
        f"a file runs whatever code the file names (anyone who can write under train.storage_path could run code "
        f"on the workers). To go on, start fresh under another train.name, or keep only the weights: a run under "
        f"another train.name with model.pretrained={directory}/{WEIGHTS_FILE} (optimizer, LR schedule and data "
        f"position start over)."
    )


# --------------------------------------------------------------------------------- checked reading
def read_trainer_state(loop: TrainLoop, tensors_path: str, json_path: str) -> TrainerState:
    """The trainer state in the two files, checked against `loop` (see the module docstring)."""
    from safetensors.torch import load_file

    try:
        with open(json_path) as fh:
            doc = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise _Files.error(json_path, f"is not valid JSON ({e})") from None
    try:
        tensors = load_file(tensors_path)
    except Exception as e:  # safetensors raises its own error types
        raise _Files.error(tensors_path, f"is not a readable safetensors file ({e})") from None
    return _Files(json_path, tensors_path, tensors).decode(doc, loop)


class _Files:
    """Turns the JSON document and the tensors back into a TrainerState, checking each entry; the
    errors name the file and the entry (`optimizer.param_groups[1].lr`, `rng/0/torch`)."""

    def __init__(self, json_path: str, tensors_path: str, tensors: dict[str, torch.Tensor]):
        self.json_path, self.tensors_path, self.tensors = json_path, tensors_path, tensors
        self.used: set[str] = set()

    @staticmethod
    def error(path: str, problem: str) -> Exception:
        from training.model import CheckpointError

        return CheckpointError(
            f"{path}: {problem}; the checkpoint is not loaded (resume from another checkpoint, or start fresh)"
        )

    def bad(self, where: str, problem: str) -> Exception:
        return self.error(self.json_path, f"{where} {problem}")

    # ----------------------------------------------------------------------------- JSON entries
    def keys(self, value: Any, expected: Any, where: str) -> dict:
        """`value` as an object with exactly the keys of `expected`."""
        if not isinstance(value, dict):
            raise self.bad(where, f"is {_kind(value)}, expected an object")
        for key in expected:
            if key not in value:
                raise self.bad(where, f"has no key {key!r}")
        for key in value:
            if key not in expected:
                raise self.bad(where, f"has an unknown key {key!r}")
        return value

    def like(self, value: Any, template: Any, where: str) -> Any:
        """`value` checked to have `template`'s shape: the same keys, list lengths and kinds of leaves
        (null, boolean, number, string). Lists come back as tuples where the template has a tuple."""
        if isinstance(template, dict):
            self.keys(value, template, where)
            return {key: self.like(value[key], t, f"{where}.{key}") for key, t in template.items()}
        if isinstance(template, (list, tuple)):
            if not isinstance(value, list) or len(value) != len(template):
                raise self.bad(where, f"is {_kind(value)}, expected a list of {len(template)}")
            items = [self.like(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, template))]
            return tuple(items) if isinstance(template, tuple) else items
        if _kind(value) != _kind(template):
            raise self.bad(where, f"is {_kind(value)}, expected {_kind(template)}")
        return value

    def integer(self, value: Any, where: str, least: int, most: Optional[int] = None) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < least
            or (most is not None and value > most)
        ):
            bounds = f"from {least} to {most}" if most is not None else f">= {least}"
            raise self.bad(where, f"is {value!r}, expected an integer {bounds}")
        return value

    # ----------------------------------------------------------------------------- tensors
    def tensor(self, key: str, dtype: torch.dtype, shape: tuple, most: Optional[int] = None) -> torch.Tensor:
        """The tensor `key` of `dtype` and `shape` (None: any length); with `most`, integers in [0, most]."""
        if key not in self.tensors:
            raise self.error(self.tensors_path, f"has no tensor {key!r}")
        value = self.tensors[key]
        self.used.add(key)
        if (
            value.dtype != dtype
            or value.ndim != len(shape)
            or any(want is not None and got != want for got, want in zip(value.shape, shape))
        ):
            want = ["n" if s is None else s for s in shape]
            raise self.error(
                self.tensors_path, f"tensor {key!r} is {value.dtype} {list(value.shape)}, expected {dtype} {want}"
            )
        if most is not None and value.numel() and (value.min() < 0 or value.max() > most):
            raise self.error(self.tensors_path, f"tensor {key!r} holds values outside [0, {most}]")
        return value

    # ----------------------------------------------------------------------------- sections
    def decode(self, doc: Any, loop: TrainLoop) -> TrainerState:
        if not isinstance(doc, dict):
            raise self.bad("the document", f"is {_kind(doc)}, expected a JSON object")
        if doc.get("format") != FORMAT:
            raise self.bad("format", f"is {doc.get('format')!r}, expected {FORMAT!r}")
        if doc.get("version") != VERSION:
            raise self.bad(
                "version",
                f"{doc.get('version')!r} is not a trainer-state format version this "
                f"clipray reads (it reads {VERSION}); resume with the clipray that wrote it",
            )
        self.keys(doc, _TOP_KEYS, "the document")
        world_size = self.integer(doc["world_size"], "world_size", 1)
        saved_bias = self.like(doc["logit_bias"], True, "logit_bias")
        if saved_bias != (loop.module.logit_bias is not None):
            raise self.bad(
                "logit_bias",
                f"is {str(saved_bias).lower()}, but this loop "
                f"{'has no' if saved_bias else 'has a'} SigLIP bias (train.loss changed?)",
            )
        if not isinstance(doc["extra"], dict):
            raise self.bad("extra", f"is {_kind(doc['extra'])}, expected an object")
        state = TrainerState(
            optimizer=self.optimizer(doc["optimizer"], loop),
            scheduler=self.like(doc["scheduler"], loop.scheduler.state_dict(), "scheduler"),
            scaler=self.scaler(doc["scaler"], loop),
            step=self.integer(doc["step"], "step", 0),
            samples_seen=self.integer(doc["samples_seen"], "samples_seen", 0),
            world_size=world_size,
            rng=self.rng(doc["rng"], world_size, loop.device),
            logit_bias=self.tensor("logit_bias", torch.float32, ()) if saved_bias else None,
            extra=doc["extra"],
        )
        unknown = sorted(set(self.tensors) - self.used)
        if unknown:
            raise self.error(self.tensors_path, f"holds {len(unknown)} unexpected tensors ({', '.join(unknown[:5])})")
        return state

    def optimizer(self, saved: Any, loop: TrainLoop) -> dict:
        """The AdamW state dict keyed by parameter name: groups with the live optimizer's settings
        and parameter names, and float32 [] steps plus moments shaped like their parameter."""
        self.keys(saved, ("param_groups", "with_state"), "optimizer")
        names, params = param_names(loop), dict(loop.module.named_parameters())
        groups = saved["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(names):
            raise self.bad("optimizer.param_groups", f"is {_kind(groups)}, expected a list of {len(names)} groups")
        param_groups, amsgrad = [], {}
        for i, (group, live, wanted) in enumerate(zip(groups, loop.optimizer.param_groups, names)):
            where = f"optimizer.param_groups[{i}]"
            self.keys(group, live, where)
            group = {
                **self.like(
                    {k: v for k, v in group.items() if k != "params"},
                    {k: v for k, v in live.items() if k != "params"},
                    where,
                ),
                "params": group["params"],
            }
            if group["params"] != wanted:
                raise self.bad(
                    f"{where}.params",
                    f"are not the model's {len(wanted)} parameters "
                    f"({_first_difference(group['params'], wanted)}): saved with "
                    "another model or train.loss?",
                )
            param_groups.append(group)
            amsgrad.update(dict.fromkeys(wanted, bool(group.get("amsgrad"))))
        with_state = saved["with_state"]
        if (
            not isinstance(with_state, list)
            or any(not isinstance(n, str) or n not in amsgrad for n in with_state)
            or len(set(with_state)) != len(with_state)
        ):
            raise self.bad("optimizer.with_state", "is not a list of distinct parameter names of the model")
        state = {}
        for name in with_state:
            param, prefix = params[name], f"optimizer/{name}/"
            state[name] = {"step": self.tensor(prefix + "step", torch.float32, ())}
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad[name] else ()):
                state[name][key] = self.tensor(prefix + key, param.dtype, tuple(param.shape))
        return {"state": state, "param_groups": param_groups}

    def scaler(self, saved: Any, loop: TrainLoop) -> dict:
        if not loop.scaler.is_enabled():  # not fp16: restore ignores it
            return self.keys(saved, saved if isinstance(saved, dict) else {}, "scaler")
        if saved == {}:
            raise self.bad(
                "scaler",
                "is empty: the run was saved without the fp16 grad scaler (train.precision "
                "was not amp_fp16); resume with the precision it was saved with",
            )
        return self.like(saved, loop.scaler.state_dict(), "scaler")

    def rng(self, saved: Any, world_size: int, device: torch.device) -> list[dict]:
        """One `rng_snapshot` per rank."""
        if not isinstance(saved, list) or len(saved) != world_size:
            raise self.bad("rng", f"is {_kind(saved)}, expected a list of {world_size} (one per rank)")
        torch_size = torch.get_rng_state().numel()
        cuda_size = torch.cuda.get_rng_state(device).numel() if device.type == "cuda" else None
        out = []
        for rank, entry in enumerate(saved):
            where, prefix = f"rng[{rank}]", f"rng/{rank}/"
            python = entry.get("python") if isinstance(entry, dict) else None
            gauss_next = python.get("gauss_next") if isinstance(python, dict) else None  # null or a number
            template = {
                "cuda": False,
                "numpy": {"pos": 0, "has_gauss": 0, "cached_gaussian": 0.0},
                "python": {"version": 0, "gauss_next": None if gauss_next is None else 0.0},
            }
            entry = self.like(entry, template, where)
            self.integer(entry["numpy"]["pos"], f"{where}.numpy.pos", 0, _MT_WORDS)
            self.integer(entry["numpy"]["has_gauss"], f"{where}.numpy.has_gauss", 0, 1)
            self.integer(entry["python"]["version"], f"{where}.python.version", 3, 3)
            words = self.tensor(prefix + "python", torch.int64, (_MT_WORDS + 1,), most=2**32 - 1)
            if words[-1] > _MT_WORDS:
                raise self.error(
                    self.tensors_path,
                    f"tensor {prefix + 'python'!r} ends in index {int(words[-1])}, expected at most {_MT_WORDS}",
                )
            key = self.tensor(prefix + "numpy", torch.int64, (_MT_WORDS,), most=2**32 - 1)
            numpy_state = entry["numpy"]
            out.append(
                {
                    "torch": self.tensor(prefix + "torch", torch.uint8, (torch_size,)),
                    "cuda": self.tensor(prefix + "cuda", torch.uint8, (cuda_size,)) if entry["cuda"] else None,
                    "numpy": (
                        "MT19937",
                        key.numpy().astype(np.uint32),
                        numpy_state["pos"],
                        numpy_state["has_gauss"],
                        float(numpy_state["cached_gaussian"]),
                    ),
                    "python": (3, tuple(words.tolist()), entry["python"]["gauss_next"]),
                }
            )
        return out


def _kind(value: Any) -> str:
    """What a JSON value is, as an error message names it."""
    for types, name in (
        (type(None), "null"),
        (bool, "a boolean"),
        ((int, float), "a number"),
        (str, "a string"),
        ((list, tuple), "a list"),
        (dict, "an object"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _first_difference(got: Any, wanted: list) -> str:
    if not isinstance(got, list):
        return "not a list"
    for i, (a, b) in enumerate(zip(got, wanted)):
        if a != b:
            return f"#{i} is {a!r}, the model's is {b!r}"
    return f"{len(got)} vs {len(wanted)} entries"
