"""Model configs: open_clip's JSON layout, the registry of named configs, and width scaling.

A config is a plain dict in open_clip's layout (so users can bring theirs):

    {"embed_dim": 512, "quick_gelu": false,
     "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64},
     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}

`vision_cfg.layers` a list of four ints means ModifiedResNet, an int means ViT. `parse_config`
checks a dict and turns it into the typed `CLIPConfig` the modules are built from.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

CONFIG_DIR = Path(__file__).with_name("model_configs")
QUICKGELU_SUFFIX = "-quickgelu"

# Keys of open_clip's layout that we read; any other key is refused so a typo does not pass silently.
_TOP_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers"}
# open_clip keys that are harmless at their default value (some configs in the wild carry them).
_IGNORABLE = {
    "vision_cfg": {
        "mlp_ratio": 4.0,
        "timm_model_name": None,
        "ls_init_value": None,
        "patch_dropout": 0.0,
        "output_tokens": False,
    },
    "text_cfg": {
        "mlp_ratio": 4.0,
        "hf_model_name": None,
        "ls_init_value": None,
        "output_tokens": False,
        "proj_bias": False,
    },
    "": {"custom_text": False, "cast_dtype": None, "init_logit_scale": None, "init_logit_bias": None},
}


class ModelConfigError(ValueError):
    """A model config that cannot describe a CLIP; the message names the key."""


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    layers: Union[int, tuple[int, int, int, int]]
    width: int
    patch_size: Optional[int]
    head_width: int

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # ViT: heads of `head_width` channels. ModifiedResNet: the attention pool works on
        # width*32 channels and open_clip/OpenAI give it width*32 // head_width heads.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass(frozen=True)
class TextConfig:
    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    quick_gelu: bool
    vision: VisionConfig
    text: TextConfig


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"model config {where} must be a positive integer, got {value!r}")
    return value


def _check_keys(section: dict, allowed: set, where: str) -> None:
    ignorable = _IGNORABLE[where]
    for key, value in section.items():
        if key in allowed:
            continue
        if key in ignorable and value == ignorable[key]:
            continue
        if key in ignorable:
            raise ModelConfigError(
                f"model config {where + '.' if where else ''}{key}={value!r} is not supported "
                f"(only the default {ignorable[key]!r}); remove the key"
            )
        raise ModelConfigError(
            f"model config has unknown key {where + '.' if where else ''}{key!r}; "
            f"known keys: {', '.join(sorted(allowed))}"
        )


def parse_config(cfg: dict) -> CLIPConfig:
    """Check an open_clip-layout dict and return the typed config (errors name the key)."""
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"model config must be a dict, got {type(cfg).__name__}")
    _check_keys(cfg, _TOP_KEYS, "")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ModelConfigError(f"model config lacks the key {key!r}")
    embed_dim = _positive_int(cfg["embed_dim"], "embed_dim")
    quick_gelu = cfg.get("quick_gelu", False)
    if not isinstance(quick_gelu, bool):
        raise ModelConfigError(f"model config quick_gelu must be true or false, got {quick_gelu!r}")

    v = cfg["vision_cfg"]
    if not isinstance(v, dict):
        raise ModelConfigError("model config vision_cfg must be a dict")
    _check_keys(v, _VISION_KEYS, "vision_cfg")
    for key in ("image_size", "layers", "width"):
        if key not in v:
            raise ModelConfigError(f"model config lacks vision_cfg.{key}")
    image_size = v["image_size"]
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ModelConfigError(f"model config vision_cfg.image_size {image_size!r}: only square images")
        image_size = image_size[0]
    image_size = _positive_int(image_size, "vision_cfg.image_size")
    width = _positive_int(v["width"], "vision_cfg.width")
    head_width = _positive_int(v.get("head_width", 64), "vision_cfg.head_width")
    layers = v["layers"]
    if isinstance(layers, (list, tuple)):
        if len(layers) != 4:
            raise ModelConfigError(f"model config vision_cfg.layers {list(layers)!r}: a ModifiedResNet has 4 stages")
        layers = tuple(_positive_int(n, f"vision_cfg.layers[{i}]") for i, n in enumerate(layers))
        if image_size % 32:
            raise ModelConfigError(
                f"model config vision_cfg.image_size {image_size} must be a multiple of 32 for a ResNet"
            )
        if (width * 32) % head_width:
            raise ModelConfigError(
                f"model config vision_cfg.head_width {head_width} must divide the attention-pool width "
                f"32*width = {width * 32}"
            )
        if width % 2:
            raise ModelConfigError(f"model config vision_cfg.width {width} must be even (the stem uses width/2)")
        patch_size = None
    else:
        layers = _positive_int(layers, "vision_cfg.layers")
        patch_size = _positive_int(v.get("patch_size"), "vision_cfg.patch_size")
        if image_size % patch_size:
            raise ModelConfigError(
                f"model config vision_cfg.image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        if width % head_width:
            raise ModelConfigError(
                f"model config vision_cfg.head_width {head_width} must divide vision_cfg.width {width}"
            )
    vision = VisionConfig(image_size, layers, width, patch_size, head_width)

    t = cfg["text_cfg"]
    if not isinstance(t, dict):
        raise ModelConfigError("model config text_cfg must be a dict")
    _check_keys(t, _TEXT_KEYS, "text_cfg")
    defaults = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
    tv = {k: _positive_int(t.get(k, d), f"text_cfg.{k}") for k, d in defaults.items()}
    if tv["width"] % tv["heads"]:
        raise ModelConfigError(f"model config text_cfg.heads {tv['heads']} must divide text_cfg.width {tv['width']}")
    return CLIPConfig(embed_dim, quick_gelu, vision, TextConfig(**tv))


@lru_cache(maxsize=None)
def _registered() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def list_models() -> list[str]:
    """Registered names: each JSON in model_configs/ and its `-quickgelu` twin."""
    names = []
    for base in _registered():
        names += [base, base + QUICKGELU_SUFFIX]
    return sorted(names)


def get_model_config(name: str) -> dict:
    """The open_clip-layout dict of a registered name or of a JSON file path (a fresh copy)."""
    registry = _registered()
    if name in registry:
        return json.loads(registry[name].read_text())
    if name.endswith(QUICKGELU_SUFFIX) and name[: -len(QUICKGELU_SUFFIX)] in registry:
        cfg = json.loads(registry[name[: -len(QUICKGELU_SUFFIX)]].read_text())
        cfg["quick_gelu"] = True
        return cfg
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"model config file {path} is not valid JSON: {e}") from None
        parse_config(cfg)
        return cfg
    raise ModelConfigError(
        f"model {name!r} is neither a registered model nor a model JSON file; registered: {', '.join(list_models())}"
    )


def _round_to(value: float, step: int) -> int:
    return max(step, step * int(math.floor(value / step + 0.5)))


def scale_width(cfg: dict, width_mult: float) -> dict:
    """Scale a config's widths as the CLIP paper does: image-encoder width and text width, never depth.

    ViT: the number of heads scales and `head_width` stays, so width = heads * head_width.
    ModifiedResNet: the base width scales, rounded so that head_width divides 32*width and the
    stem's width/2 is whole. Text: heads scale, the per-head width stays. `embed_dim` is kept.
    Every multiplier > 0 gives a valid config (at least one head, widths divisible by heads).
    """
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or not width_mult > 0:
        raise ModelConfigError(f"width_mult must be a number > 0, got {width_mult!r}")
    parsed = parse_config(cfg)
    out = copy.deepcopy(cfg)
    if width_mult == 1.0:
        return out
    v, t = parsed.vision, parsed.text
    if v.is_resnet:
        # 32*width must be a multiple of head_width, and width even for the stem.
        step = math.lcm(2, v.head_width // math.gcd(v.head_width, 32))
        out["vision_cfg"]["width"] = _round_to(v.width * width_mult, step)
    else:
        heads = max(1, int(math.floor(v.heads * width_mult + 0.5)))
        out["vision_cfg"]["width"] = heads * v.head_width
    head_dim = t.width // t.heads
    text_heads = max(1, int(math.floor(t.heads * width_mult + 0.5)))
    out["text_cfg"]["heads"] = text_heads
    out["text_cfg"]["width"] = text_heads * head_dim
    parse_config(out)
    return out


def resolve_config(name_or_config: Union[str, dict], width_mult: float = 1.0) -> dict:
    """A name, JSON path or dict -> a checked open_clip-layout dict with `width_mult` applied."""
    if isinstance(name_or_config, dict):
        cfg = copy.deepcopy(name_or_config)
        parse_config(cfg)
    elif isinstance(name_or_config, (str, Path)):
        cfg = get_model_config(str(name_or_config))
    else:
        raise ModelConfigError(
            f"model must be a registered name, a JSON path or a config dict, got {type(name_or_config).__name__}"
        )
    return scale_width(cfg, width_mult)
