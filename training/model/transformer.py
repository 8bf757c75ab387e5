"""Pre-LN transformer blocks in OpenAI CLIP's parameter layout, batch-first, attention through SDPA.

Keys per block (as OpenAI released them): `ln_1`, `attn.in_proj_weight` / `attn.in_proj_bias`
(fused QKV, [3*width, width]), `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`.

Tensors are [B, L, width] throughout (no [L, B, width] permutes). Both towers only need one token
out of the last block (the class token, the end-of-text token), so `Transformer.forward_pooled`
runs the last block for that token alone: keys and values for every token, the query, output
projection and MLP for one. Same numbers, less work.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (fp16/bf16), output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's released CLIPs were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (`in_proj_weight`, as nn.MultiheadAttention)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's defaults; `Transformer.init_weights` applies CLIP's init on top.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, heads, L, head_dim] (a view)."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x [B, L, width] -> [B, L, width]; `causal` lets token i see tokens <= i only."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def forward_query(
        self, x: torch.Tensor, query: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Attention for one query token per sample.

        x: [B, L, width] (normalised) keys/values; query: [B, width] (normalised);
        key_mask: [B, L] bool, True where the key may be attended (None: all). Returns [B, width].
        """
        b, n, d = x.shape
        w, bias = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:d], bias[:d]).view(b, self.heads, 1, d // self.heads)
        kv = F.linear(x, w[d:], bias[d:])
        k, v = kv.view(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.reshape(b, d))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LN)."""

    def __init__(self, width: int, heads: int, quick_gelu: bool, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", activation(quick_gelu)),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))

    def forward_token(
        self, x: torch.Tensor, index: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The block's output at one position per sample: x [B, L, width], index [B] -> [B, width]."""
        h = self.ln_1(x)
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, index] + self.attn.forward_query(h, h[rows, index], key_mask)
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    """A stack of `ResidualAttentionBlock`s (`resblocks.N.*`), optionally checkpointed per block."""

    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.width, self.layers, self.heads = width, layers, heads
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])
        self.grad_checkpointing = False

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x [B, L, width] -> [B, L, width] (every token through every block)."""
        for block in self.resblocks:
            x = self._run(block, x, causal)
        return x

    def forward_pooled(self, x: torch.Tensor, index: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The last block's output at position index[b] of each sample: [B, L, width] -> [B, width].

        Equal to forward(x, causal)[arange(B), index], without computing the other tokens of the
        last block.
        """
        for block in self.resblocks[:-1]:
            x = self._run(block, x, causal)
        key_mask = None
        if causal:
            key_mask = torch.arange(x.shape[1], device=x.device)[None, :] <= index[:, None]
        return self._run(self.resblocks[-1].forward_token, x, index, key_mask)

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's init: attention std width^-0.5, residual projections scaled by (2*layers)^-0.5."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
