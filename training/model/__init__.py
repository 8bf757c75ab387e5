"""CLIP model: image encoders (ViT, ModifiedResNet), text encoder, registry, checkpoint I/O and the
eval image transform.

Knows no Ray, no training loop and no data source.
"""

from .checkpoint import CheckpointError, load_model, load_state_dict, save_model
from .clip import CLIP, create_model, image_mean_std
from .config import ModelConfigError, get_model_config, list_models, parse_config, scale_width
from .transform import eval_pixels, normalize_pixels, pixel_scale_shift

__all__ = [
    "CLIP",
    "CheckpointError",
    "ModelConfigError",
    "create_model",
    "eval_pixels",
    "get_model_config",
    "image_mean_std",
    "list_models",
    "load_model",
    "load_state_dict",
    "normalize_pixels",
    "parse_config",
    "pixel_scale_shift",
    "save_model",
    "scale_width",
]
