"""ModifiedResNet image encoder (CLIP's RN50/RN101/RN50x*) in OpenAI's layout (`visual.*` keys).

Differences from torchvision's ResNet, as in the CLIP paper:
- a stem of three 3x3 convolutions (the first strided) and an average pool instead of a max pool;
- anti-aliased strided blocks: an average pool before the strided convolutions (the 1x1 conv3 of
  the main path and the 1x1 conv of the shortcut), all convolutions themselves stride 1;
- attention pooling instead of global average pooling: one multi-head attention whose query is the
  mean of the final feature map, with a positional embedding, projected to the output width.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def _frozen_running_stats(modules: list[nn.Module]):
    """BatchNorm running stats left alone: checkpoint's recomputation must not update them twice."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


def _checkpointed(fn, x: torch.Tensor, modules: list[nn.Module]) -> torch.Tensor:
    """fn(x) under activation checkpointing; the recomputation in backward leaves the BN stats of
    `modules` alone (they were updated once, in the forward)."""
    return checkpoint(fn, x, use_reentrant=False, context_fn=lambda: (nullcontext(), _frozen_running_stats(modules)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # Key names "downsample.0" (conv) and "downsample.1" (BN) as in OpenAI's checkpoints.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.act3(y + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean-pooled feature queries all positions (plus itself).

    Only the pooled token's output is needed, so only its query is computed.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, output_dim]."""
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, x.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, x.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, C/heads]
        return self.c_proj(out.reshape(b, c))


class ModifiedResNet(nn.Module):
    def __init__(
        self, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int = 224, width: int = 64
    ):
        super().__init__()
        self.image_size = image_size
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(image_size // 32, embed_dim, heads, output_dim)
        self.grad_checkpointing = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        seq = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        seq += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*seq)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, image_size, image_size] float, normalised -> [B, output_dim]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {tuple(x.shape[-2:])} but this ResNet takes {self.image_size}x{self.image_size}"
            )
        if x.dtype != self.conv1.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.conv1.weight.dtype)  # e.g. float images into a half-precision model
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        x = _checkpointed(self.stem, x, [self.bn1, self.bn2, self.bn3]) if ckpt else self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = _checkpointed(block, x, [block]) if ckpt else block(x)
        return self.attnpool(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's init: attention-pool projections std C^-0.5; last BN of each block zero (identity start)."""
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                nn.init.zeros_(block.bn3.weight)
