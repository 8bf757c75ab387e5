"""Tiny eval sets in CLIP_benchmark's `wds_*` layout, written with the `webdataset` package's own
TarWriter (the format's reference writer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from tests.support.image_samples import encode, smooth

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEMPLATES = ["a photo of a {c}.", "a {c} thing."]
# Image member per sample, cycling: CLIP_benchmark reads webp, png, jpg and jpeg.
FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"))


def tinted(color: str, seed: int, size=(48, 40)) -> Image.Image:
    """A photo-like image leaning to one of COLORS: distinct per seed, so retrieval has no ties."""
    texture = smooth(size[1], size[0], seed=seed).astype(np.float32)
    arr = 0.6 * np.array(COLORS[color], np.float32) + 0.4 * texture
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_wds_set(
    root: Path,
    kind: str = "classification",
    per_class: int = 4,
    shards: int = 2,
    nshards_file: bool = True,
    extra_samples: Optional[list[dict]] = None,
) -> list[dict]:
    """root/test/{0..shards-1}.tar + metadata; returns the samples written (key, label or captions, image)."""
    from webdataset import TarWriter

    (root / "test").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(per_class):
        for label, color in enumerate(COLORS):
            n = len(samples)
            ext, fmt = FORMATS[n % len(FORMATS)]
            kw = {"quality": 95} if fmt != "PNG" else {}
            sample = {"__key__": f"s{n:05d}", ext: encode(tinted(color, seed=n), fmt, **kw)}
            if kind == "retrieval":
                sample["txt"] = f"a {color} picture number {i}\nphoto {n}, mostly {color}"  # distinct: no ties
            else:
                sample["cls"] = str(label).encode()
            samples.append(sample)
    samples.extend(extra_samples or [])
    for s in range(shards):
        with TarWriter(str(root / "test" / f"{s}.tar")) as sink:
            for sample in samples[s::shards]:
                sink.write(sample)
    if nshards_file:
        (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    if kind == "retrieval":
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("".join(f"{c}\n" for c in COLORS))
        (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    return samples
