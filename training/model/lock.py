"""Locked-image / locked-text tuning (LiT): freeze a tower, optionally leaving its last N groups trainable.

Groups follow open_clip's `--lock-image-unlocked-groups` / `--lock-text-unlocked-layers`, input to
output:
- ViT: [conv1, class and positional embeddings, ln_pre], each block but the last, [last block,
  ln_post], [proj]  (layers + 2 groups);
- ModifiedResNet (open_clip locks it only whole): [stem], layer1, layer2, layer3, layer4, [attnpool]
  (6 groups);
- text: [token and positional embeddings], each block but the last, [last block, ln_final],
  [text_projection]  (layers + 2 groups).
Unlocking N groups makes the last N trainable. `logit_scale` belongs to neither tower.

BatchNorm layers of locked ResNet groups are frozen with their parameters when `freeze_bn_stats`
(our default, unlike open_clip's): they then normalise with their running statistics in training
too and never update them, so a locked group computes in training exactly what it computes at
evaluation, and a checkpoint of a locked tower equals the tower it started from. The module keeps
its class' state-dict keys, so checkpoints and exports are unchanged.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from .resnet import ModifiedResNet

Group = list[Union[nn.Module, nn.Parameter]]


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode: running statistics used, never updated."""

    def train(self, mode: bool = True) -> "FrozenBatchNorm2d":
        return super().train(False)


def image_groups(visual: nn.Module) -> list[Group]:
    """The image tower's lockable groups, input to output."""
    if isinstance(visual, ModifiedResNet):
        stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
        return [stem, [visual.layer1], [visual.layer2], [visual.layer3], [visual.layer4], [visual.attnpool]]
    blocks = list(visual.transformer.resblocks)
    return [
        [visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
        *[[b] for b in blocks[:-1]],
        [blocks[-1], visual.ln_post],
        [visual.proj],
    ]


def text_groups(clip: nn.Module) -> list[Group]:
    """The text tower's lockable groups, input to output."""
    blocks = list(clip.transformer.resblocks)
    return [
        [clip.token_embedding, clip.positional_embedding],
        *[[b] for b in blocks[:-1]],
        [blocks[-1], clip.ln_final],
        [clip.text_projection],
    ]


def group_counts(cfg: dict) -> tuple[int, int]:
    """(image groups, text groups) of an open_clip-layout config, without building the model."""
    layers = cfg["vision_cfg"]["layers"]
    image = 6 if isinstance(layers, (list, tuple)) else layers + 2
    return image, cfg["text_cfg"]["layers"] + 2


def _parameters(group: Group) -> list[nn.Parameter]:
    return [p for item in group for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]


def _lock(groups: list[Group], unlocked: int, what: str) -> None:
    if isinstance(unlocked, bool) or not isinstance(unlocked, int) or not 0 <= unlocked <= len(groups):
        raise ValueError(f"{what} must be an integer from 0 to {len(groups)} (the tower's groups), got {unlocked!r}")
    for i, group in enumerate(groups):
        for param in _parameters(group):
            param.requires_grad_(i >= len(groups) - unlocked)


def _freeze_locked_batchnorms(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, FrozenBatchNorm2d):
            if child.weight is None or not child.weight.requires_grad:
                frozen = FrozenBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine).to(
                    child.running_mean.device
                )
                frozen.load_state_dict(child.state_dict())
                setattr(module, name, frozen.eval())
        else:
            _freeze_locked_batchnorms(child)


def lock_image_tower(clip: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
    """Freeze `clip.visual` but its last `unlocked_groups` groups (and, for a ResNet with
    `freeze_bn_stats`, the running statistics of the locked groups' BatchNorms)."""
    _lock(image_groups(clip.visual), unlocked_groups, "unlocked_groups (train.lock_image_unlocked_groups)")
    if freeze_bn_stats:
        _freeze_locked_batchnorms(clip.visual)


def lock_text_tower(clip: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze the text tower but its last `unlocked_layers` groups."""
    _lock(text_groups(clip), unlocked_layers, "unlocked_layers (train.lock_text_unlocked_layers)")
