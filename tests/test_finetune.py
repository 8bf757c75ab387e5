"""Fine-tuning from another library's model directory with Ray Train: `model.pretrained` names a
Hugging Face CLIPModel directory (no `model.name`: the architecture comes from its config.json), the
image tower locked (LiT). The run starts from those weights and trains the text tower only."""

from __future__ import annotations

import pytest
import torch

from tests.support.train_shards import write_shards
from training.config import ModelConfig, TrainConfig

pytestmark = pytest.mark.slow


def test_clipray_train_fine_tunes_a_hugging_face_directory_with_the_image_tower_locked(ray_local, tmp_path):
    from safetensors.torch import load_file

    from training.driver import run_training
    from training.model import create_model
    from training.model.export import export_model

    write_shards(tmp_path / "shards", copies=1, rows_per_shard=48, side=64)
    torch.manual_seed(0)
    start = create_model("ViT-Tiny", width_mult=0.5)
    export_model(start, tmp_path / "hf", "hf")
    train = TrainConfig(
        data=[str(tmp_path / "shards")],
        storage_path=str(tmp_path / "runs"),
        name="lit",
        num_workers=1,
        batch_size=16,
        samples=16 * 2,
        lr=1e-3,
        warmup=1,
        checkpoint_every=2,
        num_preprocess_actors=1,
        preprocess_cpus=0.5,
        lock_image=True,
    )
    run_training(ModelConfig(pretrained=str(tmp_path / "hf")), train)
    final = load_file(str(tmp_path / "runs" / "lit" / "final" / "model.safetensors"))
    before = start.state_dict()
    assert final.keys() == before.keys()
    for name, value in before.items():
        if name.startswith("visual."):
            assert torch.equal(final[name], value), f"locked {name} changed"
    assert not torch.equal(final["text_projection"], before["text_projection"])
