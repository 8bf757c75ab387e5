"""Images for the decoding tests, built in memory: photo-like arrays, one of every format and
mode the pipeline meets, 16-bit PNGs, and img2dataset's alpha matting as the oracle computes it."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.resize import ImageProcessor, ImageReject, Resized


def smooth(height: int, width: int, channels: int = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """A photo-like array (a coarse random grid upsampled bicubically), full range of `dtype`."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    coarse = rng.integers(0, top + 1, (4, 5, channels)).astype(np.float32)
    big = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)
    return np.clip(big, 0, top).astype(dtype)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def rgba_image(width: int = 70, height: int = 50, seed: int = 0) -> Image.Image:
    """Colours with an alpha ramp from transparent (left) to opaque (right) and a fully
    transparent and a fully opaque block."""
    rgba = smooth(height, width, 4, seed)
    rgba[..., 3] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    rgba[: height // 4, : width // 4, 3] = 0
    rgba[-height // 4 :, -width // 4 :, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def palette_image(width: int = 70, height: int = 50) -> Image.Image:
    return Image.fromarray(smooth(height, width, 3, seed=5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)


def png16(rgb_or_rgba: np.ndarray) -> bytes:
    """A 16-bit PNG from an RGB(A) uint16 array (OpenCV writes BGR(A) order)."""
    order = [2, 1, 0, 3][: rgb_or_rgba.shape[2]]
    return cv2.imencode(".png", rgb_or_rgba[..., order])[1].tobytes()


def matte(rgba: np.ndarray) -> np.ndarray:
    """img2dataset's alpha matting on white (float64, then rint), on an 8-bit [H, W, 4] RGBA array."""
    alpha = rgba[..., 3:4]
    return np.rint((alpha / 255 * rgba[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)


EIGHT_BIT = {
    "png_rgb": lambda: encode(Image.fromarray(smooth(50, 70)), "PNG"),
    "png_rgba": lambda: encode(rgba_image(), "PNG"),
    "png_gray": lambda: encode(Image.fromarray(smooth(50, 70, 1)[..., 0]), "PNG"),
    "png_1bit": lambda: encode(Image.fromarray(smooth(50, 70, 1)[..., 0]).convert("1"), "PNG"),
    "png_palette": lambda: encode(palette_image(), "PNG"),
    "png_palette_trns": lambda: encode(palette_image(), "PNG", transparency=3),
    "png_gray_alpha": lambda: encode(rgba_image().convert("LA"), "PNG"),
    "gif": lambda: encode(palette_image(), "GIF"),
    "gif_transparent": lambda: encode(palette_image(), "GIF", transparency=3),
    "webp_rgba": lambda: encode(rgba_image(), "WEBP", lossless=True),
    "webp_rgb_lossy": lambda: encode(Image.fromarray(smooth(50, 70)), "WEBP", quality=80),
    "bmp": lambda: encode(Image.fromarray(smooth(50, 70)), "BMP"),
    "tiff_rgb": lambda: encode(Image.fromarray(smooth(50, 70)), "TIFF"),
    "tiff_cmyk": lambda: encode(Image.fromarray(smooth(50, 70)).convert("CMYK"), "TIFF"),
}


def process(data: bytes, boxes=None, **kw) -> Resized:
    """What the pipeline stores for `data` (ImageProcessor's keyword arguments in kw)."""
    p = ImageProcessor(**kw)
    return p.resize(p.probe(data), boxes)


def reject(data: bytes, **kw) -> ImageReject:
    """The rejection the pipeline gives `data` (fails the test when it is stored instead)."""
    with pytest.raises(ImageReject) as info:
        process(data, **kw)
    return info.value
