"""Runs under the oracle interpreter ($CLIPRAY_ORACLE_PYTHON: open_clip 3.3.0, transformers 5.x) through
`tests.support.oracle.run_oracle`; never imported by the project's tests. Each mode loads or writes a model directory with the library's own
API and writes the features it computes, with its own preprocessing and tokenizer, to an .npz file.

    python oracle_interop.py JOBS_JSON

JOBS_JSON: {"images": folder of PNGs (read in name order), "captions": [...], "jobs": [{"mode",
"model_dir", "out", "spec"}]}, all jobs in one process (the libraries import once). mode:
open_clip_load | hf_load | open_clip_save | hf_save. The *_save modes build a fresh model from
`spec` ({"model_cfg"} for open_clip; {"hf_config", "tokenizer_dir"} for transformers), seed 0,
and write it with the library's own save path first. `spec.backend`: HF image processor backend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _images(folder: str) -> list[Image.Image]:
    return [Image.open(p) for p in sorted(Path(folder).glob("*.png"))]


def _open_clip_features(model_dir: str, images, captions) -> dict:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    tokens = tokenizer(captions)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text = model.encode_text(tokens)
    return {"image": image.numpy(), "text": text.numpy(), "tokens": tokens.numpy(), "scale": model.logit_scale.item()}


def _projected(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is projected; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_features(model_dir: str, images, captions, backend: str) -> dict:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir, backend=backend)
    length = model.config.text_config.max_position_embeddings
    inputs = processor(
        text=captions, images=images, return_tensors="pt", padding="max_length", truncation=True, max_length=length
    )
    with torch.no_grad():
        image = _projected(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _projected(
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
    return {
        "image": image.numpy(),
        "text": text.numpy(),
        "tokens": inputs["input_ids"].numpy(),
        "scale": model.logit_scale.item(),
    }


def _open_clip_save(model_dir: str, spec: dict) -> None:
    import open_clip
    import safetensors.torch
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf

    torch.manual_seed(0)
    cfg = spec["model_cfg"]
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "oracle-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder.parent / "oracle-tiny-vit.json")
    model = open_clip.create_model("oracle-tiny-vit")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    # open_clip's save_for_hf without its tokenizer step (CLIP's BPE tokenizer has no files to save).
    safetensors.torch.save_file(model.state_dict(), folder / HF_SAFE_WEIGHTS_NAME)
    save_config_for_hf(model, folder / HF_CONFIG_NAME, model_config=cfg)


def _hf_save(model_dir: str, spec: dict) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(**spec["hf_config"])
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tokenizer = CLIPTokenizer.from_pretrained(spec["tokenizer_dir"])
    model.save_pretrained(model_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)


def run_job(mode: str, model_dir: str, out: str, spec: dict, images, captions) -> None:
    if mode == "open_clip_save":
        _open_clip_save(model_dir, spec)
    elif mode == "hf_save":
        _hf_save(model_dir, spec)
    if mode.startswith("open_clip"):
        result = _open_clip_features(model_dir, images, captions)
    else:
        result = _hf_features(model_dir, images, captions, spec.get("backend", "pil"))
    np.savez(out, **result)


def main() -> None:
    doc = json.loads(Path(sys.argv[1]).read_text())
    images = _images(doc["images"])
    for job in doc["jobs"]:
        run_job(job["mode"], job["model_dir"], job["out"], job.get("spec", {}), images, doc["captions"])
    print(json.dumps({"jobs": len(doc["jobs"])}))


if __name__ == "__main__":
    main()
