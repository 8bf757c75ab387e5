"""Check, decode, resize and re-encode one downloaded image, with img2dataset's semantics.

`ImageProcessor.probe(data)` reads only the header (`pipeline/image_decode.py`): it rejects what is
not an image and what has more pixels than `data.max_pixels` (a decompression bomb) before any
pixel is decoded. `ImageProcessor.resize(probed)` then produces the stored image:

1. header checks: `too_small` (img2dataset's `min_image_size`), `too_large` (`max_image_area`, and
   `data.max_decoded_bytes` against the bytes the decode will allocate, so a small file that
   inflates to gigabytes is refused before it is decoded), `truncated_image` (a JPEG cut off
   before its end marker, a PNG without its IEND chunk, a WebP shorter than its RIFF header says);
2. decode to 8 bits: JPEGs (most of the web) at a reduced DCT scale (1/2, 1/4, 1/8: libjpeg-turbo's
   scaled IDCT through `simplejpeg`, the same pixels as OpenCV's `IMREAD_REDUCED_COLOR_*` for ~8%
   less CPU) when the target is at most that size, always to 3 channels; PNGs with Pillow (libpng
   under OpenCV prints its warnings to stderr), every other format with img2dataset's decoder
   (OpenCV `IMREAD_UNCHANGED`); first frame, EXIF orientation ignored as img2dataset ignores it,
   16-bit samples reduced to 8 and alpha matted on white as img2dataset mattes 8-bit images, in
   strips, so memory stays near the decoded image's own size (`image_decode.py`);
3. resize, blur (`data.bbox_col`), pad or crop, and encode exactly as img2dataset's `Resizer` modes
   do: albumentations' size rounding, the same interpolation choice, white border, the same
   encoder. For non-JPEG images the stored bytes are the Resizer's own wherever the Resizer is
   right (8-bit images; tests compare them byte for byte); JPEG pixels differ only by the
   DCT-domain pre-scaling.

Threads run all of this in parallel (OpenCV, simplejpeg and Pillow's decoders release the GIL).
`data.fast_jpeg_decode: false` sends JPEGs through img2dataset's own `Resizer` at full scale; its
decoder silences stdout/stderr by swapping the process's file descriptors, which is not
thread-safe, so those calls are serialised by a lock.

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

from pipeline import img2dataset_parts
from pipeline.config import DEFAULT_MAX_DECODED_BYTES
from pipeline.image_decode import ImageReject, Probed, decode_image, decode_jpeg, jpeg_is_cut, read_header

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
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
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
        self.max_decoded_bytes = max_decoded_bytes
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
        # OpenCV logs every image its decoders refuse to stderr, which Ray streams to the driver's
        # console; the reject's reason and detail already say it (img2dataset silences it too).
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)

    # --- header only
    def probe(self, data: bytes) -> Probed:
        probed = read_header(data)
        width, height = probed.width, probed.height
        if width <= 0 or height <= 0:
            raise ImageReject("decode_error", f"{probed.format} header says {width}x{height}")
        if width * height > self.max_pixels:
            raise ImageReject(
                "too_large", f"{width}x{height} = {width * height} pixels > data.max_pixels {self.max_pixels}"
            )
        return probed

    # --- decode + resize + encode
    def resize(self, probed: Probed, blur_boxes: Optional[list] = None) -> Resized:
        """blur_boxes: [x_min, y_min, x_max, y_max] boxes relative to the image, blurred as
        img2dataset blurs `bbox_col` boxes (after the resize, before padding or cropping)."""
        ow, oh = probed.width, probed.height
        jpeg = probed.format == "JPEG"
        if jpeg and jpeg_is_cut(probed.data):
            raise ImageReject(
                "truncated_image", f"JPEG without an end-of-image marker after its last scan ({len(probed.data)} bytes)"
            )
        if jpeg and not self.fast_jpeg_decode:
            self._check_decoded_bytes(probed, 1)
            return self._resize_with_img2dataset(probed, blur_boxes)
        self._check_size(ow, oh)
        target = self._target(ow, oh)
        tw, th = target[:2]
        if jpeg:
            # Largest DCT reduction whose output still covers the target (libjpeg rounds sizes up).
            reduce = next((s for s in (8, 4, 2) if ow // s >= tw and oh // s >= th), 1)
            self._check_decoded_bytes(probed, reduce)
            array = decode_jpeg(probed.data, reduce, ow, oh)
            if array is None:
                raise ImageReject("decode_error", f"OpenCV could not decode this {ow}x{oh} JPEG")
        else:
            reduce = 1
            self._check_decoded_bytes(probed, 1)
            array = decode_image(probed)
            if array.shape[:2] != (oh, ow):  # a decoder that disagrees with the header decides (img2dataset's)
                oh, ow = array.shape[:2]
                self._check_size(ow, oh)
                target = self._target(ow, oh)
        return self._resize_and_encode(array, ow, oh, reduce, target, blur_boxes)

    def _check_size(self, width: int, height: int) -> None:
        if min(width, height) < self.min_image_size:
            raise ImageReject("too_small", f"{width}x{height}: short side < data.min_image_size {self.min_image_size}")
        if width * height > self.max_image_area:
            raise ImageReject("too_large", f"{width}x{height}: area > data.max_image_area {self.max_image_area:g}")

    def _check_decoded_bytes(self, probed: Probed, reduce: int) -> None:
        need = probed.decoded_bytes(reduce)
        if need > self.max_decoded_bytes:
            scale = "" if reduce == 1 else f" at 1/{reduce} scale"
            raise ImageReject(
                "too_large",
                f"{probed.width}x{probed.height} {probed.format} decodes{scale} to {need} bytes "
                f"({probed.pixel_bytes} per pixel) > data.max_decoded_bytes {self.max_decoded_bytes}",
            )

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

    def _target(self, width: int, height: int) -> tuple[int, int, bool]:
        """(width, height) after img2dataset's resize of a width x height image (albumentations:
        each side rounded, at least 1), and whether the mode resizes, then pads or crops, at all."""
        scale = self._target_scale(width, height)
        if scale is None:
            return width, height, False
        if scale == 1.0:
            return width, height, True
        return max(1, round(width * scale)), max(1, round(height * scale)), True

    def _get_blurrer(self):
        """img2dataset's BoundingBoxBlurrer, one for both paths (made on first use)."""
        if self._blurrer is None:
            self._blurrer = img2dataset_parts.blurrer_class()()
        return self._blurrer

    def _blur(self, array: np.ndarray, boxes: list) -> np.ndarray:
        with _quiet_albumentations():
            return self._get_blurrer()(img=array, bbox_list=boxes)

    def _resize_and_encode(
        self,
        array: np.ndarray,
        ow: int,
        oh: int,
        reduce: int,
        target: tuple[int, int, bool],
        blur_boxes: Optional[list] = None,
    ) -> Resized:
        """array: the ow x oh image decoded at 1/reduce scale, uint8 [H, W, 3] BGR or [H, W] gray;
        target: `_target(ow, oh)`."""
        tw, th, pad_or_crop = target
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
        if pad_or_crop:
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
