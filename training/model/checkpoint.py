"""Checkpoint I/O in OpenAI CLIP's key layout.

Reads, without ever unpickling arbitrary Python objects:
- `.safetensors` files;
- `torch.save` files (`.pt`/`.pth`/`.bin`) through `torch.load(weights_only=True)`: plain state
  dicts and OpenCLIP training checkpoints (`{"state_dict": ..., ...}` with `module.` prefixes);
- TorchScript archives as OpenAI released them (`ViT-B-32.pt`): only their tensors are taken
  (`torchscript.py`);
- our own directories: `model.safetensors` + `model_config.json` (a `final/` dir or a run dir);
- open_clip hub-layout and Hugging Face `CLIPModel` directories (`external_dirs.py`).

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
from typing import Optional, Union

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from storage import StorageConfig, atomic_local_write, fsspec_filesystem

from .clip import CLIP, create_model
from .config import parse_config
from .torchscript import TorchScriptError, is_torchscript, read_torchscript

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
# Non-weight entries some released checkpoints carry (OpenAI's TorchScript archives; old OpenCLIP).
_NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and where."""


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
    elif zipfile.is_zipfile(path) and is_torchscript(zipfile.ZipFile(path)):
        with zipfile.ZipFile(path) as archive:
            try:
                state = read_torchscript(path, archive)
            except TorchScriptError as e:
                raise CheckpointError(str(e)) from None
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
    """Copy a checkpoint at an fsspec URL (s3://...) into `into`; returns the local weights file
    (or `into` itself for an open_clip / HF directory, whose files are copied).

    A directory URL of ours is searched like a local one: model.safetensors in it, in final/, or in
    the newest checkpoint_*/; its model_config.json comes along.
    """
    from .external_dirs import fetch_external

    fs, root = fsspec_filesystem(url, storage)
    if fs.isfile(root):
        local = into / Path(root).name
        fs.get(root, str(local))
        return local
    if fetch_external(fs, root, into):  # an open_clip or HF directory: `into` is one now
        return into
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

    path: our run dir / `final/` dir / any dir with model.safetensors, an open_clip hub-layout or
    Hugging Face CLIPModel directory, or a checkpoint file
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
    from .external_dirs import read_external_dir

    path = Path(path).expanduser()
    external = read_external_dir(path) if path.is_dir() else None
    if external is not None:
        state, found = external
    else:
        if path.is_dir():
            path = _find_weights(path)
        elif not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        state = load_state_dict(path)
        found = None
        if (path.parent / CONFIG_FILE).is_file() and path.name == WEIGHTS_FILE:
            found = json.loads((path.parent / CONFIG_FILE).read_text())
    if name is not None:
        cfg = name
    elif found is not None:
        cfg = found
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
