"""Read model directories written by other libraries: open_clip's hub layout and HF `CLIPModel`.

`load_model` (and so `model.pretrained` and `eval.model`) takes these besides our own folders:
- open_clip: `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) + weights, chosen in open_clip's
  own order (`open_clip_model.safetensors`, `open_clip_pytorch_model.safetensors`,
  `open_clip_pytorch_model.bin`), OpenAI key layout;
- Hugging Face: `config.json` with `"model_type": "clip"` + `model.safetensors` (or its sharded
  index, or `pytorch_model.bin`), keys converted by `hf_keys.from_hf`.
A directory is recognised by its config file. What our CLIP cannot reproduce exactly is refused
with the key named: another image normalisation (our data path normalises with CLIP's mean/std),
another activation, MLP ratio, layer-norm eps, or text pooling rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import CheckpointError, load_state_dict
from .clip import image_mean_std
from .config import parse_config
from .hf_keys import config_from_hf, from_hf

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"
HF_INDEX = "model.safetensors.index.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Files to copy from a remote directory of each layout (weights: the first that exists; shards
# of a sharded checkpoint are named in its index).
REMOTE_FILES = {
    "open_clip": ((OPEN_CLIP_CONFIG,), OPEN_CLIP_WEIGHTS),
    "hf": ((HF_CONFIG, HF_PREPROCESSOR), (HF_INDEX,) + HF_WEIGHTS),
}


def layout_of(names: set[str]) -> Optional[str]:
    """ "open_clip", "hf" or None (ours or unknown) from the file names of a directory."""
    if OPEN_CLIP_CONFIG in names:
        return "open_clip"
    if HF_CONFIG in names and "model_config.json" not in names:
        return "hf"
    return None


def detect(directory: Path) -> Optional[str]:
    return layout_of({p.name for p in directory.iterdir()}) if directory.is_dir() else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_normalisation(mean, std, source: str) -> None:
    """Refuse an image normalisation other than CLIP's (ours is fixed along the whole data path)."""
    ours_mean, ours_std = image_mean_std()
    for name, theirs, ours in (("mean", mean, ours_mean), ("std", std, ours_std)):
        if theirs is None:
            continue
        values = [float(theirs)] * 3 if isinstance(theirs, (int, float)) else [float(x) for x in theirs]
        if len(values) != 3 or max(abs(a - b) for a, b in zip(values, ours)) > 1e-6:
            raise CheckpointError(
                f"{source}: image {name} {values} differs from CLIP's {list(ours)}; clipray normalises "
                "every image with CLIP's mean and std, so this model's features would be wrong"
            )


def _first(directory: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory} has {what} but no weights file (looked for {', '.join(names)})")


def read_open_clip_dir(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(OpenAI-layout state dict, open_clip-layout config) of an open_clip hub-layout directory."""
    source = str(directory / OPEN_CLIP_CONFIG)
    doc = _read_json(directory / OPEN_CLIP_CONFIG)
    if not isinstance(doc.get("model_cfg"), dict):
        raise CheckpointError(f"{source}: no 'model_cfg' object (not open_clip's hub layout)")
    cfg = doc["model_cfg"]
    try:
        parse_config(cfg)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    pre = doc.get("preprocess_cfg") or {}
    check_normalisation(pre.get("mean"), pre.get("std"), source)
    for key, ours in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
        if pre.get(key, ours) != ours:
            raise CheckpointError(
                f"{source}: preprocess_cfg.{key} {pre[key]!r} is not supported (clipray's eval transform is {ours!r})"
            )
    state = load_state_dict(_first(directory, OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG))
    return state, cfg


def _shards(index: Path) -> list[str]:
    """The shard files a sharded HF checkpoint's index names (plain file names only)."""
    weight_map = _read_json(index).get("weight_map")
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
    if not shards or any(not isinstance(s, str) or "/" in s or "\\" in s or s in (".", "..") for s in shards):
        raise CheckpointError(f"{index}: weight_map must map keys to shard file names beside the index")
    return shards


def _hf_state(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / HF_INDEX
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in _shards(index):
            state.update(load_state_dict(directory / shard))
        return state
    return load_state_dict(_first(directory, HF_WEIGHTS, HF_CONFIG))


def read_hf_dir(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(OpenAI-layout state dict, open_clip-layout config) of a transformers CLIPModel directory."""
    source = str(directory / HF_CONFIG)
    try:
        cfg = config_from_hf(_read_json(directory / HF_CONFIG), source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if (directory / HF_PREPROCESSOR).is_file():
        pre = _read_json(directory / HF_PREPROCESSOR)
        check_normalisation(pre.get("image_mean"), pre.get("image_std"), str(directory / HF_PREPROCESSOR))
    return from_hf(_hf_state(directory), source=str(directory)), cfg


def read_external_dir(directory: Path) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """(state dict, config) when `directory` is an open_clip or HF model directory, else None."""
    layout = detect(directory)
    if layout == "open_clip":
        return read_open_clip_dir(directory)
    if layout == "hf":
        return read_hf_dir(directory)
    return None


def fetch_external(fs, root: str, into: Path) -> bool:
    """Copy an open_clip/HF directory at `root` on fsspec filesystem `fs` into `into`; False when
    `root` is neither (then nothing is copied)."""
    try:
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return False
    layout = layout_of(names)
    if layout is None:
        return False
    configs, weights = REMOTE_FILES[layout]
    for name in configs:
        if name in names:
            fs.get(f"{root}/{name}", str(into / name))
    found = next((w for w in weights if w in names), None)
    if found is None:
        raise CheckpointError(f"{root} has {configs[0]} but no weights file (looked for {', '.join(weights)})")
    fs.get(f"{root}/{found}", str(into / found))
    if found == HF_INDEX:
        for shard in _shards(into / HF_INDEX):
            fs.get(f"{root}/{shard}", str(into / shard))
    return True


def stored_config(uri: str, storage=None) -> Optional[dict]:
    """The open_clip-layout config a checkpoint carries, read without its weights: our
    `model_config.json` (in the folder, its `final/` or newest `checkpoint_*/`, or beside a
    `model.safetensors`), an open_clip `model_cfg` or an HF `config.json`; None when it carries none
    (a bare state dict, an OpenAI archive). `uri`: local path or fsspec URL."""
    from storage import fsspec_filesystem

    from .checkpoint import CONFIG_FILE, WEIGHTS_FILE

    fs, root = fsspec_filesystem(str(uri), storage)
    root = root.rstrip("/")

    def read(path: str) -> dict:
        try:
            obj = json.loads(fs.cat_file(path))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return obj

    if fs.isfile(root):
        sibling = root.rsplit("/", 1)[0] + f"/{CONFIG_FILE}"
        return read(sibling) if root.endswith(WEIGHTS_FILE) and fs.isfile(sibling) else None
    if not fs.isdir(root):
        raise CheckpointError(f"checkpoint {uri} does not exist")
    layout = layout_of({p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)})
    if layout == "open_clip":
        cfg = read(f"{root}/{OPEN_CLIP_CONFIG}").get("model_cfg")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{uri}/{OPEN_CLIP_CONFIG}: no 'model_cfg' object (not open_clip's hub layout)")
        return cfg
    if layout == "hf":
        try:
            return config_from_hf(read(f"{root}/{HF_CONFIG}"), f"{uri}/{HF_CONFIG}")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    folders = [root, f"{root}/final"] + sorted(
        (p.rsplit("/", 1)[0] for p in fs.glob(f"{root}/checkpoint_*/{WEIGHTS_FILE}")), reverse=True
    )
    for folder in folders:
        if fs.isfile(f"{folder}/{WEIGHTS_FILE}"):
            return read(f"{folder}/{CONFIG_FILE}") if fs.isfile(f"{folder}/{CONFIG_FILE}") else None
    return None
