"""Models in and out of open_clip and Hugging Face transformers, checked by the libraries themselves.

The round trips run open_clip 3.3.0 / transformers in the oracle venv ($CLIPRAY_ORACLE_PYTHON,
tests/support/oracle.py): one subprocess loads our exports and writes its own model directories
(open_clip's `save_for_hf`, transformers' `save_pretrained`), each library preprocessing the same PNGs
and tokenizing the same captions its own way. Features must agree to 1e-4 (float32; the oracle has
another torch version). Fast tests of the key table, the refusals and the CLI need no oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.oracle import missing_reason, oracle_interpreter, run_oracle
from training.model import CheckpointError, create_model, eval_pixels, load_model, normalize_pixels, save_model
from training.tokenizer import EOT_ID, tokenize

TOLERANCE = 1e-4
TINY_VIT = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Sizes whose centre-crop margins are even: HF's CLIPImageProcessor crops at floor(margin / 2),
# open_clip (torchvision's CenterCrop) and we at round(margin / 2); odd margins of 3 mod 4 differ by
# one pixel (docs/model.md).
IMAGE_SIZES = [(40, 53), (70, 32), (32, 32), (45, 45), (33, 64)]
CAPTIONS = ["a dog", "A Photo of a CAT, sitting on the mat.", "red square; 3 blue circles!", "long " * 90]
HF_SPEC = {  # a GELU model, as transformers' own config classes describe it
    "projection_dim": 32,
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "gelu",
    },
}
TINY_RN = {**TINY_VIT, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32}}
OPEN_CLIP_SPEC = {**TINY_VIT, "quick_gelu": False, "vision_cfg": {**TINY_VIT["vision_cfg"], "head_width": 16}}


def _features(model, images_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Our eval path: eval_pixels + normalize_pixels, tokenize; projected features (not normalised)."""
    images = [Image.open(p) for p in sorted(images_dir.glob("*.png"))]
    pixels = torch.from_numpy(np.stack([eval_pixels(im, model.image_size) for im in images]))
    with torch.no_grad():
        image = model.encode_image(normalize_pixels(pixels).contiguous())
        text = model.encode_text(tokenize(CAPTIONS, context_length=model.context_length))
    return image.numpy(), text.numpy()


def _assert_close(ours, theirs: dict, what: str) -> None:
    image, text = ours
    assert np.abs(theirs["image"] - image).max() <= TOLERANCE, f"{what}: image features differ"
    assert np.abs(theirs["text"] - text).max() <= TOLERANCE, f"{what}: text features differ"


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    """Our tiny ViT exported both ways through `clipray export`, and the oracle's work on it and on
    its own fresh models; every library looks at the same images and captions."""
    python = oracle_interpreter()
    if python is None:
        pytest.skip(missing_reason())
    from clipray.cli import main
    from training.model.hf_tokenizer import write_tokenizer_files

    root = tmp_path_factory.mktemp("interop")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i, (w, h) in enumerate(IMAGE_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    torch.manual_seed(0)
    ours = create_model(TINY_VIT).eval()
    with torch.no_grad():
        ours.logit_scale.fill_(2.5)  # not the init value, so the export must carry it
    save_model(ours, root / "run" / "final")
    for fmt in ("open_clip", "hf"):
        assert main(["export", "--model", str(root / "run"), "--format", fmt, "--output", str(root / fmt)]) == 0
    torch.manual_seed(1)
    resnet = create_model(TINY_RN).eval()
    save_model(resnet, root / "rn")
    assert main(["export", "--model", str(root / "rn"), "--format", "open_clip", "--output", str(root / "rn_oc")]) == 0
    (root / "tokenizer").mkdir()
    write_tokenizer_files(root / "tokenizer", 77)
    jobs = [
        {"mode": "open_clip_load", "model_dir": str(root / "open_clip"), "out": str(root / "open_clip.npz")},
        {"mode": "hf_load", "model_dir": str(root / "hf"), "out": str(root / "hf.npz")},
        {"mode": "open_clip_load", "model_dir": str(root / "rn_oc"), "out": str(root / "rn_oc.npz")},
        {
            "mode": "open_clip_save",
            "model_dir": str(root / "theirs_open_clip"),
            "out": str(root / "theirs_open_clip.npz"),
            "spec": {"model_cfg": OPEN_CLIP_SPEC},
        },
        {
            "mode": "hf_save",
            "model_dir": str(root / "theirs_hf"),
            "out": str(root / "theirs_hf.npz"),
            "spec": {"hf_config": HF_SPEC, "tokenizer_dir": str(root / "tokenizer")},
        },
    ]
    (root / "jobs.json").write_text(json.dumps({"images": str(root / "images"), "captions": CAPTIONS, "jobs": jobs}))
    script = (Path(__file__).parent / "support" / "oracle_interop.py").read_text()
    run_oracle(python, script, str(root / "jobs.json"), cwd=root)
    return root, _features(ours, root / "images"), ours, _features(resnet, root / "images")


def _npz(path: Path) -> dict:
    with np.load(path) as f:
        return dict(f)


@pytest.mark.slow
def test_exported_open_clip_dir_gives_our_features_in_open_clip(interop):
    root, ours, model, resnet = interop
    theirs = _npz(root / "open_clip.npz")
    _assert_close(ours, theirs, "open_clip local-dir")
    assert theirs["scale"] == pytest.approx(model.logit_scale.item(), abs=1e-6)
    assert np.array_equal(theirs["tokens"], tokenize(CAPTIONS).numpy())
    _assert_close(resnet, _npz(root / "rn_oc.npz"), "open_clip local-dir, ModifiedResNet")


@pytest.mark.slow
def test_exported_hf_dir_gives_our_features_in_transformers(interop):
    root, ours, model, _ = interop
    theirs = _npz(root / "hf.npz")
    _assert_close(ours, theirs, "transformers CLIPModel + CLIPProcessor")
    assert theirs["scale"] == pytest.approx(model.logit_scale.item(), abs=1e-6)
    # Same ids up to end-of-text (HF pads with end-of-text, we with 0; pooling takes the first EOT).
    for row_theirs, row_ours in zip(theirs["tokens"], tokenize(CAPTIONS).numpy()):
        end = int(np.argmax(row_ours == EOT_ID)) + 1
        assert row_theirs[:end].tolist() == row_ours[:end].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["theirs_open_clip", "theirs_hf"])
def test_directories_written_by_the_libraries_load_into_ours(interop, name):
    root, _, _, _ = interop
    model = load_model(root / name)
    theirs = _npz(root / f"{name}.npz")
    _assert_close(_features(model, root / "images"), theirs, name)
    assert model.logit_scale.item() == pytest.approx(float(theirs["scale"]), abs=1e-6)
    assert model.config["quick_gelu"] is False  # both oracle models use exact GELU


# ------------------------------------------------------------------------------------- no oracle


def test_hf_key_table_converts_both_ways_without_loss():
    from training.model.hf_keys import from_hf, to_hf

    torch.manual_seed(0)
    state = create_model(TINY_VIT).state_dict()
    hf = to_hf(state, 2, 2)
    assert hf["visual_projection.weight"].shape == (32, 64)  # nn.Linear: [out, in]
    assert "text_model.encoder.layers.1.self_attn.v_proj.bias" in hf
    back = from_hf(hf, source="test")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_exports_to_s3_load_from_s3_like_local_ones(tmp_path, monkeypatch):
    from storage import StorageConfig
    from tests.support.s3_server import S3TestServer
    from training.model.export import export_checkpoint

    torch.manual_seed(0)
    model = create_model(TINY_VIT).eval()
    save_model(model, tmp_path / "final")
    with S3TestServer() as s3:
        for key, value in s3.env().items():  # `clipray export` reaches S3 through the standard chain
            monkeypatch.setenv(key, value)
        s3.create_bucket("exports")  # moto's buckets are process-wide: a name of its own
        storage = StorageConfig(storage_options=s3.storage_options())
        for fmt in ("open_clip", "hf"):
            export_checkpoint(str(tmp_path / "final"), fmt, f"s3://exports/{fmt}")
            loaded = load_model(f"s3://exports/{fmt}", storage=storage)
            assert loaded.config == model.config
            for key, value in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[key], value), (fmt, key)


def test_foreign_dirs_our_clip_cannot_reproduce_are_refused_naming_the_key(tmp_path):
    from training.model.export import export_model

    model = create_model(TINY_VIT)
    export_model(model, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu_new"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act"):
        load_model(tmp_path / "hf")

    export_model(model, tmp_path / "oc", "open_clip")
    doc = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    doc["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"image mean \[0.5, 0.5, 0.5\] differs"):
        load_model(tmp_path / "oc")


def test_export_cli_refuses_unknown_formats_and_resnets_for_hf_with_exit_2(tmp_path, capsys):
    from clipray.cli import main

    save_model(create_model("RN-Tiny"), tmp_path / "rn")
    assert main(["export", "--model", str(tmp_path / "rn"), "--format", "onnx", "--output", str(tmp_path / "x")]) == 2
    assert "export format 'onnx' is not one of: open_clip, hf" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "rn"), "--format", "hf", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "ModifiedResNet" in err and "--format open_clip" in err
    assert not (tmp_path / "x").exists()  # nothing written
    save_model(create_model(TINY_VIT), tmp_path / "vit")
    assert main(["export", "--model", str(tmp_path / "vit"), "--format", "hf", "--output", str(tmp_path / "vit")]) == 2
    assert "would overwrite its model.safetensors" in capsys.readouterr().err
    # The same ResNet exports to open_clip's layout and comes back equal.
    assert (
        main(["export", "--model", str(tmp_path / "rn"), "--format", "open_clip", "--output", str(tmp_path / "oc")])
        == 0
    )
    assert load_model(tmp_path / "oc").config == load_model(tmp_path / "rn").config


def test_clipray_eval_scores_an_exported_directory_like_the_run_it_came_from(tmp_path):
    from evaluation.config import EvalConfig
    from evaluation.run import run_evaluation
    from tests.test_eval_datasets import write_color_shards
    from training.model.export import export_model

    torch.manual_seed(0)
    model = create_model(TINY_VIT)
    save_model(model, tmp_path / "final")
    export_model(model, tmp_path / "hf", "hf")
    write_color_shards(tmp_path / "test", per_class=3)

    def recalls(path: Path) -> dict:
        output = str(tmp_path / f"{path.name}.json")
        cfg = EvalConfig(model=str(path), task="retrieval", dataset=str(tmp_path / "test"), output=output)
        return run_evaluation(cfg)["metrics"]

    assert recalls(tmp_path / "hf") == recalls(tmp_path / "final")


def test_stored_config_reads_the_architecture_without_the_weights(tmp_path):
    from safetensors.torch import save_file

    from training.model.export import export_model
    from training.model.external_dirs import stored_config

    model = create_model(TINY_VIT)
    save_model(model, tmp_path / "run" / "final")
    export_model(model, tmp_path / "oc", "open_clip")
    export_model(model, tmp_path / "hf", "hf")
    for path in ("run", "run/final", "run/final/model.safetensors", "oc", "hf"):
        assert stored_config(str(tmp_path / path)) == model.config, path
    save_file(model.state_dict(), str(tmp_path / "bare.safetensors"))
    assert stored_config(str(tmp_path / "bare.safetensors")) is None  # the run falls back to model.name
    with pytest.raises(CheckpointError, match="does not exist"):
        stored_config(str(tmp_path / "nothing"))
