"""Read one downloaded image's header, then decode it to an 8-bit array in bounded memory.

`read_header(data)` reads only the header (format, size, and how many bytes per pixel the decoder
will hold): JPEG and PNG by hand (tens of microseconds), anything else with Pillow. From it
`Probed.decoded_bytes()` gives the size of the decoded image, so the caller can refuse an image
before any pixel is decoded (`data.max_decoded_bytes`).

Decoders:
- JPEG (`decode_jpeg`, the fast path): TurboJPEG (simplejpeg) at a reduced DCT scale; OpenCV for
  CMYK/YCCK and for JPEGs libjpeg reads only with warnings.
- PNG: Pillow. libpng, under OpenCV, prints its warnings and errors straight to the process's
  stderr (`libpng warning: iCCP: known incorrect sRGB profile` is common on the web), which Ray
  streams to the driver's console for every such image; img2dataset hides them by swapping file
  descriptors, which is not thread-safe. Pillow's reader raises instead, holds 16-bit RGB(A) as
  8-bit, and decodes the same pixels (PNG is lossless). OpenCV decodes what Pillow refuses (a bad
  CRC in an ancillary chunk, which libpng reads with a warning).
- anything else: OpenCV's `IMREAD_UNCHANGED`, img2dataset's decoder (first frame of an animated
  GIF/WebP, EXIF orientation ignored, palettes expanded, CMYK TIFFs converted); Pillow where
  OpenCV has no reader (ICO, ...).

What comes out is turned into what img2dataset stores (`to_8bit`): 16-bit samples keep their high
byte (as libpng's `strip_16` and Pillow's 16-bit RGB(A) decoding); alpha is matted on white with
img2dataset's formula `rint(a/255*c + 255 - a)`, exactly; grayscale stays grayscale (img2dataset
keeps it so), colour is BGR (OpenCV's order).

Memory: the conversion runs row strip by row strip (`STRIP_PIXELS`), so a decode holds the decoded
image, the 8-bit output (at most 3 bytes per pixel) and a few strips: the 9459x9459 RGBA PNG of
issue 15 peaks at ~0.7 GB in a fresh process (tests/test_pipeline_image_decode.py), where
img2dataset's float64 matting took 6.7 GB. OpenCV's own decoders hold up to a second copy while
they decode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# Our own caps (`max_pixels`, `max_decoded_bytes`) replace Pillow's process-wide one, which would
# warn or raise at fixed sizes from inside `Image.open`.
Image.MAX_IMAGE_PIXELS = None

# JPEG decode flags by DCT reduction: always 3-channel BGR (CMYK and grayscale converted), and
# EXIF orientation ignored as img2dataset's IMREAD_UNCHANGED does.
JPEG_FLAGS = {
    1: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}

# Pixels per strip of `to_8bit`'s work: a 256 KiB BGRA strip keeps its temporaries in the CPU's
# cache (matting a 9459x9459 RGBA image: 0.29 s of CPU, against 1.3-1.5 s with 1M-pixel strips).
STRIP_PIXELS = 1 << 16

# PNG colour type -> bytes per pixel Pillow holds (gray "L", palette "P", the rest 4 bytes: RGB is
# stored as RGBX, LA as 4 bands; 16-bit colour is read as 8-bit, 16-bit gray as "I;16").
_PNG_PIXEL_BYTES = {0: 1, 2: 4, 3: 1, 4: 4, 6: 4}

# Pillow mode -> bytes per pixel, the larger of OpenCV's array (BGRA for alpha, palettes and CMYK,
# BGR for colour) and Pillow's storage (4 bytes for any mode of several bands); 4 for the others.
_MODE_PIXEL_BYTES = {"1": 1, "L": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Formats whose Pillow mode does not tell the sample width OpenCV decodes to (10/12-bit AVIF and
# JPEG 2000 come back as 16-bit): counted as 2 bytes per sample.
_DEEP_FORMATS = frozenset({"AVIF", "JPEG2000", "HEIF"})

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole 12-byte chunk: length 0, type, CRC


class ImageReject(Exception):
    """The image cannot be stored: `reason` is a stable code, `stage` where it was decided."""

    def __init__(self, reason: str, detail: str, stage: str = "decode"):
        super().__init__(detail)
        self.reason, self.detail, self.stage = reason, detail, stage


@dataclass
class Probed:
    """An image's header; `pixel_bytes`: bytes per pixel of the image its decoder holds (an upper
    bound where the header does not tell, e.g. 4 for any alpha or palette outside PNG)."""

    data: bytes
    format: str  # Pillow's name: JPEG, PNG, WEBP, GIF, ...
    width: int
    height: int
    pixel_bytes: int = 3  # JPEG: 3-channel BGR, whatever the file's colour space

    def decoded_bytes(self, reduce: int = 1) -> int:
        """Bytes of the decoded image at 1/reduce scale (each side rounded up, as libjpeg does)."""
        return -(-self.width // reduce) * -(-self.height // reduce) * self.pixel_bytes


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


def sniff(data: bytes) -> Optional[Probed]:
    """The header of a JPEG or PNG without Pillow (tens of microseconds less); None otherwise.
    A JPEG decodes to 3 channels of 8 bits (grayscale and CMYK converted); a PNG's IHDR gives the
    colour type and bit depth, hence what Pillow holds."""
    if data[:3] == b"\xff\xd8\xff":
        size = jpeg_size(data)
        return Probed(data, "JPEG", *size) if size else None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        depth, colour = data[24], data[25]
        pixel_bytes = 2 if (colour, depth) == (0, 16) else _PNG_PIXEL_BYTES.get(colour, 4)
        return Probed(data, "PNG", width, height, pixel_bytes)
    return None


def read_header(data: bytes) -> Probed:
    """The header of any image Pillow can identify; `not_an_image` or `decode_error` otherwise."""
    if not data:
        raise ImageReject("not_an_image", "empty response body")
    sniffed = sniff(data)
    if sniffed is not None:
        return sniffed
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), mode = image.format or "", image.size, image.mode
            bits = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample: 16-bit RGB is mode "RGB"
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else f"{len(data)} bytes"
        raise ImageReject("not_an_image", f"not an image format Pillow can read ({kind})") from None
    except Exception as exc:  # noqa: BLE001 - a broken header is a decode problem, not a crash
        cut = _cut_off(data, "WEBP" if data[8:12] == b"WEBP" else "")  # Pillow reads a WebP whole to open it
        if cut is not None:
            raise ImageReject("truncated_image", cut) from None
        raise ImageReject("decode_error", f"unreadable image header: {type(exc).__name__}: {exc}") from None
    pixel_bytes = _MODE_PIXEL_BYTES.get(mode, 4)
    sample_bytes = 2 if fmt in _DEEP_FORMATS else 1
    if bits is not None:
        sample_bytes = max(sample_bytes, -(-max(bits if isinstance(bits, tuple) else (bits,)) // 8))
    if sample_bytes > 1:  # OpenCV's array: 1 or 4 channels (BGRA covers BGR) of that width
        pixel_bytes = max(pixel_bytes, (1 if Image.getmodebands(mode) == 1 else 4) * sample_bytes)
    return Probed(data, fmt, width, height, pixel_bytes)


def jpeg_is_cut(data: bytes) -> bool:
    """True when a JPEG has no end-of-image marker after its last scan: it was cut off, and
    libjpeg would pad it with grey silently. Entropy-coded data never contains FF D9 (0xFF is
    stuffed), so the marker's absence is proof."""
    return (
        data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0
        and data.find(b"\xff\xd9", max(0, data.rfind(b"\xff\xda"))) < 0
    )


def decode_jpeg(data: bytes, reduce: int, width: int, height: int) -> Optional[np.ndarray]:
    """A width x height JPEG decoded at 1/reduce scale (libjpeg's size: each side rounded up) to
    3-channel BGR uint8 [H, W, 3], EXIF orientation ignored (as img2dataset's IMREAD_UNCHANGED);
    None if unreadable.

    TurboJPEG (simplejpeg) first: asked for at least the 1/reduce size with a factor of at least
    `reduce`, the only scale it can pick is 1/reduce. CMYK/YCCK images (rare; the colour
    conversion stays the one img2dataset's OpenCV decoder applies) and JPEGs it refuses (strict:
    libjpeg warnings such as corrupt data) are decoded by OpenCV."""
    size = (-(-height // reduce), -(-width // reduce))
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in ("CMYK", "YCCK"):
            array = simplejpeg.decode_jpeg(data, "BGR", min_height=size[0], min_width=size[1], min_factor=reduce)
            if array.shape[:2] == size:  # else its header disagrees with ours: let OpenCV decide
                return array
    except ValueError:
        pass
    return cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[reduce])


def _cut_off(data: bytes, fmt: str) -> Optional[str]:
    """Why a PNG or WebP is visibly cut off before its end (None when it is not), so it is
    rejected as `truncated_image` without a decode attempt."""
    if fmt == "PNG" and data.rfind(_PNG_IEND) < 0:
        return f"PNG without its IEND chunk ({len(data)} bytes)"
    if fmt == "WEBP" and data[:4] == b"RIFF":
        declared = 8 + int.from_bytes(data[4:8], "little")
        if declared > len(data):
            return f"WebP declares {declared} bytes, {len(data)} arrived"
    return None


def decode_image(probed: Probed) -> np.ndarray:
    """Any non-JPEG image as uint8 BGR [H, W, 3], or gray [H, W] for a grayscale image without
    alpha; its first frame when animated. Rejects `truncated_image` or `decode_error`.

    PNG: Pillow first, OpenCV for what Pillow refuses and libpng reads with a warning (a bad CRC
    in an ancillary chunk: img2dataset stores those); the others: OpenCV first, Pillow for what
    OpenCV has no reader for."""
    cut = _cut_off(probed.data, probed.format)
    if cut is not None:
        raise ImageReject("truncated_image", cut)
    if probed.format == "PNG":
        try:
            return _decode_with_pillow(probed)
        except ImageReject as rej:
            array = _decode_with_opencv(probed.data) if rej.reason == "decode_error" else None
            if array is None:
                raise
            return to_8bit(array, probed.format)
    array = _decode_with_opencv(probed.data)
    return _decode_with_pillow(probed) if array is None else to_8bit(array, probed.format)


def _decode_with_opencv(data: bytes) -> Optional[np.ndarray]:
    """img2dataset's decoder: the first frame, as it is stored (uint8/uint16, 1-4 channels)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _decode_with_pillow(probed: Probed) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(probed.data)) as image:
            image.load()
            return _pillow_to_8bit(image, probed.format)
    except ImageReject:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's problem
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError) and "truncated" in str(exc):  # Pillow: "image file is truncated"
            raise ImageReject("truncated_image", f"{probed.format} data ends early ({message})") from None
        raise ImageReject("decode_error", f"could not decode this {probed.format} ({message})") from None


def _pillow_to_8bit(image: Image.Image, fmt: str) -> np.ndarray:
    """A loaded Pillow image (its current frame: the first) as `to_8bit` gives OpenCV's arrays,
    converted strip by strip: palettes and transparency expanded to BGRA and matted, 16-bit gray
    kept 16-bit until `to_8bit` (Pillow's own `convert("L")` clips every value above 255 to white)."""
    mode = image.mode
    if mode.startswith("I;16"):
        target, rawmode = None, None
    elif mode in ("I", "F"):
        raise ImageReject("decode_error", f"{fmt} with 32-bit samples (Pillow mode {mode}) is not supported")
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        target, rawmode = "RGBA", "BGRA"
    elif mode in ("1", "L"):
        target, rawmode = "L", "L"
    else:
        target, rawmode = "RGB", "BGR"
    width, height = image.size
    out = np.empty((height, width) if target in (None, "L") else (height, width, 3), np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for y in range(0, height, rows):
        piece = image.crop((0, y, width, min(height, y + rows)))
        if target is None:
            strip = np.asarray(piece).astype(np.uint16)  # I;16B is big-endian: native order first
        else:
            piece = piece if piece.mode == target else piece.convert(target)
            strip = np.frombuffer(piece.tobytes("raw", rawmode), np.uint8).reshape(piece.height, width, -1)
        out[y : y + rows] = to_8bit(strip, fmt)
    return out


def to_8bit(array: np.ndarray, fmt: str = "image") -> np.ndarray:
    """uint8 BGR [H, W, 3] or gray [H, W] from a decoder's [H, W] or [H, W, 1|2|3|4] array of uint8
    or uint16. 16-bit samples keep their high byte. Alpha (the last of 2 or 4 channels) is matted on
    white as img2dataset does, rint(a/255*c + 255 - a): that is round(c*a/255) + (255 - a), because
    255 - a is whole, and c*a/255 is never a half (2*c*a is even, 255*odd is odd), so OpenCV's
    float multiply-and-round gives it exactly. An 8-bit gray or BGR array is returned as it is;
    anything else is written strip by strip (`STRIP_PIXELS`) into a new array."""
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageReject("decode_error", f"{fmt} with {array.dtype} samples is not supported (8- and 16-bit are)")
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageReject("decode_error", f"{fmt} with {channels} channels is not supported")
    if array.dtype == np.uint8 and channels in (1, 3):
        return array.reshape(height, width) if channels == 1 else array
    colour = 3 if channels >= 3 else 1
    out = np.empty((height, width, colour), np.uint8)
    source = array.reshape(height, width, channels)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for y in range(0, height, rows):
        strip = source[y : y + rows]
        if strip.dtype == np.uint16:
            strip = (strip >> 8).astype(np.uint8)
        if channels in (2, 4):
            alpha = cv2.extractChannel(strip, channels - 1)
            if channels == 4:
                colours, alpha = cv2.cvtColor(strip, cv2.COLOR_BGRA2BGR), cv2.cvtColor(alpha, cv2.COLOR_GRAY2BGR)
            else:
                colours = cv2.extractChannel(strip, 0)
            strip = cv2.add(cv2.multiply(colours, alpha, scale=1 / 255), cv2.bitwise_not(alpha))
        out[y : y + rows] = strip.reshape(out[y : y + rows].shape)
    return out.reshape(height, width) if colour == 1 else out
