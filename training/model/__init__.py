"""CLIP model: image encoders (ViT, ModifiedResNet), text encoder, registry and checkpoint I/O.

Knows no Ray, no training loop and no data source.
"""
from .checkpoint import CheckpointError, load_model, load_state_dict, save_model
from .clip import CLIP, create_model, image_mean_std
from .config import ModelConfigError, get_model_config, list_models, parse_config, scale_width

__all__ = [
    "CLIP", "CheckpointError", "ModelConfigError", "create_model", "get_model_config",
    "image_mean_std", "list_models", "load_model", "load_state_dict", "parse_config", "save_model",
    "scale_width",
]
