"""width_mult over every registered architecture: the scaled model builds, keeps its depth, and its
image and text widths scale together (CLIP scales width, not depth, of both encoders).

The multipliers are those of the shipped sweep configs plus a spread around them. Models are built
on torch's meta device, so even ViT-L-14 x 2 costs no memory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from clipray.config import load_config
from training.model import create_model, get_model_config, list_models, parse_config, scale_width

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _sweep_widths() -> list[float]:
    widths = {0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0}
    for path in sorted(CONFIGS.glob("tune-*.yaml")):
        space = load_config(path).tune.width_mult
        if isinstance(space, list):
            widths.update(float(w) for w in space)
        elif space is not None:
            widths.update(float(w) for w in next(iter(space.values())))
    return sorted(widths)


WIDTHS = _sweep_widths()
ARCHS = [name for name in list_models() if not name.endswith("-quickgelu")]  # twins share shapes


def test_the_grid_covers_the_shipped_sweeps():
    assert {0.5, 1.0, 2.0} <= set(WIDTHS)
    assert {"ViT-Tiny", "ViT-B-32", "RN50", "RN-Tiny"} <= set(ARCHS)


def _depths(state: dict) -> tuple[int, int]:
    text = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    vision = {m.group(0) for k in state if (m := re.match(r"visual\.(transformer\.resblocks\.\d+|layer\d\.\d+)\.", k))}
    return len(vision), len(text)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_width_builds_keeps_depth_and_scales_both_encoders(arch):
    base_cfg = get_model_config(arch)
    base = parse_config(base_cfg)
    with torch.device("meta"):
        base_depth = _depths(create_model(base_cfg).state_dict())
    for mult in WIDTHS:
        cfg = scale_width(base_cfg, mult)
        scaled = parse_config(cfg)  # a valid config for every multiplier
        with torch.device("meta"):
            state = create_model(arch, width_mult=mult).state_dict()
        where = f"{arch} x {mult}"
        assert _depths(state) == base_depth, where
        assert (scaled.vision.layers, scaled.text.layers) == (base.vision.layers, base.text.layers), where
        assert (scaled.embed_dim, scaled.vision.image_size) == (base.embed_dim, base.vision.image_size), where

        # The built model has the scaled widths (OpenAI layout: conv1 out-channels, token embedding).
        vision_width = state["visual.conv1.weight"].shape[0]
        expected_stem = scaled.vision.width // 2 if scaled.vision.is_resnet else scaled.vision.width
        assert vision_width == expected_stem, where
        assert state["token_embedding.weight"].shape[1] == scaled.text.width, where
        assert scaled.text.width % scaled.text.heads == 0, where

        # Both encoders scale by the multiplier, up to one head (ViT, text) or the rounding step
        # (ResNet); so image and text widths move together.
        hw = base.vision.head_width
        # ViT: whole heads of head_width; ResNet: 32*width divisible by head_width, width even.
        v_step = math.lcm(2, hw // math.gcd(hw, 32)) if base.vision.is_resnet else hw
        t_step = base.text.width // base.text.heads
        assert (
            abs(scaled.vision.width - base.vision.width * mult) <= v_step / 2 + 1e-9 or scaled.vision.width == v_step
        ), where
        assert abs(scaled.text.width - base.text.width * mult) <= t_step / 2 + 1e-9 or scaled.text.heads == 1, where
        if mult > 1:
            assert scaled.vision.width > base.vision.width and scaled.text.width > base.text.width, where
        elif mult < 1 and base.text.heads * mult >= 1.5:
            assert scaled.vision.width < base.vision.width and scaled.text.width < base.text.width, where


def test_widths_grow_monotonically_with_the_multiplier():
    for arch in ("ViT-Tiny", "ViT-B-32", "RN50"):
        cfg = get_model_config(arch)
        widths = [
            (parse_config(scale_width(cfg, m)).vision.width, parse_config(scale_width(cfg, m)).text.width)
            for m in WIDTHS
        ]
        assert widths == sorted(widths), arch
