"""The pure-torch training core: schedule, weight-decay groups, exact gradient accumulation (one
process against one big batch; 4 gloo ranks under DDP and FSDP: tests/test_four_ranks.py), a ResNet
under DDP on 2 ranks, and precision modes. Checkpoint round trips: tests/test_trainer_state.py."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from tests.support.gloo import run_ranks
from training.loop import LoopSettings, TrainLoop, WarmupCosine, parameter_groups
from training.loss import LOGIT_SCALE_MAX
from training.model import create_model

EOT = 49407


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_clip(**kw):
    torch.manual_seed(0)
    return create_model("ViT-Tiny", **kw)


def batch(n: int, seed: int = 0, size: int = 64, length: int = 16):
    """uint8 images [n, size, size, 3] and tokens [n, length] ending in end-of-text."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(3, length, (1,), generator=g))
        tokens[i, 0] = 49406
        tokens[i, 1:k] = torch.randint(1, 1000, (k - 1,), generator=g)
        tokens[i, k] = EOT
    return images, tokens


def grads_of(loop: TrainLoop) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in loop.module.named_parameters() if p.grad is not None}


def test_warmup_is_linear_then_cosine_reaches_zero_at_the_last_step():
    f = WarmupCosine(warmup=4, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(0, 10)(0) == 1.0


def test_no_weight_decay_on_gains_biases_embeddings_and_temperature():
    loop = TrainLoop(tiny_clip(), LoopSettings(total_steps=10, loss="siglip"))
    names = {id(p): n for n, p in loop.module.named_parameters()}
    decay, no_decay = parameter_groups(loop.module, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for expected in (
        "clip.logit_scale",
        "logit_bias",
        "clip.token_embedding.weight",
        "clip.positional_embedding",
        "clip.visual.class_embedding",
        "clip.visual.positional_embedding",
        "clip.ln_final.weight",
        "clip.transformer.resblocks.0.attn.in_proj_bias",
    ):
        assert expected in no_decay_names
    for expected in (
        "clip.text_projection",
        "clip.visual.proj",
        "clip.visual.conv1.weight",
        "clip.transformer.resblocks.0.mlp.c_fc.weight",
    ):
        assert expected in decay_names
    assert not decay_names & no_decay_names


def test_learning_rate_follows_the_schedule_and_temperature_is_clamped():
    clip = tiny_clip()
    with torch.no_grad():
        clip.logit_scale.fill_(LOGIT_SCALE_MAX - 1e-6)
    loop = TrainLoop(clip, LoopSettings(total_steps=6, lr=1e-2, warmup=2))
    images, tokens = batch(4)
    lrs = [loop.step(images, tokens).lr for _ in range(4)]
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi * 1 / 4))])
    assert loop.module.clip.logit_scale.item() <= LOGIT_SCALE_MAX
    assert loop.step_count == 4 and loop.samples_seen == 16


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulated_gradients_equal_one_big_batch_in_one_process(loss):
    images, tokens = batch(8)
    big = TrainLoop(tiny_clip(), LoopSettings(total_steps=10, loss=loss))
    big_loss = big.compute_gradients(images, tokens)
    acc = TrainLoop(tiny_clip(), LoopSettings(total_steps=10, loss=loss, micro_batch_size=2))
    acc_loss = acc.compute_gradients(images, tokens)
    assert acc_loss.item() == pytest.approx(big_loss.item(), abs=1e-5)
    expected, got = grads_of(big), grads_of(acc)
    assert expected.keys() == got.keys() and "clip.logit_scale" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_accumulation_replays_each_micro_batch_with_its_own_random_state():
    # With patch dropout the recompute pass must draw the same patches as the caching pass:
    # the result equals running every micro-batch with a graph at once (same RNG sequence).
    images, tokens = batch(6, seed=3)
    torch.manual_seed(123)
    acc = TrainLoop(tiny_clip(patch_dropout=0.5), LoopSettings(total_steps=10, micro_batch_size=2))
    torch.manual_seed(7)
    acc.compute_gradients(images, tokens)

    naive = TrainLoop(tiny_clip(patch_dropout=0.5), LoopSettings(total_steps=10))
    torch.manual_seed(7)
    outs = [naive.module(i, t) for i, t in zip(images.split(2), tokens.split(2))]
    from training.loss import clip_loss

    loss = clip_loss(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    loss.backward()
    for name, g in grads_of(naive).items():
        torch.testing.assert_close(grads_of(acc)[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_batchnorm_running_stats_are_updated_once_per_micro_batch():
    torch.manual_seed(0)
    images, tokens = batch(4, seed=1)
    acc = TrainLoop(create_model("RN-Tiny"), LoopSettings(total_steps=10, micro_batch_size=2))
    acc.compute_gradients(images, tokens)
    counts = {int(m.num_batches_tracked) for m in acc._batchnorms}
    assert counts == {2}


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_steps_train_and_keep_float32_weights(precision):
    loop = TrainLoop(tiny_clip(), LoopSettings(total_steps=20, lr=1e-3, warmup=0, precision=precision, grad_clip=1.0))
    images, tokens = batch(8)
    first = loop.step(images, tokens)
    for _ in range(5):
        last = loop.step(images, tokens)
    assert torch.isfinite(last.loss) and last.loss.item() < first.loss.item()
    assert last.grad_norm is not None and torch.isfinite(last.grad_norm)
    assert all(p.dtype == torch.float32 for p in loop.module.parameters())
    assert loop.scaler.is_enabled() == (precision == "amp_fp16")


def test_fixed_temperature_is_not_learned():
    loop = TrainLoop(tiny_clip(temperature_init=0.05, learn_temperature=False), LoopSettings(total_steps=5, lr=1e-2))
    images, tokens = batch(4)
    loop.step(images, tokens)
    assert loop.module.clip.logit_scale.item() == pytest.approx(math.log(20.0))


def test_micro_batch_that_does_not_divide_the_batch_is_refused():
    loop = TrainLoop(tiny_clip(), LoopSettings(total_steps=3, micro_batch_size=3))
    with pytest.raises(ValueError, match="micro_batch_size 3 does not divide the local batch 4"):
        loop.step(*batch(4))


# --------------------------------------------------------------------------- two ranks on gloo
WORLD = 2


def _rank_work(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A ResNet under DDP for two whole steps: the warnings raised, and the weights it ends with.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        loop = TrainLoop(create_model("RN-Tiny"), LoopSettings(total_steps=10, warmup=0, lr=1e-3))
        for step in range(2):  # local batch 64: the size at which the CPU kernels pick channels-last
            images, tokens = batch(128, seed=step)
            loop.step(images[rank * 64 : (rank + 1) * 64], tokens[rank * 64 : (rank + 1) * 64])
    torch.save(
        {
            "warnings": [str(w.message) for w in caught],
            "params": {n: p.detach().clone() for n, p in loop.module.named_parameters()},
        },
        os.path.join(out_dir, f"resnet-rank{rank}.pt"),
    )


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop-two-ranks")
    run_ranks(_rank_work, WORLD, out)
    return out


def test_resnet_under_ddp_steps_without_layout_warnings_and_ranks_stay_identical(two_rank_results):
    ranks = [torch.load(two_rank_results / f"resnet-rank{r}.pt") for r in range(WORLD)]
    for r in ranks:
        assert not [w for w in r["warnings"] if "strides" in w], r["warnings"]
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0, msg=name)
    torch.manual_seed(0)
    start = create_model("RN-Tiny")  # the weights both ranks began with: two steps moved them
    assert any(not torch.equal(ranks[0]["params"][f"clip.{n}"], p) for n, p in start.named_parameters())


@pytest.mark.parametrize(
    "compile_setting, mode", [(True, None), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")]
)
def test_the_compile_setting_reaches_torch_compile(monkeypatch, compile_setting, mode):
    seen = {}

    def fake_compile(module, **kwargs):
        seen.update(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    TrainLoop(tiny_clip(), LoopSettings(total_steps=2, compile=compile_setting))
    assert seen == {"mode": mode}
    with pytest.raises(ValueError, match="compile 'fast'"):
        LoopSettings(total_steps=2, compile="fast")
