"""CLIP: an image encoder and a text encoder projected into one joint space, with a learned temperature.

State-dict keys and shapes are OpenAI CLIP's, so released OpenAI / OpenCLIP checkpoints load with
`strict=True`: `visual.*` (ViT or ModifiedResNet), then the text tower at the top level
(`token_embedding`, `positional_embedding`, `transformer.resblocks.N.*`, `ln_final`,
`text_projection`) and `logit_scale`.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, parse_config, resolve_config
from .resnet import ModifiedResNet
from .transformer import LayerNorm, Transformer
from .vision import VisionTransformer

# The normalisation CLIP's image encoders were trained with (RGB, images scaled to [0, 1] first).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def image_mean_std() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """CLIP's per-channel (mean, std) for images in [0, 1]: normalise as (x - mean) / std."""
    return OPENAI_MEAN, OPENAI_STD


class CLIP(nn.Module):
    """Contrastive image-text model.

    Attributes: `visual` (image encoder), `transformer` (text encoder blocks), `logit_scale`
    (log of the inverse temperature), `image_size`, `context_length`, `config` (open_clip layout).
    `text_trim` (default True): the text tower runs only up to the longest caption's end-of-text
    token; causal attention makes the result identical to running all `context_length` positions.
    """

    def __init__(self, config: dict, *, temperature_init: float = 0.07, patch_dropout: float = 0.0):
        super().__init__()
        cfg: CLIPConfig = parse_config(config)
        self.config = copy.deepcopy(config)
        self.embed_dim = cfg.embed_dim
        v, t = cfg.vision, cfg.text
        if v.is_resnet:
            if patch_dropout:
                raise ValueError("patch_dropout applies to ViT image encoders only; this config is a ResNet")
            self.visual = ModifiedResNet(v.layers, cfg.embed_dim, v.heads, v.image_size, v.width)
        else:
            self.visual = VisionTransformer(
                v.image_size, v.patch_size, v.width, v.layers, v.heads, cfg.embed_dim, cfg.quick_gelu, patch_dropout
            )
        self.image_size = v.image_size
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size

        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, cfg.quick_gelu)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        if not temperature_init > 0:
            raise ValueError(f"temperature_init must be > 0, got {temperature_init}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.text_trim = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation (token std 0.02, positions 0.01, width/depth-scaled blocks)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)
        self.visual.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per transformer block and per ResNet block (and stem)."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable
        else:
            self.visual.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, image_size, image_size] float, normalised -> [B, embed_dim] (not L2-normalised)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] long (L <= context_length, end-of-text = largest id) -> [B, embed_dim].

        Features are taken at each row's end-of-text token, found as the row's argmax (CLIP's rule:
        end-of-text has the largest id of the vocabulary).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"tokens have {length} positions but the model's context_length is "
                f"{self.context_length}; tokenize with context_length={self.context_length}"
            )
        eot = tokens.argmax(dim=-1)
        if self.text_trim and length > 1 and not torch.compiler.is_compiling():
            # Positions after the last end-of-text token cannot change any end-of-text feature
            # (causal attention); round up to a multiple of 8 to keep few distinct shapes.
            keep = min(length, -(-(int(eot.max()) + 1) // 8) * 8)
            tokens = tokens[:, :keep]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer.forward_pooled(x, eot, causal=True)
        return self.ln_final(x) @ self.text_projection

    def forward(self, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor]):
        """-> (image features [B, D] L2-normalised, text features [B, D] L2-normalised, exp(logit_scale)).

        Either input may be None; its features are then None.
        """
        image_features = None if images is None else F.normalize(self.encode_image(images), dim=-1)
        text_features = None if tokens is None else F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def create_model(
    name_or_config: Union[str, dict],
    width_mult: float = 1.0,
    *,
    temperature_init: float = 0.07,
    learn_temperature: bool = True,
    patch_dropout: float = 0.0,
    grad_checkpointing: bool = False,
    quick_gelu: Optional[bool] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> CLIP:
    """Build a freshly initialised CLIP.

    name_or_config: a registered name (`list_models()`), a path to a model JSON, or an
    open_clip-layout dict. width_mult: scales image and text widths (see `scale_width`).
    temperature_init: logit_scale starts at log(1 / temperature_init); learn_temperature=False
    freezes it. patch_dropout: ViT training-time token dropout (FLIP). quick_gelu: override the
    config's activation. device="meta" builds without memory (shapes only).
    """
    cfg = resolve_config(name_or_config, width_mult)
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
    with torch.device(device) if device is not None else nullcontext():
        model = CLIP(cfg, temperature_init=temperature_init, patch_dropout=patch_dropout)
    model.logit_scale.requires_grad_(learn_temperature)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if dtype is not None:
        model.to(dtype)
    return model
