"""The contrastive losses: definitions checked by hand, and the distributed version (2 ranks on gloo)
equal to one process holding the concatenated batch, loss and gradients, to 1e-5."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.gloo import run_ranks
from training.loss import LOGIT_SCALE_MAX, clamp_logit_scale_, clip_loss, contrastive_loss, siglip_loss

WORLD = 2
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


# --------------------------------------------------------------------------- two ranks on gloo
class Towers(nn.Module):
    """Two linear 'encoders' and a learned temperature: enough to check the gradient plumbing."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(10, DIM)
        self.text = nn.Linear(6, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # DDP needs every parameter used: the bias only exists for SigLIP.
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if kind == "siglip" else None

    def forward(self, x, t):
        bias = None if self.logit_bias is None else self.logit_bias * 1.0
        return (F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.logit_scale.exp(), bias)


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)


def _rank_work(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    for kind in ("clip", "siglip"):
        x, t = _inputs()
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        # Features as leaves: the gradient each rank gets back for its own rows.
        img, txt = _features(9)
        img = img[local].float().clone().requires_grad_(True)
        txt = txt[local].float().clone().requires_grad_(True)
        scale, bias = torch.tensor(14.0), torch.tensor(-5.0)
        feature_loss = contrastive_loss(kind, img, txt, scale, bias)
        feature_loss.backward()
        # A DDP model: parameter gradients after DDP's averaging.
        model = nn.parallel.DistributedDataParallel(Towers(kind))
        out = model(x[local], t[local])
        loss = contrastive_loss(kind, *out)
        loss.backward()
        torch.save(
            {
                "feature_loss": feature_loss.detach(),
                "img_grad": img.grad,
                "txt_grad": txt.grad,
                "loss": loss.detach(),
                "grads": {n: p.grad for n, p in model.module.named_parameters()},
            },
            os.path.join(out_dir, f"{kind}-rank{rank}.pt"),
        )


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    run_ranks(_rank_work, WORLD, out)
    return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_gloo_ranks_give_the_loss_and_gradients_of_the_concatenated_batch(kind, two_rank_results):
    ranks = [torch.load(two_rank_results / f"{kind}-rank{r}.pt") for r in range(WORLD)]

    # Reference: one process, the whole batch.
    img, txt = _features(9)
    img, txt = img.float().requires_grad_(True), txt.float().requires_grad_(True)
    ref = contrastive_loss(kind, img, txt, torch.tensor(14.0), torch.tensor(-5.0))
    ref.backward()
    mean_loss = sum(r["feature_loss"] for r in ranks) / WORLD
    assert mean_loss.item() == pytest.approx(ref.item(), abs=1e-5)
    # Each rank's feature gradient sums every rank's loss; DDP's averaging divides by WORLD.
    got_img = torch.cat([r["img_grad"] for r in ranks]) / WORLD
    got_txt = torch.cat([r["txt_grad"] for r in ranks]) / WORLD
    torch.testing.assert_close(got_img, img.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_txt, txt.grad, atol=1e-5, rtol=0)

    model = Towers(kind)
    x, t = _inputs()
    loss = contrastive_loss(kind, *model(x, t))
    loss.backward()
    assert (sum(r["loss"] for r in ranks) / WORLD).item() == pytest.approx(loss.item(), abs=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-5, rtol=0, msg=f"{kind}: {name}")
    # A gradient that is not trivially zero everywhere (the test could not fail otherwise).
    assert model.image.weight.grad.abs().max() > 1e-4
