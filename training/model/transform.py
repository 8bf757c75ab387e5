"""CLIP's evaluation image transform, split where the work is best done.

`eval_pixels` runs on the CPU where images are decoded: open_clip's eval transform up to the
normalisation (resize the shorter side to S with bicubic, longer side `int(S * long / short)`,
centre crop with rounded offsets, convert to RGB), giving uint8 [S, S, 3]. Batches travel as uint8
(4x smaller than float32) and `normalize_pixels` turns them into the encoder's input on the device.
Evaluation and the pipeline's CLIP-score filter call these two functions, so the same image gives
the same tensor in both.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .clip import image_mean_std


def eval_pixels(image: Union[Image.Image, bytes, bytearray, memoryview], size: int) -> np.ndarray:
    """uint8 [size, size, 3] (RGB) from a PIL image or encoded image bytes.

    The resize runs in the image's own mode and the RGB conversion after the crop, as open_clip's
    `Resize -> CenterCrop -> convert("RGB")` does (an RGBA image's alpha is dropped, not composited;
    a palette image is resized with nearest neighbour, PIL's rule for that mode).
    Raises ValueError for a size below 1 or an image without pixels; PIL's errors for bytes that
    are not an image.
    """
    if int(size) < 1:
        raise ValueError(f"eval_pixels: size must be a positive number of pixels, got {size!r}")
    size = int(size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"eval_pixels takes a PIL image or encoded bytes, not a {type(image).__name__}")
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError(f"image has no pixels ({w}x{h})")
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy


def pixel_scale_shift(
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    device: Union[str, torch.device, None] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32 [1, 3, 1, 1] each: `x * scale + shift` == (x / 255 - mean) / std.

    Computed in float64 and rounded once to float32. Default mean/std: `image_mean_std()` (CLIP's).
    """
    default_mean, default_std = image_mean_std()
    mean = default_mean if mean is None else mean
    std = default_std if std is None else std
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std must be 3 numbers each (std > 0), got mean={list(mean)}, std={list(std)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float64)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64)
    return (scale.float().view(1, 3, 1, 1).to(device), shift.float().view(1, 3, 1, 1).to(device))


def normalize_pixels(
    x: torch.Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    constants: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """uint8 [B, S, S, 3] (RGB, channels last) -> float32 [B, 3, S, S]: (x / 255 - mean) / std.

    Computed as one multiply and one add with `pixel_scale_shift`'s constants, on x's device: two
    elementwise kernels, each rounding once to float32, so CPU and CUDA round alike (no division,
    which CUDA turns into a reciprocal multiply when the divisor is a Python number). The result
    differs from evaluating `(x / 255 - mean) / std` literally by float32 rounding (a few 1e-7).
    The output keeps x's channels-last memory order (a permuted view, made float); callers that
    need NCHW-contiguous memory call `.contiguous()`. `constants`: `pixel_scale_shift()`'s pair,
    already on x's device (a module keeps them as buffers instead of copying them every call).
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"normalize_pixels takes uint8 [B, H, W, 3], got {x.dtype} {list(x.shape)}")
    scale, shift = constants if constants is not None else pixel_scale_shift(mean, std, x.device)
    return x.permute(0, 3, 1, 2).float() * scale + shift
