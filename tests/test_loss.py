"""The contrastive losses: definitions checked by hand. The distributed version (4 gloo ranks equal to
one process holding the concatenated batch): tests/test_four_ranks.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.loss import LOGIT_SCALE_MAX, clamp_logit_scale_, clip_loss, contrastive_loss, siglip_loss

GLOBAL_BATCH = 12
DIM = 16


def _features(seed: int, n: int = GLOBAL_BATCH, d: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
        F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
    )


def test_clip_loss_is_the_mean_of_both_cross_entropies_written_out():
    images, texts = _features(0, n=5)
    scale = torch.tensor(7.0, dtype=torch.float64)
    expected = 0.0
    for i in range(5):
        row = [scale * images[i] @ texts[j] for j in range(5)]
        col = [scale * texts[i] @ images[j] for j in range(5)]
        expected += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        expected += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    expected /= 2 * 5
    got = clip_loss(images, texts, scale)
    assert got.item() == pytest.approx(float(expected), rel=1e-6)


def test_siglip_loss_sums_every_pair_over_the_batch():
    images, texts = _features(1, n=4)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    expected = 0.0
    for i in range(4):
        for j in range(4):
            z = float(scale * images[i] @ texts[j] + bias)
            label = 1.0 if i == j else -1.0
            expected += -math.log(1.0 / (1.0 + math.exp(-label * z)))
    got = siglip_loss(images, texts, scale, bias)
    assert got.item() == pytest.approx(expected / 4, rel=1e-5)


def test_perfectly_aligned_pairs_have_lower_clip_loss_than_shuffled_ones():
    images, _ = _features(2)
    scale = torch.tensor(50.0)
    aligned = clip_loss(images.float(), images.float(), scale)
    shuffled = clip_loss(images.float(), images.flip(0).float(), scale)
    assert aligned.item() < 0.05 < shuffled.item()


def test_clamp_keeps_logit_scale_within_zero_and_ln_100():
    p = nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p)
    assert p.item() == pytest.approx(LOGIT_SCALE_MAX)
    p.data.fill_(-1.0)
    clamp_logit_scale_(p)
    assert p.item() == 0.0


def test_bad_shapes_and_unknown_loss_are_refused_with_a_message():
    a, b = _features(3, n=4)
    with pytest.raises(ValueError, match="pair up row by row"):
        clip_loss(a, b[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown loss 'infonce'"):
        contrastive_loss("infonce", a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs logit_bias"):
        contrastive_loss("siglip", a, b, torch.tensor(1.0))
