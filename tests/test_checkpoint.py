"""Checkpoint I/O: our safetensors dirs, OpenCLIP dicts, OpenAI-style TorchScript archives, errors."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from training.model import CheckpointError, create_model, get_model_config, load_model, load_state_dict, save_model
from training.model.checkpoint import infer_config

tracing = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.:DeprecationWarning")

# heads = width / 64 everywhere, so the architecture can be inferred exactly from shapes.
INFERABLE = {
    "vit": {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 20, "vocab_size": 1000, "width": 128, "heads": 2, "layers": 2},
    },
    "rn": {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 64},
        "text_cfg": {"context_length": 20, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1},
    },
}


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=g)
    tokens = torch.randint(1, model.vocab_size - 1, (2, model.context_length), generator=g)
    tokens[0, 5] = tokens[1, -1] = model.vocab_size - 1
    tokens[0, 6:] = 0
    return images, tokens


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _trained_like(name_or_cfg, seed=0):
    """A model whose BN statistics and logit_scale differ from a fresh one (so round trips mean something)."""
    torch.manual_seed(seed)
    model = create_model(name_or_cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
        for block in getattr(model.visual, "layer1", []):
            block.bn3.weight.normal_()
        model.logit_scale.fill_(3.0)
    return model.eval()


def _same(a, b):
    return all((x - y).abs().max().item() <= 1e-6 for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["ViT-Tiny", "RN-Tiny"])
def test_save_model_then_load_model_round_trips(tmp_path, name):
    model = _trained_like(name)
    images, tokens = _inputs(model)
    save_model(model, tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["model.safetensors", "model_config.json"]
    assert json.loads((tmp_path / "final" / "model_config.json").read_text()) == get_model_config(name)
    for path in (tmp_path / "final", tmp_path, tmp_path / "final" / "model.safetensors"):
        loaded = load_model(path)
        assert not loaded.training
        assert loaded.config == model.config and loaded.logit_scale.item() == pytest.approx(3.0)
        assert _same(_features(model, images, tokens), _features(loaded, images, tokens))
        assert loaded.logit_scale.requires_grad


def test_load_model_finds_the_newest_checkpoint_in_a_run_dir(tmp_path):
    old, new = _trained_like("ViT-Tiny", seed=0), _trained_like("ViT-Tiny", seed=1)
    save_model(old, tmp_path / "checkpoint_000001")
    save_model(new, tmp_path / "checkpoint_000002")
    images, tokens = _inputs(new)
    assert _same(_features(new, images, tokens), _features(load_model(tmp_path), images, tokens))


def test_save_model_unwraps_compiled_or_ddp_style_wrappers(tmp_path):
    model = _trained_like("ViT-Tiny")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_model(Wrapper(model), tmp_path)
    assert "visual.proj" in load_state_dict(tmp_path / "model.safetensors")


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_openclip_training_checkpoint_with_module_prefix_loads_and_infers_architecture(tmp_path, kind):
    model = _trained_like(INFERABLE[kind])
    images, tokens = _inputs(model)
    ckpt = {
        "epoch": 3,
        "name": "run",
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    assert infer_config(load_state_dict(tmp_path / "epoch_3.pt")) == INFERABLE[kind]
    loaded = load_model(tmp_path / "epoch_3.pt")
    assert loaded.config == INFERABLE[kind]
    assert _same(_features(model, images, tokens), _features(loaded, images, tokens))


def test_plain_state_dict_and_safetensors_load_with_a_given_name(tmp_path):
    model = _trained_like("RN-Tiny")
    images, tokens = _inputs(model)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    save_file(model.state_dict(), str(tmp_path / "sd.safetensors"))
    for file in ("sd.pt", "sd.safetensors"):
        loaded = load_model(tmp_path / file, name="RN-Tiny")
        assert _same(_features(model, images, tokens), _features(loaded, images, tokens))


@tracing
@pytest.mark.parametrize("half", [False, True])
def test_torchscript_archive_written_by_jit_save_loads_its_tensors(tmp_path, half):
    model = _trained_like(INFERABLE["vit"])
    images, tokens = _inputs(model)
    expected = _features(model, images, tokens)
    model.text_trim = False  # tracing needs data-independent shapes
    # OpenAI's archives carry these scalars next to the weights (their loader drops them).
    model.register_buffer("input_resolution", torch.tensor(32))
    model.register_buffer("context_length_", torch.tensor(20), persistent=False)
    if half:  # OpenAI released float16 archives
        model = model.to(torch.bfloat16)
        images = images.to(torch.bfloat16)
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "ViT-openai.pt"))
    del model.input_resolution, model.context_length_

    state = load_state_dict(tmp_path / "ViT-openai.pt")
    assert "input_resolution" not in state and "context_length_" in state  # buffers, not attributes
    assert "transformer.resblocks.0.attn.in_proj_weight" in state
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\):\n    context_length_"):
        load_model(tmp_path / "ViT-openai.pt")
    # Without the extra buffer, it loads and infers the architecture.
    del state["context_length_"]
    torch.save(state, tmp_path / "clean.pt")
    loaded = load_model(tmp_path / "clean.pt")
    assert loaded.config == INFERABLE["vit"] and loaded.positional_embedding.dtype == torch.float32
    got = _features(loaded, images.float(), tokens)
    tol = 0.1 if half else 1e-6
    assert all((x - y).abs().max().item() <= tol for x, y in zip(expected, got))


@tracing
def test_openai_style_torchscript_archive_loads_directly(tmp_path):
    model = _trained_like(INFERABLE["rn"])
    images, tokens = _inputs(model)
    expected = _features(model, images, tokens)
    model.text_trim = False
    model.register_buffer("input_resolution", torch.tensor(64))
    model.register_buffer("vocab_size_buf", torch.tensor(1000), persistent=False)
    del model.vocab_size_buf
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "RN.pt"))
    loaded = load_model(tmp_path / "RN.pt")
    assert _same(expected, _features(loaded, images, tokens))


def _torchscript_like_archive(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/constants.pkl", pickle.dumps(()))
        z.writestr("evil/code/__torch__.py", "class A(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        z.writestr("evil/version", "3\n")


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_torchscript_archive_with_a_foreign_global_is_refused(tmp_path):
    _torchscript_like_archive(tmp_path / "evil.pt", pickle.dumps(_Boom(), protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load (posix|os).system"):
        load_model(tmp_path / "evil.pt")


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Boom()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_model(tmp_path / "evil.pt", name="ViT-Tiny")


def test_mismatched_checkpoint_lists_missing_unexpected_and_shape_mismatches(tmp_path):
    save_model(create_model("RN-Tiny"), tmp_path / "rn")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "rn" / "model.safetensors", name="ViT-Tiny")
    msg = str(err.value)
    assert "does not fit the model" in msg
    assert "missing keys (" in msg and "visual.class_embedding" in msg
    assert "unexpected keys (" in msg and "visual.attnpool.c_proj.weight" in msg
    assert "... and" in msg  # long lists are cut with a count

    save_model(create_model("ViT-Tiny", width_mult=0.5), tmp_path / "narrow")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "narrow" / "model.safetensors", name="ViT-Tiny")
    msg = str(err.value)
    assert "shape mismatches (" in msg and "visual.proj: checkpoint [64, 128] vs model [128, 128]" in msg
    assert "missing keys" not in msg


def test_missing_and_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(tmp_path / "bad.safetensors")
    torch.save({"a": 1}, tmp_path / "notweights.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(tmp_path / "notweights.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot infer the architecture"):
        load_model(tmp_path / "other.pt")


def test_run_dir_on_s3_loads_like_a_local_one(tmp_path):
    """eval.model / pipeline's clip-score model may live on s3:// (loopback S3 server here)."""
    from storage import StorageConfig
    from tests.support.s3_server import S3TestServer
    from training.model import create_model, load_model, save_model

    model = create_model("ViT-Tiny").eval()
    save_model(model, tmp_path / "run" / "final")
    with S3TestServer() as s3:
        fs = s3.filesystem()
        fs.mkdir("models")
        fs.put(str(tmp_path / "run"), "models/run", recursive=True)
        storage = StorageConfig(storage_options=s3.storage_options())  # a config section's keys, no env
        loaded = load_model("s3://models/run", storage=storage)
        with pytest.raises(Exception, match="holds no model.safetensors"):
            load_model("s3://models/nothing-here", storage=storage)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
