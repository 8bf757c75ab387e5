"""Forward FLOPs of one (image, caption) pair, counted analytically from the model config, and
model FLOPs utilisation (MFU).

Counted: every matrix multiply and convolution (2 FLOPs per multiply-add), including attention's
two batched products; not counted: norms, activations, softmax, pooling (a few percent). The count
follows what our model executes (`training/model`): the last transformer block of each tower runs
for its one pooled token only, and the text tower runs `text_tokens` positions (CLIP's 77 unless
trimmed). A training step costs 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

from typing import Optional

# Dense peak tensor throughput per device, FLOP/s, by precision. Datasheet numbers (no sparsity).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12},  # SXM
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12},
}


def _block(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """A pre-LN transformer block over `tokens` tokens: QKV, scores, weighted sum, out proj, MLP."""
    hidden = width * mlp_ratio
    return (
        2 * tokens * width * 3 * width
        + 4 * tokens * tokens * width
        + 2 * tokens * width * width
        + 4 * tokens * width * hidden
    )


def _pooled_block(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """The last block for one query token: K/V for all tokens, the rest for one."""
    hidden = width * mlp_ratio
    return (
        2 * tokens * width * 2 * width + 2 * width * width + 4 * tokens * width + 2 * width * width + 4 * width * hidden
    )


def _tower(tokens: int, width: int, layers: int) -> float:
    return (layers - 1) * _block(tokens, width) + _pooled_block(tokens, width)


def vit_flops(image_size: int, patch_size: int, width: int, layers: int, embed_dim: int) -> float:
    grid = image_size // patch_size
    patches = grid * grid
    return (
        2 * 3 * patch_size * patch_size * width * patches + _tower(patches + 1, width, layers) + 2 * width * embed_dim
    )


def resnet_flops(image_size: int, layers: tuple[int, ...], width: int, embed_dim: int) -> float:
    half = width // 2
    side = image_size // 2
    total = 2 * 9 * side * side * (3 * half + half * half + half * width)  # the 3-conv stem
    side //= 2  # stem average pool
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            out_side = side // stride
            total += 2 * inplanes * planes * side * side + 2 * 9 * planes * planes * side * side
            total += 2 * planes * 4 * planes * out_side * out_side
            if stride > 1 or inplanes != 4 * planes:
                total += 2 * inplanes * 4 * planes * out_side * out_side
            inplanes, side = 4 * planes, out_side
    channels, tokens = width * 32, side * side + 1
    total += 2 * 2 * tokens * channels * channels + 2 * channels * channels  # k, v for all; q for one
    total += 4 * tokens * channels + 2 * channels * embed_dim  # attention for one query; c_proj
    return total


def clip_forward_flops(config: dict, text_tokens: Optional[int] = None) -> dict[str, float]:
    """{"image", "text", "total"}: forward FLOPs per sample for an open_clip-layout config."""
    v, t = config["vision_cfg"], config["text_cfg"]
    embed = config["embed_dim"]
    if isinstance(v["layers"], (list, tuple)):
        image = resnet_flops(v["image_size"], tuple(v["layers"]), v["width"], embed)
    else:
        image = vit_flops(v["image_size"], v["patch_size"], v["width"], v["layers"], embed)
    tokens = t["context_length"] if text_tokens is None else text_tokens
    text = _tower(tokens, t["width"], t["layers"]) + 2 * t["width"] * embed
    return {"image": float(image), "text": float(text), "total": float(image + text)}


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Datasheet dense peak of one device for the precision the step runs at, or None if unknown."""
    kind = {"amp_bf16": "bf16", "amp_fp16": "fp16", "fp32": "tf32"}[precision]
    for name, table in PEAK_FLOPS.items():
        if name in device_name.upper():
            return table[kind]
    return None


def mfu(
    samples_per_s: float, forward_flops_per_sample: float, peak_per_device: Optional[float], num_devices: int = 1
) -> Optional[float]:
    """Model FLOPs utilisation: 3 x forward FLOPs x samples/s over the devices' peak."""
    if not peak_per_device:
        return None
    return 3.0 * forward_flops_per_sample * samples_per_s / (peak_per_device * num_devices)
