"""CLIP model: reference parity, published state-dict layouts, width scaling, speed options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from training.model import (
    CLIP,
    ModelConfigError,
    create_model,
    get_model_config,
    image_mean_std,
    list_models,
    parse_config,
    scale_width,
)

PUBLISHED = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]
PARITY = ["tiny-vit-quickgelu", "tiny-vit-gelu", "tiny-rn-quickgelu"]
# Smaller than ViT-Tiny, for the tests that only need a working ViT.
MICRO_VIT = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _tokens(batch: int, length: int, ends: list[int], vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    """Random ids below end-of-text, an end-of-text (the largest id) at ends[b], zeros after it."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, vocab - 2, (batch, length), generator=g)
    for b, e in enumerate(ends):
        tok[b, 0] = vocab - 2
        tok[b, e] = vocab - 1
        tok[b, e + 1 :] = 0
    return tok


@pytest.mark.parametrize("name", PARITY)
def test_features_match_open_clip_reference(shared_dir, name):
    tensors = load_file(str(shared_dir / "reference" / "parity" / f"{name}.safetensors"))
    cfg = json.loads((shared_dir / "reference" / "parity" / f"{name}.json").read_text())["config"]
    weights = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
    model = create_model(cfg).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        image = model.encode_image(tensors["input.images"])
        text = model.encode_text(tensors["input.tokens"])
    assert (image - tensors["expected.image_features"]).abs().max().item() <= 1e-5
    assert (text - tensors["expected.text_features"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", PUBLISHED)
def test_state_dict_keys_shapes_and_parameter_count_match_published(shared_dir, name):
    ref = json.loads((shared_dir / "reference" / "state_dict_shapes" / f"{name}.json").read_text())
    model = create_model(name, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    oc = ref["open_clip_config"]
    assert model.config["embed_dim"] == oc["embed_dim"] and model.config["text_cfg"] == oc["text_cfg"]


def test_registry_lists_published_tiny_and_quickgelu_variants():
    names = list_models()
    for name in PUBLISHED + ["ViT-Tiny", "RN-Tiny"]:
        assert name in names and name + "-quickgelu" in names
        parse_config(get_model_config(name))
    assert get_model_config("ViT-B-32-quickgelu")["quick_gelu"] is True
    assert get_model_config("ViT-B-32")["quick_gelu"] is False


def test_vit_tiny_has_the_agreed_dimensions():
    cfg = get_model_config("ViT-Tiny")
    assert cfg["embed_dim"] == 128
    assert cfg["vision_cfg"] == {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32}
    assert cfg["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}


def test_model_json_path_and_dict_are_accepted(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(get_model_config("ViT-Tiny")))
    assert create_model(str(path), device="meta").config == get_model_config("ViT-Tiny")
    assert create_model(get_model_config("RN-Tiny"), device="meta").image_size == 64


@pytest.mark.parametrize(
    "cfg_change, message",
    [
        (lambda c: c.update(embed_dimm=3), "unknown key 'embed_dimm'"),
        (lambda c: c["vision_cfg"].update(head_width=48), "head_width 48 must divide vision_cfg.width 128"),
        (lambda c: c["text_cfg"].update(heads=3), "text_cfg.heads 3 must divide text_cfg.width 128"),
        (lambda c: c["vision_cfg"].update(image_size=60), "not a multiple of patch_size 8"),
        (lambda c: c["vision_cfg"].update(layers=[1, 1, 1]), "4 stages"),
        (lambda c: c.pop("embed_dim"), "lacks the key 'embed_dim'"),
        (lambda c: c["text_cfg"].update(width=0), "text_cfg.width must be a positive integer"),
    ],
)
def test_bad_config_is_refused_naming_the_key(cfg_change, message):
    cfg = get_model_config("ViT-Tiny")
    cfg_change(cfg)
    with pytest.raises(ModelConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        create_model(cfg, device="meta")


def test_unknown_model_name_lists_registered_models():
    with pytest.raises(ModelConfigError, match="registered: .*ViT-B-32"):
        create_model("ViT-B-33")


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "ViT-Tiny", "RN-Tiny", "RN50x4", "ViT-L-14"])
@pytest.mark.parametrize("mult", [0.01, 0.1, 0.25, 0.37, 0.5, 0.77, 1.0, 1.5, 2.0, 3.3])
def test_width_mult_scales_widths_not_depth_and_builds(name, mult):
    base = get_model_config(name)
    cfg = scale_width(base, mult)
    parse_config(cfg)
    assert cfg["vision_cfg"]["layers"] == base["vision_cfg"]["layers"]
    assert cfg["text_cfg"]["layers"] == base["text_cfg"]["layers"]
    assert (
        cfg["text_cfg"]["width"] // cfg["text_cfg"]["heads"] == base["text_cfg"]["width"] // base["text_cfg"]["heads"]
    )
    if mult >= 0.25:  # within rounding of the multiplier
        for section in ("vision_cfg", "text_cfg"):
            ratio = cfg[section]["width"] / base[section]["width"]
            assert abs(ratio - mult) / mult < 0.35, (section, ratio)
    create_model(name, width_mult=mult, device="meta")


def test_width_mult_of_vit_scales_heads_with_fixed_head_width():
    cfg = scale_width(get_model_config("ViT-B-32"), 0.5)
    assert cfg["vision_cfg"]["width"] == 384 and cfg["vision_cfg"].get("head_width", 64) == 64
    assert cfg["text_cfg"]["width"] == 256 and cfg["text_cfg"]["heads"] == 4
    assert scale_width(get_model_config("RN50"), 2.0)["vision_cfg"]["width"] == 128


@pytest.mark.parametrize("mult", [0, -1.0, float("nan")])
def test_bad_width_mult_is_refused(mult):
    with pytest.raises(ModelConfigError, match="width_mult"):
        create_model("ViT-Tiny", width_mult=mult, device="meta")


@pytest.mark.parametrize("name", ["ViT-Tiny", "RN-Tiny"])
def test_forward_contract(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert isinstance(model, CLIP) and model.image_size == 64 and model.context_length == 77
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    images = torch.randn(3, 3, 64, 64)
    tokens = _tokens(3, 77, [5, 9, 76])
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
        assert img.shape == txt.shape == (3, 128)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(scale, model.logit_scale.exp())
        raw = model.encode_image(images)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))  # encode_* are not normalised
        assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), img, atol=1e-6)


def test_text_features_do_not_depend_on_tokens_after_end_of_text():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny").eval()
    tokens = _tokens(3, 77, [4, 20, 30])
    noisy = tokens.clone()
    noisy[0, 5:] = torch.randint(1, 1000, (72,))
    with torch.no_grad():
        a = model.encode_text(tokens)
        b = model.encode_text(noisy)
        model.text_trim = False
        c = model.encode_text(tokens)
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5


def test_pooled_last_block_equals_running_every_token():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny").eval()
    tfm = model.transformer
    x = torch.randn(3, 12, 128)
    index = torch.tensor([3, 11, 0])
    with torch.no_grad():
        full = tfm(x, causal=True)[torch.arange(3), index]
        pooled = tfm.forward_pooled(x, index, causal=True)
        full_nc = model.visual.transformer(x)[:, 0]
        pooled_nc = model.visual.transformer.forward_pooled(x, torch.zeros(3, dtype=torch.long))
    assert (full - pooled).abs().max() < 1e-5
    assert (full_nc - pooled_nc).abs().max() < 1e-5


def test_shorter_context_length_works():
    cfg = get_model_config("ViT-Tiny")
    cfg["text_cfg"]["context_length"] = 32
    model = create_model(cfg).eval()
    assert model.context_length == 32 and model.positional_embedding.shape == (32, 128)
    with torch.no_grad():
        assert model.encode_text(_tokens(2, 32, [3, 31])).shape == (2, 128)
        assert model.encode_text(_tokens(2, 16, [3, 15])).shape == (2, 128)
    with pytest.raises(ValueError, match="context_length is 32"):
        model.encode_text(_tokens(2, 77, [3, 76]))


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match="takes 64x64"):
        create_model("ViT-Tiny").encode_image(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["ViT-Tiny", "RN-Tiny"])
def test_grad_checkpointing_gives_same_loss_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    images, tokens = torch.randn(4, 3, 64, 64), _tokens(4, 77, [3, 8, 12, 40])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_and_grads(m):
        m.zero_grad()
        img, txt, scale = m(images, tokens)
        logits = scale * img @ txt.t()
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(model)
    plain_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.load_state_dict(state)
    model.set_grad_checkpointing(True)
    ckpt_loss, ckpt = loss_and_grads(model)
    assert abs(plain_loss - ckpt_loss) < 1e-5
    assert plain.keys() == ckpt.keys()
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-5), k
    # BatchNorm running stats are updated once, not again in the recomputation.
    for k, v in plain_stats.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_patch_dropout_keeps_class_token_in_training_and_is_off_in_eval():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny", patch_dropout=0.5)
    images = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("n", o.shape[1]))
    model.train()
    model.encode_image(images)
    assert seen["n"] == 1 + 32  # 64 patches, half kept, plus the class token
    model.eval()
    with torch.no_grad():
        a = model.encode_image(images)
        b = model.encode_image(images)
    assert seen["n"] == 65 and torch.equal(a, b)
    hook.remove()
    with pytest.raises(ValueError, match="ViT image encoders only"):
        create_model("RN-Tiny", patch_dropout=0.5)


def test_initialisation_follows_clip():
    torch.manual_seed(0)
    model = create_model("ViT-B-32")
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 1e-3
    assert abs(model.positional_embedding.std().item() - 0.01) < 1e-3
    width, layers = 512, 12
    block = model.transformer.resblocks[0]
    assert abs(block.attn.in_proj_weight.std().item() - width**-0.5) < 2e-3
    assert abs(block.attn.out_proj.weight.std().item() - width**-0.5 * (2 * layers) ** -0.5) < 1e-3
    assert abs(block.mlp.c_fc.weight.std().item() - (2 * width) ** -0.5) < 1e-3
    rn = create_model("RN-Tiny")
    for layer in (rn.visual.layer1, rn.visual.layer4):
        assert torch.count_nonzero(layer[0].bn3.weight) == 0
    assert math.isclose(create_model("ViT-Tiny", temperature_init=0.05).logit_scale.item(), math.log(20), rel_tol=1e-6)
    assert not create_model("ViT-Tiny", learn_temperature=False).logit_scale.requires_grad


@pytest.mark.parametrize("name", ["ViT-Tiny", "RN-Tiny"])
def test_bf16_autocast_runs_with_layernorm_in_float32(name, monkeypatch):
    torch.manual_seed(0)
    model = create_model(name)
    inputs, computed = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].dtype))
    layer_norm = torch.nn.functional.layer_norm

    def recording_layer_norm(x, *args, **kwargs):
        computed.append(x.dtype)
        return layer_norm(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", recording_layer_norm)
    images, tokens = torch.randn(2, 3, 64, 64), _tokens(2, 77, [5, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale = model(images, tokens)
        loss = (img @ txt.t()).sum() * scale
    loss.backward()
    assert torch.isfinite(loss)
    if name == "ViT-Tiny":
        assert torch.bfloat16 in inputs  # ln_pre receives the bf16 patch embedding...
    assert computed and set(computed) == {torch.float32}  # ...and normalise them in float32
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        ref_img, ref_txt, _ = model(images, tokens)
    assert (img.float() - ref_img).abs().max() < 0.1 and (txt.float() - ref_txt).abs().max() < 0.1


def test_layernorm_of_a_half_precision_model_computes_in_float32():
    ln = create_model("ViT-Tiny").ln_final.to(torch.bfloat16)
    x = (torch.randn(4, 128) * 100 + 1000).to(torch.bfloat16)
    y = ln(x)
    ref = torch.nn.functional.layer_norm(x.float(), (128,), ln.weight.float(), ln.bias.float())
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, atol=2e-2)


def test_torch_compile_traces_the_model():
    torch.manual_seed(0)
    model = create_model(MICRO_VIT)
    compiled = torch.compile(model, backend="aot_eager")
    images, tokens = torch.randn(2, 3, 32, 32), _tokens(2, 77, [5, 9])
    img, txt, scale = compiled(images, tokens)
    (img @ txt.t() * scale).sum().backward()
    assert model.visual.proj.grad is not None and model.token_embedding.weight.grad is not None
    with torch.no_grad():
        ref_img, ref_txt, _ = model(images, tokens)
    assert (img - ref_img).abs().max() < 1e-5 and (txt - ref_txt).abs().max() < 1e-5


def test_image_mean_std_is_clips():
    mean, std = image_mean_std()
    assert mean == (0.48145466, 0.4578275, 0.40821073) and std == (0.26862954, 0.26130258, 0.27577711)
