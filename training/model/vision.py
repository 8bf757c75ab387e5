"""Vision Transformer image encoder in OpenAI CLIP's layout (`visual.*` keys).

patches (conv without bias) -> [class token; patches] + positional embedding -> (patch dropout,
training only) -> ln_pre -> pre-LN transformer -> ln_post(class token) @ proj.
"""

from __future__ import annotations

import torch
from torch import nn

from .transformer import LayerNorm, Transformer


class PatchDropout(nn.Module):
    """FLIP's patch dropout: in training keep a random subset of patch tokens (the class token always).

    A speed option: dropping half the patches halves the transformer's work. Off in eval mode.
    """

    def __init__(self, prob: float = 0.0):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1 + N, width] (class token first) -> [B, 1 + keep, width]."""
        if not self.training or self.prob == 0.0:
            return x
        b, n = x.shape[0], x.shape[1] - 1
        keep = max(1, int(n * (1.0 - self.prob)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep] + 1
        idx = torch.cat([torch.zeros(b, 1, dtype=idx.dtype, device=idx.device), idx], dim=1)
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        quick_gelu: bool,
        patch_dropout: float = 0.0,
    ):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.patch_dropout = PatchDropout(patch_dropout)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, image_size, image_size] float, normalised -> [B, output_dim]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(x.shape[-2:])} but this ViT takes {self.image_size}x{self.image_size}")
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(self.patch_dropout(x))
        index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.transformer.forward_pooled(x, index)
        return self.ln_post(x) @ self.proj

    @torch.no_grad()
    def init_weights(self) -> None:
        scale = self.class_embedding.shape[0] ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_weights()
