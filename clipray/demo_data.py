"""The demo's own data set: procedurally drawn shapes with captions written from templates.

Every image shows one shape of one colour, size and position on a varied, noisy background, so
that a small CLIP can learn colour and shape from captions in minutes on a CPU, and a held-out
split (drawn with other random seeds) measures zero-shot accuracy on images training never saw.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.34, "large": 0.6}  # shape extent as a fraction of the image side
POSITIONS = {  # centre of the shape as fractions of the image side
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "there is a {size} {color} {shape} {where}",
    "a {color} {shape}, {size}, {where}",
    "{where_cap}, a {size} {color} {shape}",
    "a picture of a {size} {color} {shape}",
    "a {color} {shape}",
)
BAD_URLS = {
    # path -> what the demo server answers; each must end as a reject with a reason.
    "missing.jpg": "404",
    "not-an-image.jpg": "html",
    "truncated.jpg": "truncated",
}


@dataclass(frozen=True)
class Sample:
    key: str
    color: str
    shape: str
    size: str
    position: str
    caption: str
    seed: int


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r * 0.85
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        scale = r * 1.1
    elif shape == "star":
        pts = [
            (
                (1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
        scale = r * 1.1
    elif shape == "cross":
        w = 0.34
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
        scale = r
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def draw_image(sample: Sample, side: int = 96) -> Image.Image:
    """One RGB image [side, side] of `sample`, deterministic in `sample.seed`."""
    rng = np.random.default_rng(sample.seed)
    # Background: a low-saturation gradient between two greys/pastels, never close to a shape colour.
    base = rng.uniform(60, 230, size=3)
    tint = base + rng.uniform(-25, 25, size=3)
    a, b = base.mean() + (base - base.mean()) * 0.15, tint.mean() + (tint - tint.mean()) * 0.15
    t = np.linspace(0.0, 1.0, side)[None, :, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, side)[:, None, None]
    bg = a[None, None, :] * (1 - t) + b[None, None, :] * t
    bg = np.broadcast_to(bg, (side, side, 3)).copy()
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[sample.position]
    cx = (fx + rng.uniform(-0.05, 0.05)) * side
    cy = (fy + rng.uniform(-0.05, 0.05)) * side
    r = SIZES[sample.size] * side / 2 * rng.uniform(0.9, 1.1)
    colour = tuple(int(np.clip(v + rng.uniform(-20, 20), 0, 255)) for v in COLORS[sample.color])
    if sample.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_shape_polygon(sample.shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=colour)

    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(3, 10), size=(side, side, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _caption(rng: np.random.Generator, color: str, shape: str, size: str, position: str) -> str:
    where = POSITION_PHRASES[position]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(size=size, color=color, shape=shape, where=where, where_cap=where[0].upper() + where[1:])


def make_samples(split: str, copies: int, seed: int) -> list[Sample]:
    """Every colour x shape x size x position combination, `copies` times, each with its own seed."""
    rng = np.random.default_rng(seed)
    samples = []
    combos = itertools.product(COLORS, SHAPES, SIZES, POSITIONS, range(copies))
    for i, (color, shape, size, position, _) in enumerate(combos):
        samples.append(
            Sample(
                key=f"{split}-{i:05d}",
                color=color,
                shape=shape,
                size=size,
                position=position,
                caption=_caption(rng, color, shape, size, position),
                seed=int(rng.integers(2**31)),
            )
        )
    return samples


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_split(
    samples: list[Sample], image_dir: Path, base_url: str, list_path: Path, side: int = 96, bad_urls: bool = False
) -> int:
    """Draw `samples` into `image_dir` and write their URL list (parquet) to `list_path`.

    The list has columns url, caption, color, shape, size, position. With `bad_urls`, the demo's
    deliberately broken URLs are appended (their labels empty) so that the rejects path shows.
    Returns the number of rows written.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {k: [] for k in ("url", "caption", "color", "shape", "size", "position")}
    for s in samples:
        name = f"{s.key}.jpg"
        (image_dir / name).write_bytes(encode_jpeg(draw_image(s, side)))
        for col, value in (
            ("url", f"{base_url}/{image_dir.name}/{name}"),
            ("caption", s.caption),
            ("color", s.color),
            ("shape", s.shape),
            ("size", s.size),
            ("position", s.position),
        ):
            rows[col].append(value)
    if bad_urls:
        good = encode_jpeg(draw_image(samples[0], side))
        (image_dir / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (image_dir / "not-an-image.jpg").write_text("<html><body>this is not an image</body></html>")
        for name in BAD_URLS:
            rows["url"].append(f"{base_url}/{image_dir.name}/{name}")
            rows["caption"].append(f"a broken link: {name}")
            for col in ("color", "shape", "size", "position"):
                rows[col].append("")
    list_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), list_path)
    return len(rows["url"])
