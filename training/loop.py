"""The training core in plain torch: optimizer groups, LR schedule, precision, one step, exact
gradient accumulation for a contrastive loss, and the full model and optimizer state dicts (under
FSDP gathered from the shards) that `training.trainer_state` writes into checkpoints.

Runs without Ray (the GPU benchmark uses it bare); distributed when a torch.distributed process
group exists (Ray Train creates it). Nothing here imports ray, pyarrow or pydantic.

One optimizer step = one global batch. With `micro_batch_size` smaller than the local batch the step
is GradCache-style exact accumulation:
  1. embed every micro-batch without gradients (features cached, RNG state per micro-batch saved),
  2. compute the loss of the whole global batch on the cached features (gathered across ranks) and
     its gradient with respect to each local feature, the temperature and the SigLIP bias,
  3. recompute each micro-batch with gradients (same RNG state) and back-propagate the cached
     feature gradients through it (DDP `no_sync` until the last micro-batch).
The parameter gradient is then exactly that of one big batch, and the logits never take more than
`local_batch x global_batch` memory.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from training.loss import LOSSES, clamp_logit_scale_, contrastive_loss

PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")
STRATEGIES = ("ddp", "fsdp")
SIGLIP_BIAS_INIT = -10.0


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class LoopSettings:
    """What one optimizer step needs to know. `TrainConfig` carries the same names (see
    `from_train_config`); batch sizes here are per rank."""

    total_steps: int
    lr: float = 5e-4
    warmup: int = 2000
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: Optional[float] = None
    precision: str = "fp32"
    loss: str = "clip"
    micro_batch_size: Optional[int] = None
    compile: Union[bool, str] = False  # False, True (torch.compile's default mode) or a torch.compile mode
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile {self.compile!r}: expected true, false or one of {', '.join(COMPILE_MODES)}")

    @classmethod
    def from_train_config(cls, train: Any, total_steps: int) -> "LoopSettings":
        """From a `training.config.TrainConfig` (duck-typed, so this module needs no pydantic)."""
        return cls(
            total_steps=total_steps,
            lr=train.lr,
            warmup=train.warmup,
            weight_decay=train.weight_decay,
            betas=(train.beta1, train.beta2),
            eps=train.eps,
            grad_clip=train.grad_clip,
            precision=train.precision,
            loss=train.loss,
            micro_batch_size=train.micro_batch_size,
            compile=train.compile,
            strategy=train.strategy,
        )


class WarmupCosine:
    """LR multiplier at 0-based step s: linear warmup to 1 over `warmup` steps, then a cosine to 0
    at `total_steps`. A class (not a lambda) so LambdaLR can save it in its state dict."""

    def __init__(self, warmup: int, total_steps: int):
        self.warmup, self.total_steps = int(warmup), int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and conv kernels only; none on gains, biases,
    embeddings (token, positional, class) or the temperature / SigLIP bias."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or "logit_" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ContrastiveModel(nn.Module):
    """What DDP/FSDP wrap: the CLIP, on-device image normalisation, and the loss's own parameter
    (SigLIP's `logit_bias`). forward(images uint8 [B, H, W, 3], tokens [B, L] int) ->
    (image features [B, D], text features [B, D], exp(logit_scale), logit_bias or None)."""

    def __init__(self, clip: nn.Module, loss: str = "clip"):
        super().__init__()
        from training.model import pixel_scale_shift

        self.clip = clip
        scale, shift = pixel_scale_shift()  # the eval transform's constants: one normalisation everywhere
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT)) if loss == "siglip" else None

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or float [B, 3, H, W], passed through) -> normalised float [B, 3, H, W]."""
        from training.model import normalize_pixels

        if images.dtype != torch.uint8:
            return images
        return normalize_pixels(images, constants=(self.pixel_scale, self.pixel_shift))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features, text_features, scale = self.clip(self.normalise(images), tokens.long())
        bias = None if self.logit_bias is None else self.logit_bias * 1.0
        return image_features, text_features, scale, bias


@dataclass
class StepResult:
    """Tensors stay on the device (no sync); call `.item()` only when logging."""

    loss: torch.Tensor
    lr: float
    logit_scale: torch.Tensor
    grad_norm: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainLoop:
    """Owns the wrapped model, optimizer, scheduler and grad scaler; `step(images, tokens)` does one
    optimizer step on this rank's part of the global batch.

    clip: a `training.model.CLIP` (on any device; moved to `device`). images: uint8 [B, H, W, 3];
    tokens: int [B, L]; B = the local batch (global batch / world size) on every rank.
    """

    def __init__(self, clip: nn.Module, settings: LoopSettings, device: torch.device | str = "cpu"):
        self.settings = settings
        self.device = torch.device(device)
        self.rank, self.world_size = _world()
        self.module = ContrastiveModel(clip, settings.loss).to(self.device)
        self.learn_temperature = bool(self.module.clip.logit_scale.requires_grad)
        self.fsdp = settings.strategy == "fsdp" and self.world_size > 1
        self._replicated = [p for p in self.module.parameters() if p.ndim == 0] if self.fsdp else []
        self.wrapped = self._wrap(self.module)
        self._grads_in_buckets = isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        if self._grads_in_buckets:
            # DDP keeps the gradients as views into its all-reduce buckets (`_wrap`). Made here with
            # the parameters' own layout, and zeroed rather than freed after each step, they stay
            # those views: no copy per step, and no stride mismatch with a bucket when a CPU kernel
            # hands back a 1x1 convolution's gradient in channels-last strides.
            for param in self.module.parameters():
                if param.requires_grad:
                    param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
        if settings.compile:
            mode = None if settings.compile is True else settings.compile
            self.forward_module = torch.compile(self.wrapped, mode=mode)
        else:
            self.forward_module = self.wrapped
        fused = self.device.type == "cuda" and not self.fsdp
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.module, settings.weight_decay),
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
            **({"fused": True} if fused else {}),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(settings.warmup, settings.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "amp_fp16")
        self.step_count = 0
        self.samples_seen = 0
        self._batchnorms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # ----------------------------------------------------------------------------- setup
    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return module
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            for sub in module.modules():
                # Shard per residual block (ViT/text blocks, ResNet bottlenecks), then the rest.
                if type(sub).__name__ in ("ResidualAttentionBlock", "Bottleneck"):
                    fully_shard(sub)
                    if hasattr(sub, "forward_token"):  # the pooled last block runs this, not forward
                        register_fsdp_forward_method(sub, "forward_token")
            # FSDP cannot shard 0-d parameters (temperature, SigLIP bias): they stay replicated and
            # their gradients are averaged by hand (`_sync_replicated_grads`).
            fully_shard(module, ignored_params=set(self._replicated))
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)

    def autocast(self):
        if self.settings.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "amp_bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @contextmanager
    def _no_sync(self, last: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on every micro-batch but the last."""
        if last or self.world_size == 1:
            yield
        elif self.fsdp:
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)
        else:
            with self.wrapped.no_sync():
                yield

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ----------------------------------------------------------------------------- step
    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> StepResult:
        """One optimizer step. images uint8 [B, H, W, 3], tokens [B, L]; B = local batch."""
        lr = self.lr
        loss = self.compute_gradients(images, tokens)
        grad_norm = self.apply_gradients()
        self.samples_seen += images.shape[0] * self.world_size
        return StepResult(loss=loss, lr=lr, logit_scale=self.module.clip.logit_scale.detach(), grad_norm=grad_norm)

    def compute_gradients(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Forward + backward of this rank's part of the global batch; gradients land in `.grad`
        (averaged over ranks). Returns the loss (detached, on the device)."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and tokens ({tokens.shape[0]}) differ in batch size")
        images = images.to(self.device, non_blocking=True)
        tokens = tokens.to(self.device, non_blocking=True)
        self.module.train()
        micro = self.settings.micro_batch_size
        batch = images.shape[0]
        if micro is None or micro >= batch:
            loss = self._step_direct(images, tokens).detach()
        elif batch % micro:
            raise ValueError(f"micro_batch_size {micro} does not divide the local batch {batch}")
        else:
            loss = self._step_accumulated(images, tokens, micro)
        self._sync_replicated_grads()
        return loss

    def _sync_replicated_grads(self) -> None:
        """Average the gradients of the parameters FSDP leaves replicated (0-d ones) over ranks."""
        for param in self._replicated:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(self.world_size)

    def apply_gradients(self) -> Optional[torch.Tensor]:
        """Clip, optimizer step (through the grad scaler), schedule step, temperature clamp.
        Returns the gradient norm before clipping when `grad_clip` is set."""
        grad_norm = None
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.grad_clip).detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=not self._grads_in_buckets)
        self.scheduler.step()
        clamp_logit_scale_(self.module.clip.logit_scale)
        self.step_count += 1
        return grad_norm

    def _step_direct(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            image_features, text_features, scale, bias = self.forward_module(images, tokens)
        loss = contrastive_loss(self.settings.loss, image_features, text_features, scale, bias)
        self.scaler.scale(loss).backward()
        return loss

    def _step_accumulated(self, images: torch.Tensor, tokens: torch.Tensor, micro: int) -> torch.Tensor:
        chunks = list(zip(images.split(micro), tokens.split(micro)))
        # 1. features of every micro-batch without graph; batch-norm running stats restored after,
        #    so only the recompute pass below updates them (once per micro-batch, as without caching).
        saved_stats = [
            (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in self._batchnorms
            if m.running_mean is not None
        ]
        rng_states, image_parts, text_parts = [], [], []
        with torch.no_grad():
            for chunk_images, chunk_tokens in chunks:
                rng_states.append(self._rng_state())
                with self.autocast():
                    image_f, text_f, _, _ = self.forward_module(chunk_images, chunk_tokens)
                image_parts.append(image_f.float())
                text_parts.append(text_f.float())
        for m, (mean, var, count) in zip([m for m in self._batchnorms if m.running_mean is not None], saved_stats):
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)

        # 2. the global-batch loss on cached features, and its gradient w.r.t. those features.
        image_features = torch.cat(image_parts).requires_grad_(True)
        text_features = torch.cat(text_parts).requires_grad_(True)
        scale = self.module.clip.logit_scale.detach().exp().requires_grad_(self.learn_temperature)
        bias = None
        if self.module.logit_bias is not None:
            bias = self.module.logit_bias.detach().clone().requires_grad_(True)
        loss = contrastive_loss(self.settings.loss, image_features, text_features, scale, bias)
        leaves = [image_features, text_features] + [t for t in (scale, bias) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(loss, leaves)
        image_grads, text_grads = grads[0].split(micro), grads[1].split(micro)
        rest = list(grads[2:])
        scale_grad = rest.pop(0) if scale.requires_grad else None
        bias_grad = rest.pop(0) if bias is not None else None

        # 3. recompute each micro-batch with a graph and push the cached gradients through it.
        n = len(chunks)
        for j, (chunk_images, chunk_tokens) in enumerate(chunks):
            with self._no_sync(last=j == n - 1):
                self._set_rng_state(rng_states[j])
                with self.autocast():
                    image_f, text_f, scale_j, bias_j = self.forward_module(chunk_images, chunk_tokens)
                surrogate = (image_f.float() * image_grads[j]).sum() + (text_f.float() * text_grads[j]).sum()
                # The temperature's and bias's gradients are split over the micro-batches so every
                # backward touches every parameter (DDP expects that) and they still sum up exactly.
                if scale_grad is not None:
                    surrogate = surrogate + scale_j.float() * (scale_grad / n)
                if bias_grad is not None:
                    surrogate = surrogate + bias_j.float() * (bias_grad / n)
                self.scaler.scale(surrogate).backward()
        return loss.detach()

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    # ----------------------------------------------------------------------------- state
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full CLIP state dict on CPU (gathered from shards under FSDP; every rank must call)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k[len("clip.") :]: v for k, v in full.items() if k.startswith("clip.")}
        return {k: v.detach().cpu() for k, v in self.module.clip.state_dict().items()}

    def optimizer_state_dict(self) -> dict:
        """The optimizer's state dict: parameters numbered 0..n-1 in group order, or under FSDP the
        full (gathered, on CPU, on rank 0 only) state keyed by parameter name (every rank must call)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.module, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer.state_dict()
