"""Memory-bounded decoding: the header predicts the decoded size, data.max_decoded_bytes refuses an
image before it is decoded, and the issue's 9459x9459 RGBA PNG decodes in well under a gigabyte."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.image_decode import read_header
from pipeline.resize import ImageProcessor
from tests.support.http_server import jpeg_bytes
from tests.support.image_samples import EIGHT_BIT, encode, png16, process, reject, rgba_image, smooth

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(EIGHT_BIT) + ["png16_rgb", "png16_rgba", "png16_gray", "jpeg"])
def test_header_predicts_the_decoded_image_size(name):
    """decoded_bytes() from the header is at least what the decoder holds (PNG: Pillow's image,
    exactly; the others: OpenCV's array), so the byte cap is applied before the memory is spent."""
    data = {
        "png16_rgb": lambda: png16(smooth(20, 30, 3, dtype=np.uint16)),
        "png16_rgba": lambda: png16(smooth(20, 30, 4, dtype=np.uint16)),
        "png16_gray": lambda: encode(Image.fromarray(smooth(20, 30, 1, dtype=np.uint16)[..., 0]), "PNG"),
        "jpeg": lambda: jpeg_bytes(70, 50, mode="CMYK"),
    }.get(name, EIGHT_BIT.get(name))()
    predicted = read_header(data).decoded_bytes()
    if name.startswith("png"):
        image = Image.open(io.BytesIO(data))
        stored_per_pixel = {"1": 1, "L": 1, "P": 1, "I;16": 2}.get(image.mode, 4)  # Pillow: RGB as RGBX
        assert predicted == image.width * image.height * stored_per_pixel, name
    else:
        flags = cv2.IMREAD_COLOR if name == "jpeg" else cv2.IMREAD_UNCHANGED
        assert predicted >= cv2.imdecode(np.frombuffer(data, np.uint8), flags).nbytes, name


def test_an_image_over_max_decoded_bytes_is_rejected_before_decoding(monkeypatch):
    data = encode(rgba_image(400, 300), "WEBP", lossless=True)  # 400 x 300 x 4 = 480,000 bytes decoded
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded despite the cap"))
    err = reject(data, max_decoded_bytes=479_999)
    assert (err.reason, err.stage) == ("too_large", "decode")
    assert "480000 bytes (4 per pixel) > data.max_decoded_bytes 479999" in err.detail
    monkeypatch.setattr(Image.Image, "load", lambda *a: pytest.fail("decoded despite the cap"))
    err = reject(png16(smooth(300, 400, 4, dtype=np.uint16)), max_decoded_bytes=479_999)
    assert "480000 bytes (4 per pixel)" in err.detail  # Pillow holds 16-bit RGBA as 8-bit


def test_the_byte_cap_counts_a_jpeg_at_its_reduced_decode_scale():
    data = jpeg_bytes(2000, 1600)  # 9.6 MB at full scale; 1/4 scale (500 x 400) covers a 256 px target
    out = process(data, image_size=256, max_decoded_bytes=1_000_000)
    assert (out.width, out.height) == (256, 256)
    err = reject(data, image_size=256, max_decoded_bytes=1_000_000, fast_jpeg_decode=False)
    assert err.reason == "too_large" and "decodes to 9600000 bytes" in err.detail


def test_max_decoded_bytes_is_a_validated_config_key():
    assert DataConfig().max_decoded_bytes == ImageProcessor().max_decoded_bytes == 384 * 2**20
    with pytest.raises(ValueError, match="max_decoded_bytes"):
        DataConfig(max_decoded_bytes=0)


def big_flat_rgba_png(path: Path, side: int) -> None:
    """A side x side RGBA PNG written row by row (little memory): the left half opaque red, the
    right half transparent, and a half-transparent blue square in the middle third of both sides."""
    half = np.zeros((side, 4), np.uint8)
    half[: side // 2] = (255, 0, 0, 255)
    band = half.copy()
    band[side // 3 : 2 * side // 3] = (0, 0, 255, 128)
    plain_row, band_row = b"\x00" + half.tobytes(), b"\x00" + band.tobytes()
    deflate = zlib.compressobj(1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    with path.open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)))
        pixels = [deflate.compress(band_row if side // 3 <= y < 2 * side // 3 else plain_row) for y in range(side)]
        f.write(chunk(b"IDAT", b"".join(pixels) + deflate.flush()) + chunk(b"IEND", b""))


DECODE_AND_REPORT_PEAK = """
import json, sys
import cv2, numpy as np
from pipeline.resize import ImageProcessor
def high_water_kib():
    # VmHWM is this process image's own peak: ru_maxrss would start at the forking parent's peak
    # (Linux keeps it across fork and exec), and pytest's may already be over 2 GB
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
data = open(sys.argv[1], "rb").read()
processor = ImageProcessor(image_size=256, encode_format="png", encode_quality=1)
before = high_water_kib()
out = processor.resize(processor.probe(data))
peak = high_water_kib()
pixels = cv2.imdecode(np.frombuffer(out.data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
print(json.dumps({"before_kib": before, "peak_kib": peak, "size": [out.width, out.height, out.original_width,
    out.original_height], "red": pixels[20, 20].tolist(), "clear": pixels[20, 236].tolist(),
    "blue": pixels[128, 150].tolist(), "red_beside": pixels[128, 20].tolist(),
    "clear_beside": pixels[128, 236].tolist()}))
"""


def test_a_9459px_rgba_png_decodes_in_bounded_memory(tmp_path):
    """The issue's image: 9459 x 9459 RGBA (89.47 Mpx, under data.max_pixels), ~2 MB on the wire,
    358 MB decoded; img2dataset's float64 matting peaks at 6.7 GB on it. Decoded in a fresh process,
    the process may grow by at most 2 x 358 MB (measured: 1.76 x, Pillow's decoded image plus the
    268 MB 8-bit output; strips are a few MB) and peak under 1 GiB with the interpreter, numpy,
    OpenCV, Pillow and the config's imports (~110 MB). A single float64 copy of the image (2.1 GB)
    would break both bounds."""
    side = 9459
    path = tmp_path / "big.png"
    big_flat_rgba_png(path, side)
    assert path.stat().st_size < 2_000_000
    decoded = side * side * 4
    assert read_header(path.read_bytes()).decoded_bytes() == decoded < DataConfig().max_decoded_bytes
    run = subprocess.run(
        [sys.executable, "-c", DECODE_AND_REPORT_PEAK, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    peak, growth = report["peak_kib"] * 1024, (report["peak_kib"] - report["before_kib"]) * 1024
    assert peak < 2**30, report
    assert growth < 2 * decoded, report
    assert report["size"] == [256, 256, side, side]
    assert report["red"] == [255, 0, 0] and report["clear"] == [255, 255, 255]
    assert report["blue"] == [127, 127, 255]  # 50% blue over white: round(255 * 128 / 255) + 127
    assert report["red_beside"] == [255, 0, 0] and report["clear_beside"] == [255, 255, 255]
