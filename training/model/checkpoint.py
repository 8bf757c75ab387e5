"""Checkpoint I/O in OpenAI CLIP's key layout.

Reads, without ever unpickling arbitrary Python objects:
- `.safetensors` files;
- `torch.save` files (`.pt`/`.pth`/`.bin`) through `torch.load(weights_only=True)`: plain state
  dicts and OpenCLIP training checkpoints (`{"state_dict": ..., ...}` with `module.` prefixes);
- TorchScript archives as OpenAI released them (`ViT-B-32.pt`): only their tensors are taken, by a
  restricted unpickler that rebuilds tensors and stand-ins for the scripted modules and refuses
  every other global. Which tensors are parameters/buffers is read from the archive's `code/`;
- our own directories: `model.safetensors` + `model_config.json` (a `final/` dir or a run dir).

Without a config, the architecture is inferred from the state dict's shapes (as OpenAI's
`build_model` does; heads = width / 64). A checkpoint that does not fit raises `CheckpointError`
listing missing keys, unexpected keys and shape mismatches.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from storage import StorageConfig, atomic_local_write, fsspec_filesystem

from .clip import CLIP, create_model
from .config import get_model_config, parse_config

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
# Non-weight entries some released checkpoints carry (OpenAI's TorchScript archives; old OpenCLIP).
_NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and where."""


# ---------------------------------------------------------------------------------------------
# TorchScript archives: tensors only.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptedModule:
    """Stand-in for a scripted module object: keeps its attribute dict, runs no code."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"scripted object {self.qualname} has a non-dict state")
        self.__dict__["_state"] = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`: tensors, ordered dicts and module stand-ins, nothing else."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptedModule,), {"qualname": qualname})
            return self._classes[qualname]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a TorchScript archive (only tensors are read)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in TorchScript archive")
        _, storage_type, key, _location, numel = pid
        raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
        if flat.numel() < numel:
            raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} elements, expected {numel}")
        return flat


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _state_names(archive: zipfile.ZipFile, prefix: str, qualname: str) -> Optional[set]:
    """Parameter and buffer names of a scripted class, from `code/` (None if not found)."""
    module, _, cls = qualname.rpartition(".")
    path = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        source = archive.read(path).decode("utf-8")
    except KeyError:
        return None
    match = re.search(
        rf"^class {re.escape(cls)}\(Module\):\n  __parameters__ = \[(.*?)\]\n"
        rf"  __buffers__ = \[(.*?)\]",
        source,
        re.MULTILINE,
    )
    if not match:
        return None
    names = re.findall(r'"([^"]+)"', match.group(1)) + re.findall(r'"([^"]+)"', match.group(2))
    return set(names)


def _read_torchscript(path: Path, archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(data) != 1:
        raise CheckpointError(f"{path}: TorchScript archive without a single data.pkl")
    prefix = data[0][: -len("data.pkl")]
    with archive.open(data[0]) as f:
        try:
            root = _TensorsOnlyUnpickler(f, archive, prefix).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: {e}") from None
    out: dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptedModule, name: str) -> None:
        state = obj.__dict__.get("_state", {})
        keep = _state_names(archive, prefix, obj.qualname)
        for attr, value in state.items():
            if isinstance(value, torch.Tensor):
                if keep is None or attr in keep:
                    out[name + attr] = value.clone()
            elif isinstance(value, _ScriptedModule):
                walk(value, f"{name}{attr}.")

    if not isinstance(root, _ScriptedModule):
        raise CheckpointError(f"{path}: TorchScript archive whose root is not a module")
    walk(root, "")
    return out


# ---------------------------------------------------------------------------------------------
# Reading state dicts.


def _strip(state: dict) -> dict:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, keys in OpenAI's layout (prefixes and wrapper dicts removed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            state = load_safetensors(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    elif zipfile.is_zipfile(path) and _is_torchscript(zipfile.ZipFile(path)):
        with zipfile.ZipFile(path) as archive:
            state = _read_torchscript(path, archive)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to unpickle (only tensors and plain containers are loaded): {e}"
            ) from None
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None
        state = obj
        if isinstance(obj, dict):
            for wrapper in ("state_dict", "model"):
                if isinstance(obj.get(wrapper), dict):
                    state = obj[wrapper]
                    break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{path}: expected a state dict (or a dict with 'state_dict') of tensors, got {type(obj).__name__}"
            )
    state = _strip(dict(state))
    return {k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS}


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_config(
    state: dict[str, torch.Tensor], *, quick_gelu: bool = True, head_width: int = 64, text_head_width: int = 64
) -> dict:
    """An open_clip-layout config from a state dict's shapes (heads are not stored: width / 64).

    quick_gelu defaults to True (OpenAI's released CLIPs); pass False for GELU-trained models.
    """
    try:
        if "visual.proj" in state:
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {
                "image_size": patch * grid,
                "layers": _count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
                "width": width,
                "patch_size": patch,
                "head_width": head_width,
            }
        else:
            layers = [_count(state, rf"visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4)]
            grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {
                "image_size": grid * 32,
                "layers": layers,
                "width": state["visual.layer1.0.conv1.weight"].shape[0],
                "head_width": head_width,
            }
        text_width = state["ln_final.weight"].shape[0]
        cfg = {
            "embed_dim": state["text_projection"].shape[1],
            "quick_gelu": quick_gelu,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": state["positional_embedding"].shape[0],
                "vocab_size": state["token_embedding.weight"].shape[0],
                "width": text_width,
                "heads": max(1, text_width // text_head_width),
                "layers": _count(state, r"transformer\.resblocks\.(\d+)\."),
            },
        }
    except KeyError as e:
        raise CheckpointError(
            f"cannot infer the architecture: the state dict has no {e.args[0]!r} "
            f"(not an OpenAI-layout CLIP? give the model name or config)"
        ) from None
    parse_config(cfg)
    return cfg


def check_state_dict(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches (if any)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(title: str, items: list) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:25])
        more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    raise CheckpointError(
        f"{source} does not fit the model"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", shapes)
        + "\n  (wrong model name/config? give load_model(path, name=...) the architecture it was trained as)"
    )


def _find_weights(directory: Path) -> Path:
    """model.safetensors in `directory`, its `final/`, or the newest `checkpoint_*/` below it."""
    for candidate in (directory / WEIGHTS_FILE, directory / "final" / WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    checkpoints = sorted(directory.glob(f"checkpoint_*/{WEIGHTS_FILE}"), key=lambda p: p.parent.name)
    if checkpoints:
        return checkpoints[-1]
    found = ", ".join(sorted(p.name for p in directory.iterdir())[:20]) or "nothing"
    raise CheckpointError(
        f"{directory} holds no {WEIGHTS_FILE} (looked in it, in final/ and in checkpoint_*/; found: {found})"
    )


def _fetch_remote(url: str, into: Path, storage: Optional[StorageConfig] = None) -> Path:
    """Copy a checkpoint at an fsspec URL (s3://...) into `into`; returns the local weights file.

    A directory URL is searched like a local one: model.safetensors in it, in final/, or in the
    newest checkpoint_*/; its model_config.json comes along.
    """
    fs, root = fsspec_filesystem(url, storage)
    if fs.isfile(root):
        local = into / Path(root).name
        fs.get(root, str(local))
        return local
    candidates = [f"{root}/{WEIGHTS_FILE}", f"{root}/final/{WEIGHTS_FILE}"]
    candidates += sorted(fs.glob(f"{root}/checkpoint_*/{WEIGHTS_FILE}"), reverse=True)
    weights = next((c for c in candidates if fs.isfile(c)), None)
    if weights is None:
        raise CheckpointError(f"{url} holds no {WEIGHTS_FILE} (looked in it, in final/ and in checkpoint_*/)")
    fs.get(weights, str(into / WEIGHTS_FILE))
    config = weights.rsplit("/", 1)[0] + f"/{CONFIG_FILE}"
    if fs.isfile(config):
        fs.get(config, str(into / CONFIG_FILE))
    return into / WEIGHTS_FILE


def load_model(
    path: Union[str, os.PathLike],
    name: Union[str, dict, None] = None,
    *,
    quick_gelu: Optional[bool] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    storage: Optional[StorageConfig] = None,
) -> CLIP:
    """Load a CLIP from a checkpoint, in eval mode.

    path: our run dir / `final/` dir / any dir with model.safetensors, or a checkpoint file
    (.safetensors, .pt state dict, OpenCLIP checkpoint, OpenAI TorchScript archive).
    name: registered name, JSON path or config dict; when None, `model_config.json` next to the
    weights is used, else the architecture is inferred from the shapes. quick_gelu overrides the
    config's activation (inferred configs default to QuickGELU, as OpenAI's models).
    A path may also be an fsspec URL (s3://bucket/run/final): it is copied to a temporary folder,
    reached with `storage` (a config section's storage keys).
    """
    if "://" in str(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="clipray-ckpt-") as tmp:
            local = _fetch_remote(str(path), Path(tmp), storage)
            return load_model(local, name, quick_gelu=quick_gelu, device=device, dtype=dtype)
    path = Path(path).expanduser()
    if path.is_dir():
        path = _find_weights(path)
    elif not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = load_state_dict(path)
    if isinstance(name, dict):
        cfg = name
    elif name is not None:
        cfg = get_model_config(str(name))
    elif (path.parent / CONFIG_FILE).is_file() and path.name == WEIGHTS_FILE:
        cfg = json.loads((path.parent / CONFIG_FILE).read_text())
    else:
        cfg = infer_config(state, quick_gelu=True if quick_gelu is None else quick_gelu)
        log.info("inferred model config from %s: %s", path, json.dumps(cfg))
    model = create_model(cfg, quick_gelu=quick_gelu, device="meta")
    check_state_dict(model, state, source=f"checkpoint {path}")
    model.load_state_dict(state, strict=True, assign=True)
    # Released OpenAI archives hold float16 weights: cast floating tensors to `dtype`.
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: torch.nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write `model.safetensors` (OpenAI key layout) and `model_config.json` into `directory`.

    Accepts a CLIP wrapped by DDP (`.module`) or `torch.compile` (`._orig_mod`). Files are written to a
    temporary name first and renamed, so a crash never leaves a half-written checkpoint.
    """
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    if not isinstance(model, CLIP):
        raise TypeError(f"save_model expects a CLIP, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_local_write(str(directory / WEIGHTS_FILE), lambda p: save_safetensors(state, p, metadata={"format": "pt"}))
    atomic_local_write(
        str(directory / CONFIG_FILE), lambda p: Path(p).write_text(json.dumps(model.config, indent=2) + "\n")
    )
    return directory
