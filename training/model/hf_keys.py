"""OpenAI CLIP layout <-> Hugging Face `transformers` `CLIPModel`: the one key table, both directions.

Export (`training.model.export`) and import (`training.model.external_dirs`) both go through
`to_hf` / `from_hf` and `hf_config` / `config_from_hf`, so the two directions cannot drift apart.

Differences the table handles besides names:
- OpenAI fuses the attention's query/key/value projections (`attn.in_proj_weight` [3W, W], bias
  [3W]); HF keeps `q_proj`, `k_proj`, `v_proj` apart ("qkv" rows: split in thirds, in q, k, v order);
- OpenAI's output projections are matrices applied as `x @ proj` ([W, D]); HF's are `nn.Linear`
  without bias (`weight` [D, W]): transposed ("transpose" rows).
Only ViT image towers exist in HF's CLIPModel (no ModifiedResNet).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import ModelConfigError, parse_config

# (OpenAI key, HF key, how): "copy", "transpose" or "qkv". `{v}` / `{t}` stand for the prefixes of one
# vision / text transformer block; the block rows repeat for every layer.
TOP_KEYS: tuple[tuple[str, str, str], ...] = (
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "copy"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "copy"),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", "copy"),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", "copy"),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", "copy"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", "copy"),
    ("visual.proj", "visual_projection.weight", "transpose"),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "copy"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", "copy"),
    ("ln_final.weight", "text_model.final_layer_norm.weight", "copy"),
    ("ln_final.bias", "text_model.final_layer_norm.bias", "copy"),
    ("text_projection", "text_projection.weight", "transpose"),
    ("logit_scale", "logit_scale", "copy"),
)
BLOCK_KEYS: tuple[tuple[str, str, str], ...] = (
    ("ln_1.weight", "layer_norm1.weight", "copy"),
    ("ln_1.bias", "layer_norm1.bias", "copy"),
    ("attn.in_proj_weight", "self_attn.{}_proj.weight", "qkv"),
    ("attn.in_proj_bias", "self_attn.{}_proj.bias", "qkv"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight", "copy"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias", "copy"),
    ("ln_2.weight", "layer_norm2.weight", "copy"),
    ("ln_2.bias", "layer_norm2.bias", "copy"),
    ("mlp.c_fc.weight", "mlp.fc1.weight", "copy"),
    ("mlp.c_fc.bias", "mlp.fc1.bias", "copy"),
    ("mlp.c_proj.weight", "mlp.fc2.weight", "copy"),
    ("mlp.c_proj.bias", "mlp.fc2.bias", "copy"),
)
# Block prefixes: (OpenAI, HF) for the image tower, then the text tower.
TOWERS = (
    ("visual.transformer.resblocks.{i}.", "vision_model.encoder.layers.{i}."),
    ("transformer.resblocks.{i}.", "text_model.encoder.layers.{i}."),
)
QKV = ("q", "k", "v")
# Entries some HF checkpoints carry that are not weights (older transformers saved them).
HF_NON_WEIGHTS = re.compile(r".*\.position_ids$")

# Our tokenizer's ids (training/tokenizer.py): HF's CLIP text model pools at the first eos_token_id,
# ours at the row's argmax; the two agree because end-of-text is the largest id.
VOCAB_SIZE, BOS_ID, EOS_ID = 49408, 49406, 49407
LAYER_NORM_EPS = 1e-5  # torch's default, which our LayerNorm uses
ACTIVATIONS = {True: "quick_gelu", False: "gelu"}  # quick_gelu flag <-> HF hidden_act (gelu: exact erf)


def key_table(vision_layers: int, text_layers: int) -> list[tuple[str, str, str]]:
    """Every (OpenAI key, HF key, how) row of a model with these depths."""
    rows = list(TOP_KEYS)
    for (ours, theirs), layers in zip(TOWERS, (vision_layers, text_layers)):
        for i in range(layers):
            rows += [(ours.format(i=i) + a, theirs.format(i=i) + b, how) for a, b, how in BLOCK_KEYS]
    return rows


def to_hf(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """An OpenAI-layout ViT CLIP state dict -> HF CLIPModel's (contiguous tensors, for safetensors)."""
    out = {}
    for ours, theirs, how in key_table(vision_layers, text_layers):
        value = state[ours]
        if how == "transpose":
            out[theirs] = value.t().contiguous()
        elif how == "qkv":
            for name, part in zip(QKV, value.chunk(3, dim=0)):
                out[theirs.format(name)] = part.contiguous()
        else:
            out[theirs] = value.contiguous()
    return out


def _count_layers(state: dict, prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := rx.match(k))})


def from_hf(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """An HF CLIPModel state dict -> OpenAI layout. Raises ValueError naming missing/unexpected keys."""
    from .checkpoint import CheckpointError

    state = {k: v for k, v in state.items() if not HF_NON_WEIGHTS.match(k)}
    vision_layers = _count_layers(state, "vision_model.encoder.layers.")
    text_layers = _count_layers(state, "text_model.encoder.layers.")
    out, used = {}, set()
    missing = []
    for ours, theirs, how in key_table(vision_layers, text_layers):
        names = [theirs.format(n) for n in QKV] if how == "qkv" else [theirs]
        absent = [n for n in names if n not in state]
        if absent:
            missing += absent
            continue
        used.update(names)
        if how == "qkv":
            out[ours] = torch.cat([state[n] for n in names], dim=0)
        elif how == "transpose":
            out[ours] = state[theirs].t().contiguous()
        else:
            out[ours] = state[theirs]
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} is not a Hugging Face CLIPModel state dict we can convert"
            + (f"; missing keys: {', '.join(missing[:10])}" if missing else "")
            + (f"; unexpected keys: {', '.join(unexpected[:10])}" if unexpected else "")
            + (" (a CLIPVisionModel/CLIPTextModel alone, or a CLIP variant with extra layers?)")
        )
    return out


def hf_config(cfg: dict) -> dict[str, Any]:
    """HF `config.json` (CLIPConfig) for an open_clip-layout ViT config. ModifiedResNet: ValueError."""
    parsed = parse_config(cfg)
    v, t = parsed.vision, parsed.text
    if v.is_resnet:
        raise ValueError(
            f"a ModifiedResNet image tower (vision_cfg.layers {list(v.layers)}) cannot be exported to "
            "Hugging Face: transformers' CLIPModel has ViT image towers only; export it with --format open_clip"
        )
    if t.vocab_size != VOCAB_SIZE:
        raise ValueError(
            f"text_cfg.vocab_size {t.vocab_size} is not CLIP's {VOCAB_SIZE}: the exported tokenizer would not fit"
        )
    act = ACTIVATIONS[parsed.quick_gelu]
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": parsed.embed_dim,
        "logit_scale_init_value": 2.6592,
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": 4 * t.width,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": parsed.embed_dim,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": 4 * v.width,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": parsed.embed_dim,
        },
    }


# transformers' defaults for keys its save_pretrained leaves out (CLIPTextConfig / CLIPVisionConfig).
_HF_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def config_from_hf(hf: dict, source: str) -> dict:
    """An open_clip-layout config from HF CLIPConfig's `config.json`; refuses what our CLIP cannot
    compute identically (naming the key): other activations, MLP ratios, layer-norm eps, pooling ids."""
    if hf.get("model_type") != "clip":
        raise ModelConfigError(
            f"{source}: model_type {hf.get('model_type')!r} is not 'clip' (only transformers' CLIPModel is read)"
        )
    text = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    vision = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}

    def refuse(key: str, value: Any, why: str) -> ModelConfigError:
        return ModelConfigError(f"{source}: {key}={value!r} is not supported ({why})")

    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS.values()):
        raise refuse(
            "hidden_act", sorted(acts), "both towers must use quick_gelu, or both gelu; the CLIP here has one flag"
        )
    for name, sec in (("text_config", text), ("vision_config", vision)):
        if sec["intermediate_size"] != 4 * sec["hidden_size"]:
            raise refuse(f"{name}.intermediate_size", sec["intermediate_size"], "the MLP must be 4 x hidden_size")
        if abs(float(sec["layer_norm_eps"]) - LAYER_NORM_EPS) > 1e-12:
            raise refuse(f"{name}.layer_norm_eps", sec["layer_norm_eps"], f"only {LAYER_NORM_EPS}")
    if vision["num_channels"] != 3:
        raise refuse("vision_config.num_channels", vision["num_channels"], "RGB only")
    eos = text["eos_token_id"]
    if eos not in (2, text["vocab_size"] - 1):
        # HF pools at the first eos_token_id (argmax when it is 2, its legacy value); ours at the argmax.
        raise refuse(
            "text_config.eos_token_id", eos, "the text is pooled at the largest id, so eos must be vocab_size - 1"
        )
    image_size, patch = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0] if len(set(image_size)) == 1 else image_size
    if isinstance(patch, (list, tuple)):
        patch = patch[0] if len(set(patch)) == 1 else patch
    if vision["hidden_size"] % vision["num_attention_heads"]:
        raise refuse("vision_config.num_attention_heads", vision["num_attention_heads"], "must divide hidden_size")
    cfg = {
        "embed_dim": hf.get("projection_dim", 512),
        "quick_gelu": text["hidden_act"] == "quick_gelu",
        "vision_cfg": {
            "image_size": image_size,
            "layers": vision["num_hidden_layers"],
            "width": vision["hidden_size"],
            "patch_size": patch,
            "head_width": vision["hidden_size"] // vision["num_attention_heads"],
        },
        "text_cfg": {
            "context_length": text["max_position_embeddings"],
            "vocab_size": text["vocab_size"],
            "width": text["hidden_size"],
            "heads": text["num_attention_heads"],
            "layers": text["num_hidden_layers"],
        },
    }
    parse_config(cfg)
    return cfg
