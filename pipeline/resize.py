"""Decode, check, resize and re-encode one downloaded image, with img2dataset's semantics.

`ImageProcessor.probe(data)` reads only the header (format and size): it rejects what is not an
image and what has more pixels than `data.max_pixels` (a decompression bomb) before any pixel is
decoded. `ImageProcessor.resize(probed)` then produces the stored image:

- non-JPEG images (PNG with alpha, WebP, GIF, ...) go through img2dataset's own `Resizer` (resize
  modes, min size, max area, alpha matting on white, encode format and quality); its error strings
  are mapped to stable reason codes. Its decoder silences stdout/stderr by swapping the process's
  file descriptors, which is not thread-safe, so calls are serialised by a lock (CPU parallelism
  comes from several download actors; the lock only orders this actor's threads).
- JPEGs (most of the web) take a faster path with the same output geometry: they are decoded at a
  reduced DCT scale (1/2, 1/4, 1/8: libjpeg-turbo's scaled IDCT) when the target is at most that
  size, always to 3 channels, then resized, padded or cropped and encoded exactly as img2dataset's
  resize modes do. The decoder is TurboJPEG through `simplejpeg` (the same pixels as OpenCV's
  `IMREAD_REDUCED_COLOR_*` for ~8% less CPU on 512x384 photos at 1/2 scale); CMYK/YCCK JPEGs and
  those libjpeg reads only with warnings go to OpenCV's decoder. Same output size, same padding,
  same encoder; pixels differ only by the DCT-domain pre-scaling. A JPEG cut off before its end
  marker is rejected as `truncated_image` (libjpeg would pad it with grey). Threads run this path
  in parallel (simplejpeg and OpenCV release the GIL). `data.fast_jpeg_decode: false` sends JPEGs
  through `Resizer` too.

Every output is 8-bit, 3-channel (RGB content, OpenCV encodes BGR arrays) except where img2dataset
keeps a grayscale non-JPEG image grayscale.
"""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline import img2dataset_parts

# Our own cap (`max_pixels`) replaces Pillow's process-wide one, which would warn or raise at
# fixed sizes from inside `Image.open`.
Image.MAX_IMAGE_PIXELS = None

_INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
    "lanczos4": cv2.INTER_LANCZOS4,
}

# JPEG decode flags by DCT reduction: always 3-channel BGR (CMYK and grayscale converted), and
# EXIF orientation ignored as img2dataset's IMREAD_UNCHANGED does.
_JPEG_FLAGS = {
    1: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}

# img2dataset Resizer error string -> (reason, stage)
_RESIZER_ERRORS = {
    "image too small": ("too_small", "decode"),
    "image area too large": ("too_large", "decode"),
    "aspect ratio too large": ("aspect_ratio", "decode"),
    "image decoding error": ("decode_error", "decode"),
}


@contextmanager
def _quiet_albumentations():
    """albumentations 1.4 warns that img2dataset's PadIfNeeded(value=...) and
    GaussianBlur(always_apply=...) are deprecated; those calls are img2dataset's, not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _decode_jpeg(data: bytes, reduce: int, width: int, height: int) -> Optional[np.ndarray]:
    """A width x height JPEG decoded at 1/reduce scale (libjpeg's size: each side rounded up) to
    3-channel BGR, EXIF orientation ignored (as img2dataset's IMREAD_UNCHANGED); None if unreadable.

    TurboJPEG (simplejpeg) first: asked for at least the 1/reduce size with a factor of at least
    `reduce`, the only scale it can pick is 1/reduce. CMYK/YCCK images (rare; the colour
    conversion stays the one img2dataset's OpenCV decoder applies) and JPEGs it refuses (strict:
    libjpeg warnings such as corrupt data) are decoded by OpenCV, as before."""
    size = (-(-height // reduce), -(-width // reduce))
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in ("CMYK", "YCCK"):
            array = simplejpeg.decode_jpeg(data, "BGR", min_height=size[0], min_width=size[1], min_factor=reduce)
            if array.shape[:2] == size:  # else its header disagrees with ours: let OpenCV decide
                return array
    except ValueError:
        pass
    return cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_FLAGS[reduce])


class ImageReject(Exception):
    """The image cannot be stored: `reason` is a stable code, `stage` where it was decided."""

    def __init__(self, reason: str, detail: str, stage: str = "decode"):
        super().__init__(detail)
        self.reason, self.detail, self.stage = reason, detail, stage


@dataclass
class Probed:
    data: bytes
    format: str  # Pillow's name: JPEG, PNG, WEBP, GIF, ...
    width: int
    height: int


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a JPEG's frame header, walking the marker segments; None if absent."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF_MARKERS:
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        i += 2 + length
    return None


def sniff(data: bytes) -> Optional[tuple[str, int, int]]:
    """(format, width, height) for JPEG and PNG without Pillow (tens of microseconds less)."""
    if data[:3] == b"\xff\xd8\xff":
        size = jpeg_size(data)
        return ("JPEG", *size) if size else None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return "PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


@dataclass
class Resized:
    data: bytes  # encoded in data.encode_format
    width: int
    height: int
    original_width: int
    original_height: int


class ImageProcessor:
    """One per download actor; `probe` and `resize` are safe to call from many threads."""

    def __init__(
        self,
        *,
        image_size: int = 256,
        resize_mode: str = "border",
        resize_only_if_bigger: bool = False,
        upscale_interpolation: str = "lanczos",
        downscale_interpolation: str = "area",
        encode_format: str = "jpg",
        encode_quality: int = 95,
        min_image_size: int = 0,
        max_image_area: Optional[float] = None,
        max_pixels: int = 89_478_485,
        fast_jpeg_decode: bool = True,
    ):
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.resize_only_if_bigger = resize_only_if_bigger
        self.upscale = _INTERPOLATIONS[upscale_interpolation]
        self.downscale = _INTERPOLATIONS[downscale_interpolation]
        self.encode_format = encode_format
        self.min_image_size = min_image_size
        self.max_image_area = float("inf") if max_image_area is None else max_image_area
        self.max_pixels = max_pixels
        self.fast_jpeg_decode = fast_jpeg_decode
        if encode_format == "jpg":
            self.encode_params = [int(cv2.IMWRITE_JPEG_QUALITY), encode_quality]
        elif encode_format == "png":
            self.encode_params = [int(cv2.IMWRITE_PNG_COMPRESSION), encode_quality]
        else:
            self.encode_params = [int(cv2.IMWRITE_WEBP_QUALITY), encode_quality]
        self._resizer_args = dict(
            image_size=image_size,
            resize_mode=resize_mode,
            resize_only_if_bigger=resize_only_if_bigger,
            upscale_interpolation=upscale_interpolation,
            downscale_interpolation=downscale_interpolation,
            encode_quality=encode_quality,
            encode_format=encode_format,
            min_image_size=min_image_size,
            max_image_area=self.max_image_area,
        )
        self._resizer = None  # made on first use: loading it imports albumentations (~2 s)
        self._blurrer = None  # likewise
        self._resizer_lock = threading.Lock()
        cv2.setNumThreads(1)  # parallelism comes from threads and actors, not from OpenCV

    # --- header only
    def probe(self, data: bytes) -> Probed:
        if not data:
            raise ImageReject("not_an_image", "empty response body")
        sniffed = sniff(data)
        if sniffed is not None:
            return self._checked(data, *sniffed)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            head = data[:64].lstrip().lower()
            kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else f"{len(data)} bytes"
            raise ImageReject("not_an_image", f"not an image format Pillow can read ({kind})") from None
        except Exception as exc:  # noqa: BLE001 - a broken header is a decode problem, not a crash
            raise ImageReject("decode_error", f"unreadable image header: {type(exc).__name__}: {exc}") from None
        return self._checked(data, image.format or "", *image.size)

    def _checked(self, data: bytes, fmt: str, width: int, height: int) -> Probed:
        if width <= 0 or height <= 0:
            raise ImageReject("decode_error", f"{fmt} header says {width}x{height}")
        if width * height > self.max_pixels:
            raise ImageReject(
                "too_large", f"{width}x{height} = {width * height} pixels > data.max_pixels {self.max_pixels}"
            )
        return Probed(data=data, format=fmt, width=width, height=height)

    # --- decode + resize + encode
    def resize(self, probed: Probed, blur_boxes: Optional[list] = None) -> Resized:
        """blur_boxes: [x_min, y_min, x_max, y_max] boxes relative to the image, blurred as
        img2dataset blurs `bbox_col` boxes (after the resize, before padding or cropping)."""
        if self.fast_jpeg_decode and probed.format == "JPEG":
            return self._resize_jpeg(probed, blur_boxes)
        return self._resize_with_img2dataset(probed, blur_boxes)

    def _resize_with_img2dataset(self, probed: Probed, blur_boxes: Optional[list] = None) -> Resized:
        with self._resizer_lock:
            if self._resizer is None:
                self._resizer = img2dataset_parts.resizer_class()(**self._resizer_args, blurrer=self._get_blurrer())
            with _quiet_albumentations():
                out, width, height, ow, oh, err = self._resizer(io.BytesIO(probed.data), blur_boxes)
        if err is not None:
            reason, stage = _RESIZER_ERRORS.get(err.strip().lower(), ("decode_error", "decode"))
            raise ImageReject(reason, f"img2dataset Resizer: {err}", stage)
        return Resized(out, int(width), int(height), int(ow), int(oh))

    def _target_scale(self, width: int, height: int) -> Optional[float]:
        """The resize factor img2dataset's mode applies to a width x height image (None: no resize)."""
        mode = self.resize_mode
        if mode in ("keep_ratio", "center_crop"):
            side = min(width, height)
        elif mode in ("border", "keep_ratio_largest"):
            side = max(width, height)
        else:
            return None
        downscale = side > self.image_size
        if self.resize_only_if_bigger and not downscale:
            return None
        return self.image_size / side

    def _get_blurrer(self):
        """img2dataset's BoundingBoxBlurrer, one for both paths (made on first use)."""
        if self._blurrer is None:
            self._blurrer = img2dataset_parts.blurrer_class()()
        return self._blurrer

    def _blur(self, array: np.ndarray, boxes: list) -> np.ndarray:
        with _quiet_albumentations():
            return self._get_blurrer()(img=array, bbox_list=boxes)

    def _resize_jpeg(self, probed: Probed, blur_boxes: Optional[list] = None) -> Resized:
        ow, oh = probed.width, probed.height
        if min(ow, oh) < self.min_image_size:
            raise ImageReject("too_small", f"{ow}x{oh}: short side < data.min_image_size {self.min_image_size}")
        if ow * oh > self.max_image_area:
            raise ImageReject("too_large", f"{ow}x{oh}: area > data.max_image_area {self.max_image_area:g}")
        data = probed.data
        # Entropy-coded data never contains FF D9 (0xFF is stuffed), so a JPEG whose last scan has
        # no end-of-image marker after it was cut off; libjpeg would pad it with grey silently.
        if (
            data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0
            and data.find(b"\xff\xd9", max(0, data.rfind(b"\xff\xda"))) < 0
        ):
            raise ImageReject(
                "truncated_image", f"JPEG without an end-of-image marker after its last scan ({len(data)} bytes)"
            )
        scale = self._target_scale(ow, oh)
        # The size img2dataset's transform gives (albumentations: round each side, at least 1).
        if scale is not None and scale != 1.0:
            th, tw = max(1, round(oh * scale)), max(1, round(ow * scale))
        else:
            th, tw = oh, ow
        # Largest DCT reduction whose output still covers the target (libjpeg rounds sizes up).
        reduce = next((s for s in (8, 4, 2) if ow // s >= tw and oh // s >= th), 1)
        array = _decode_jpeg(data, reduce, ow, oh)
        if array is None:
            raise ImageReject("decode_error", f"OpenCV could not decode this {ow}x{oh} JPEG")
        if array.shape[:2] != (th, tw):
            downscale = array.shape[0] > th or array.shape[1] > tw
            interpolation = self.downscale if downscale else self.upscale
            if reduce == 1:
                array = cv2.resize(array, (tw, th), interpolation=interpolation)
            else:
                # libjpeg rounds the reduced size up (ceil(w / s)), so its last row/column is only
                # partly image. Scale by the exact factor of the image part (fx, fy), not by the
                # array's size, and cut the rounding remainder: same geometry as a full decode.
                array = cv2.resize(array, None, fx=tw * reduce / ow, fy=th * reduce / oh, interpolation=interpolation)[
                    :th, :tw
                ]
        if blur_boxes:
            array = self._blur(array, blur_boxes)
        if scale is not None:
            array = self._pad_or_crop(array)
        ok, encoded = cv2.imencode(f".{self.encode_format}", array, params=self.encode_params)
        if not ok:
            raise ImageReject("decode_error", f"OpenCV could not encode a {array.shape} image as {self.encode_format}")
        return Resized(encoded.tobytes(), int(array.shape[1]), int(array.shape[0]), ow, oh)

    def _pad_or_crop(self, array: np.ndarray) -> np.ndarray:
        size = self.image_size
        h, w = array.shape[:2]
        if self.resize_mode == "border" and (h < size or w < size):
            top, left = max(0, size - h) // 2, max(0, size - w) // 2
            bottom, right = max(0, size - h) - top, max(0, size - w) - left
            array = cv2.copyMakeBorder(array, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        elif self.resize_mode == "center_crop" and (h > size or w > size):
            top, left = max(0, h - size) // 2, max(0, w - size) // 2
            array = array[top : top + min(h, size), left : left + min(w, size)]
        return array
