"""Locked towers (LiT, train.lock_image / train.lock_text): what is frozen, what the optimizer gets,
what a step changes, BatchNorm statistics, and a resume of a locked run."""

from __future__ import annotations

import pytest
import torch

from tests.test_loop import batch
from training.loop import LoopSettings, TrainLoop
from training.model import create_model
from training.model.lock import FrozenBatchNorm2d, image_groups, lock_image_tower, lock_text_tower, text_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
SMALL_RN = {**SMALL_VIT, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}}


def _model(cfg):
    torch.manual_seed(0)
    return create_model(cfg)


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def _steps(loop: TrainLoop, n: int = 2) -> None:
    for i in range(n):
        loop.step(*batch(4, seed=i, size=32, length=16))


def test_locks_freeze_all_but_the_last_groups_in_open_clips_grouping():
    clip = _model(SMALL_VIT)
    lock_image_tower(clip, unlocked_groups=2)  # [last block, ln_post] and [proj]
    lock_text_tower(clip, unlocked_layers=1)  # [text_projection]
    trainable = _trainable(clip)
    assert {n for n in trainable if n.startswith("visual.")} == {
        n for n, _ in clip.named_parameters() if n.startswith(("visual.transformer.resblocks.2.", "visual.ln_post"))
    } | {"visual.proj"}
    assert {n for n in trainable if not n.startswith("visual.")} == {"text_projection", "logit_scale"}
    assert len(image_groups(clip.visual)) == 3 + 2 and len(text_groups(clip)) == 3 + 2
    with pytest.raises(ValueError, match=r"train.lock_text_unlocked_layers\) must be an integer from 0 to 5"):
        lock_text_tower(clip, unlocked_layers=6)


def test_optimizer_gets_only_trainable_parameters_and_steps_change_only_them():
    clip = _model(SMALL_VIT)
    lock_image_tower(clip)  # the whole image tower
    lock_text_tower(clip, unlocked_layers=2)  # last block + ln_final, text_projection
    loop = TrainLoop(clip, LoopSettings(total_steps=4, lr=1e-2, warmup=0))
    in_optimizer = {id(p) for group in loop.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in loop.module.parameters() if p.requires_grad}
    before = {n: t.clone() for n, t in clip.state_dict().items()}
    _steps(loop)
    trainable = _trainable(clip)
    assert trainable  # the test would prove nothing otherwise
    for name, value in clip.state_dict().items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"{name} is unlocked but did not change"
        else:
            assert torch.equal(value, before[name]), f"{name} is locked but changed"


@pytest.mark.parametrize("freeze", [True, False])
def test_locked_resnet_batchnorm_statistics_freeze_only_when_asked(freeze):
    clip = _model(SMALL_RN)
    lock_image_tower(clip, unlocked_groups=1, freeze_bn_stats=freeze)  # attnpool trains
    stats = {n: t.clone() for n, t in clip.state_dict().items() if "running_" in n}
    assert isinstance(clip.visual.bn1, FrozenBatchNorm2d) is freeze
    _steps(TrainLoop(clip, LoopSettings(total_steps=4, lr=1e-2, warmup=0)))
    unchanged = [torch.equal(clip.state_dict()[n], t) for n, t in stats.items()]
    assert all(unchanged) if freeze else not any(unchanged)
    if freeze:  # in training mode too, a frozen tower computes its evaluation features
        images = torch.randn(2, 3, 32, 32)
        clip.train()
        train_features = clip.encode_image(images)
        clip.eval()
        assert torch.equal(train_features, clip.encode_image(images))
        assert list(clip.state_dict()) == list(_model(SMALL_RN).state_dict())  # same checkpoint keys


def test_a_locked_run_resumes_with_its_optimizer_state(tmp_path):
    from training.trainer_state import load_checkpoint, save_checkpoint

    def locked_loop():
        clip = _model(SMALL_VIT)
        lock_image_tower(clip, unlocked_groups=1)
        lock_text_tower(clip)
        return TrainLoop(clip, LoopSettings(total_steps=6, lr=1e-2, warmup=0))

    straight = locked_loop()
    _steps(straight, 3)
    first = locked_loop()
    _steps(first, 2)
    save_checkpoint(first, tmp_path / "ckpt")
    resumed = locked_loop()
    load_checkpoint(resumed, tmp_path / "ckpt")
    resumed.step(*batch(4, seed=2, size=32, length=16))
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_unlocked_counts_need_their_lock_and_fit_the_tower():
    from training.config import TrainConfig
    from training.driver import check_locks
    from training.model.config import resolve_config

    with pytest.raises(ValueError, match="train.lock_image_unlocked_groups is set but train.lock_image is not"):
        TrainConfig(lock_image_unlocked_groups=2)
    train = TrainConfig(lock_image=True, lock_image_unlocked_groups=7)
    with pytest.raises(ValueError, match="train.lock_image_unlocked_groups 7 is more than the tower's 6 groups"):
        check_locks(resolve_config("RN-Tiny"), train)
    both = TrainConfig(lock_image=True, lock_text=True, learn_temperature=False)
    with pytest.raises(ValueError, match="nothing would train"):
        check_locks(resolve_config("ViT-Tiny"), both)


def _locked_ranks(rank: int, out_dir: str) -> None:
    """One rank: a locked model, two steps under DDP then FSDP; the full state dicts saved."""
    import os

    for strategy in ("ddp", "fsdp"):
        clip = _model(SMALL_VIT)
        lock_image_tower(clip, unlocked_groups=1)
        lock_text_tower(clip)
        loop = TrainLoop(clip, LoopSettings(total_steps=4, lr=1e-2, warmup=0, strategy=strategy))
        for i in range(2):
            images, tokens = batch(4, seed=i, size=32, length=16)
            loop.step(images[rank * 2 : rank * 2 + 2], tokens[rank * 2 : rank * 2 + 2])
        state = loop.model_state_dict()
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{strategy}.pt"))


@pytest.mark.slow
def test_locks_hold_under_ddp_and_fsdp_on_two_ranks(tmp_path):
    from tests.support.gloo import run_ranks

    run_ranks(_locked_ranks, world=2, out_dir=tmp_path)
    start = _model(SMALL_VIT).state_dict()
    for strategy in ("ddp", "fsdp"):
        state = torch.load(tmp_path / f"{strategy}.pt", weights_only=True)
        changed = {n for n, v in start.items() if not torch.equal(state[n], v)}
        assert changed == {"visual.proj", "logit_scale"}, strategy
