"""Contrastive losses over the global batch: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Pure torch. In a distributed run every rank holds `B` local pairs; the features of all ranks are
all-gathered WITH gradients, and each rank computes only its own rows against the global batch
(labels offset by rank), so the logits take `B x (world_size * B)` memory, not the square of the
global batch. Each rank's loss is the mean over its own rows; averaging it over ranks (what DDP does
to gradients) gives exactly the loss of one process holding the whole batch.

Shapes: features `[B, D]`, L2-normalised by the model; `logit_scale` is exp(log-scale), a scalar
tensor (the model's `forward` returns it already exponentiated).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the learned temperature so logits stay <= 100 x cos
LOSSES = ("clip", "siglip")


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# One formulation on every backend (gloo, NCCL): the single-tensor collectives. torch 2.13 renamed
# all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names warn); older torch has
# only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the sum of every rank's gradient for
    its own slice (a reduce-scatter). The same calls run on gloo and NCCL, so the CPU tests check
    the code that runs on GPUs."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        local = local.contiguous()
        ctx.rows = local.shape[0]
        out = local.new_empty((dist.get_world_size() * local.shape[0], *local.shape[1:]))
        _all_gather_single(out, local)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous())
        return out


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each rank -> [world_size * B, ...] (rank order); gradients flow back to every rank.

    Every rank must pass the same B (ragged batches would misalign the label offsets).
    """
    _, world = _world()
    if world == 1:
        return local
    return _GatherWithGrad.apply(local)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    distributed: Optional[bool] = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE for this rank's rows.

    logits = logit_scale * image @ text^T over the global batch; cross-entropy of each local image
    against all texts and of each local text against all images, averaged over both directions.
    image_features, text_features: [B, D] normalised; logit_scale: scalar (already exponentiated).
    distributed: gather across ranks (default: whenever a process group of size > 1 exists).
    Returns a scalar: the mean over this rank's B rows (float32).
    """
    _check_pairs(image_features, text_features)
    rank, world = _world()
    if distributed is False:
        rank, world = 0, 1
    image_features, text_features = image_features.float(), text_features.float()
    scale = logit_scale.float()
    if world > 1:
        all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    else:
        all_images, all_texts = image_features, text_features
    rows = image_features.shape[0]
    labels = torch.arange(rows, device=image_features.device) + rank * rows
    logits_per_image = scale * image_features @ all_texts.T  # [B, world*B]
    logits_per_text = scale * text_features @ all_images.T  # [B, world*B]
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    distributed: Optional[bool] = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss for this rank's images against all texts of the global batch.

    logits = logit_scale * image @ text^T + logit_bias; label +1 on the matching pair, -1 elsewhere;
    loss = -sum log sigmoid(label * logit) / B. Averaged over ranks it equals the single-process
    loss on the whole batch (sum over all pairs / global batch).
    """
    _check_pairs(image_features, text_features)
    rank, world = _world()
    if distributed is False:
        rank, world = 0, 1
    image_features, text_features = image_features.float(), text_features.float()
    all_texts = gather_with_grad(text_features) if world > 1 else text_features
    rows = image_features.shape[0]
    logits = logit_scale.float() * image_features @ all_texts.T + logit_bias.float()
    signs = -torch.ones_like(logits)
    idx = torch.arange(rows, device=logits.device)
    signs[idx, idx + rank * rows] = 1.0
    return -F.logsigmoid(signs * logits).sum() / rows


def contrastive_loss(
    kind: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor] = None,
    *,
    distributed: Optional[bool] = None,
) -> torch.Tensor:
    """Dispatch on `kind` ("clip" or "siglip", the `train.loss` key)."""
    if kind == "clip":
        return clip_loss(image_features, text_features, logit_scale, distributed=distributed)
    if kind == "siglip":
        if logit_bias is None:
            raise ValueError("the siglip loss needs logit_bias (a learned scalar, SigLIP starts it at -10)")
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, distributed=distributed)
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")


@torch.no_grad()
def clamp_logit_scale_(logit_scale: torch.nn.Parameter, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Clamp the log-space temperature parameter in place to [0, ln(100)] (after every optimizer step)."""
    logit_scale.clamp_(0.0, max_value)


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            f"features must be [B, D]; got image {tuple(image_features.shape)}, text {tuple(text_features.shape)}"
        )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must pair up row by row; got image "
            f"{tuple(image_features.shape)} vs text {tuple(text_features.shape)}"
        )
