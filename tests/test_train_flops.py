"""Analytic FLOPs per sample (training/flops.py) equal torch's FLOP counter on our models, and MFU
is 3 x forward FLOPs x throughput over the peak."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.flops import clip_forward_flops, mfu, peak_flops
from training.model import create_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _counted(fn) -> float:
    # The math backend decomposes attention into matmuls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2  # two samples per batch below


@pytest.mark.parametrize("name", ["ViT-Tiny", "RN-Tiny"])
@pytest.mark.parametrize("text_tokens", [77, 24])
def test_analytic_forward_flops_match_torchs_counter(name, text_tokens):
    model = create_model(name).eval()
    size = model.image_size
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1 : text_tokens - 1], tokens[:, text_tokens - 1] = 49406, 5, 49407
    expected = clip_forward_flops(model.config, text_tokens=text_tokens)
    assert _counted(lambda: model.encode_image(torch.randn(2, 3, size, size))) == expected["image"]
    assert _counted(lambda: model.encode_text(tokens)) == expected["text"]


def test_vit_b_32_forward_is_about_thirteen_gigaflops_per_pair():
    from training.model import get_model_config

    flops = clip_forward_flops(get_model_config("ViT-B-32"))
    assert 8.0e9 < flops["image"] < 8.5e9 and 5.3e9 < flops["text"] < 5.8e9


def test_mfu_uses_three_times_the_forward_and_the_devices_peak():
    peak = peak_flops("NVIDIA H100 80GB HBM3", "amp_bf16")
    assert peak == 989e12 and peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 494.5e12
    assert mfu(1000.0, 1e10, peak, num_devices=2) == pytest.approx(3e13 / (2 * 989e12))
    assert peak_flops("Some Future GPU", "amp_bf16") is None and mfu(1.0, 1.0, None) is None
