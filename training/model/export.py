"""Write a CLIP as the model directories other libraries load.

- `open_clip`: open_clip's hub layout, `open_clip_config.json` ({"model_cfg": our open_clip-layout
  config, "preprocess_cfg": mean, std, interpolation, resize mode}) + `open_clip_model.safetensors`
  (OpenAI keys, which open_clip's `CLIP` uses too). open_clip 3.3.0 loads it with
  `open_clip.create_model_and_transforms("local-dir:DIR")` and `open_clip.get_tokenizer("local-dir:DIR")`.
- `hf`: Hugging Face `transformers` `CLIPModel`: `config.json` + `model.safetensors` (keys through
  `hf_keys`, the one table both directions use), the tokenizer files (`hf_tokenizer`) and
  `preprocessor_config.json`, so `CLIPModel.from_pretrained(DIR)` and `CLIPProcessor.from_pretrained(DIR)`
  load it. ViT image towers only (HF has no ModifiedResNet).

Both directories hold the model's own `logit_scale`. Files are written atomically, one by one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file as save_safetensors

from storage import atomic_local_write

from .clip import CLIP, image_mean_std
from .config import parse_config
from .hf_keys import hf_config, to_hf

FORMATS = ("open_clip", "hf")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_PREPROCESSOR = "preprocessor_config.json"
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, HF's `resample` code


def _state(model: CLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def _write_json(path: Path, obj: dict) -> None:
    atomic_local_write(str(path), lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    atomic_local_write(str(path), lambda p: save_safetensors(state, p, metadata={"format": "pt"}))


def export_open_clip(model: CLIP, directory: Union[str, os.PathLike]) -> Path:
    """open_clip's hub layout in `directory` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mean, std = image_mean_std()
    config = {
        "model_cfg": model.config,
        "preprocess_cfg": {
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    _write_weights(directory / OPEN_CLIP_WEIGHTS, _state(model))
    _write_json(directory / OPEN_CLIP_CONFIG, config)
    return directory


def hf_preprocessor_config(image_size: int) -> dict:
    """CLIPImageProcessor's settings equal to our eval transform (shorter side to S, bicubic, centre crop)."""
    mean, std = image_mean_std()
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": PIL_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def export_hf(model: CLIP, directory: Union[str, os.PathLike]) -> Path:
    """A transformers CLIPModel directory in `directory` (created); returns it. ValueError for a ResNet."""
    from .hf_tokenizer import write_tokenizer_files

    config = hf_config(model.config)  # refuses ModifiedResNet before anything is written
    parsed = parse_config(model.config)
    directory = Path(directory)
    if (directory / "model_config.json").exists():
        raise ValueError(
            f"{directory} holds a clipray checkpoint (model_config.json): exporting there would overwrite "
            f"its {HF_WEIGHTS}; choose another output folder"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _write_weights(directory / HF_WEIGHTS, to_hf(_state(model), parsed.vision.layers, parsed.text.layers))
    write_tokenizer_files(directory, parsed.text.context_length)
    _write_json(directory / HF_PREPROCESSOR, hf_preprocessor_config(parsed.vision.image_size))
    _write_json(directory / HF_CONFIG, config)  # last: a directory with config.json is complete
    return directory


def export_checkpoint(source: str, fmt: str, output: str, name: Optional[str] = None) -> str:
    """Load `source` (anything `load_model` reads: a run dir, `final/`, a checkpoint file, an
    open_clip or HF directory; local or fsspec URL) and write it as `fmt` into `output` (a folder, local
    or fsspec URL, reached with the standard credential chain). Returns `output`."""
    import tempfile

    from storage import absolute, fsspec_filesystem, is_local

    from .checkpoint import load_model

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of: {', '.join(FORMATS)}")
    model = load_model(source, name)
    if fmt == "hf":
        hf_config(model.config)  # a ResNet is refused before anything is written
    if is_local(output):
        export_model(model, absolute(output), fmt)
        return output
    fs, root = fsspec_filesystem(output)
    if fmt == "hf" and fs.exists(f"{root.rstrip('/')}/model_config.json"):
        raise ValueError(f"{output} holds a clipray checkpoint (model_config.json); choose another output folder")
    with tempfile.TemporaryDirectory(prefix="clipray-export-") as tmp:
        export_model(model, tmp, fmt)
        fs.makedirs(root, exist_ok=True)
        for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name in (HF_CONFIG, OPEN_CLIP_CONFIG)):  # config last
            fs.put(str(path), f"{root}/{path.name}")
    return output


def export_model(model: CLIP, directory: Union[str, os.PathLike], fmt: str) -> Path:
    """Write `model` in format `fmt` (one of FORMATS) into `directory`."""
    writers = {"open_clip": export_open_clip, "hf": export_hf}
    if fmt not in writers:
        raise ValueError(f"export format {fmt!r} is not one of: {', '.join(FORMATS)}")
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    if not isinstance(model, CLIP):
        raise TypeError(f"export expects a CLIP, got {type(model).__name__}")
    return writers[fmt](model, directory)
