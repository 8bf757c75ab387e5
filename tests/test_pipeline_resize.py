"""Decode, checks, resize and encode of one image (no Ray, no network)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.image_decode import JPEG_FLAGS, decode_jpeg, jpeg_size, sniff
from pipeline.resize import ImageProcessor, ImageReject
from tests.support.http_server import jpeg_bytes, jpeg_with_header_size, png_bytes


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def process(data: bytes, **kw):
    p = ImageProcessor(**kw)
    return p.resize(p.probe(data))


def reject(data: bytes, **kw) -> ImageReject:
    p = ImageProcessor(**kw)
    with pytest.raises(ImageReject) as info:
        p.resize(p.probe(data))
    return info.value


def test_cmyk_jpeg_is_accepted_and_stored_as_rgb():
    out = process(jpeg_bytes(120, 90, mode="CMYK"), image_size=64)
    image = Image.open(io.BytesIO(out.data))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert (out.original_width, out.original_height) == (120, 90)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("size", [(333, 251), (512, 384), (17, 9)])
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_jpeg_decoder_gives_opencvs_reduced_decode_pixel_for_pixel(mode, size, reduce):
    """TurboJPEG (simplejpeg) at 1/reduce scale: the same array as OpenCV's IMREAD_REDUCED_COLOR_*,
    sizes rounded up as libjpeg rounds them, grayscale and CMYK converted to 3 channels."""
    data = jpeg_bytes(*size, seed=reduce, mode=mode)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[reduce])
    got = decode_jpeg(data, reduce, *size)
    assert got.shape == (-(-size[1] // reduce), -(-size[0] // reduce), 3) == expected.shape
    assert np.array_equal(got, expected)


def test_jpeg_that_libjpeg_reads_only_with_a_warning_is_decoded_by_opencv_as_before():
    import simplejpeg

    data = jpeg_bytes(200, 150, seed=3)
    cut = data.find(b"\xff\xda") + 60
    data = data[:cut] + b"\xff\xd3" + data[cut:]  # a stray restart marker: "Corrupt JPEG data"
    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        simplejpeg.decode_jpeg(data, "BGR")  # strict: TurboJPEG refuses it
    got = decode_jpeg(data, 2, 200, 150)
    assert np.array_equal(got, cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[2]))


def test_turbojpeg_output_of_an_unexpected_size_is_not_used(monkeypatch):
    import simplejpeg

    data = jpeg_bytes(200, 150, seed=4)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: np.zeros((10, 10, 3), np.uint8))
    got = decode_jpeg(data, 2, 200, 150)
    assert np.array_equal(got, cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[2]))


def test_grayscale_jpeg_is_stored_as_rgb():
    out = process(jpeg_bytes(100, 100, mode="L"), image_size=50)
    assert Image.open(io.BytesIO(out.data)).mode == "RGB"


def test_png_with_alpha_is_accepted_matted_on_white_and_stored_as_rgb():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half, opaque on the right
    rgba[:, 20:, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = process(buf.getvalue(), image_size=40, encode_format="png", encode_quality=3)
    pixels = decode(out.data)
    assert pixels.shape == (40, 40, 3)
    assert tuple(pixels[5, 5]) == (255, 255, 255)  # transparent -> white
    assert tuple(pixels[5, 35]) == (255, 0, 0)


def test_decompression_bomb_is_rejected_from_the_header_before_decoding():
    bomb_jpeg = jpeg_with_header_size(20000, 20000)
    head = sniff(bomb_jpeg)
    assert (head.format, head.width, head.height) == ("JPEG", 20000, 20000)
    err = reject(bomb_jpeg)
    assert (err.reason, err.stage) == ("too_large", "decode")
    assert "400000000 pixels" in err.detail
    # a real 20000x20000 PNG (1-bit, about 50 kB on the wire)
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 200_000
    assert reject(buf.getvalue()).reason == "too_large"
    # a cap below the image size rejects it too
    assert reject(jpeg_bytes(100, 100), max_pixels=5000).reason == "too_large"


def test_one_pixel_image_is_upscaled_into_the_border():
    out = process(jpeg_bytes(1, 1), image_size=32)
    assert (out.width, out.height, out.original_width, out.original_height) == (32, 32, 1, 1)


def test_truncated_jpeg_is_rejected():
    data = jpeg_bytes(200, 150)
    err = reject(data[: len(data) // 2])
    assert (err.reason, err.stage) == ("truncated_image", "decode")


def test_jpeg_with_bytes_after_its_end_marker_is_accepted():
    data = jpeg_bytes(200, 150) + b"\x00trailing junk" * 10
    assert process(data, image_size=100).width == 100


def corrupt_png_data(png: bytes) -> bytes:
    """The PNG with the middle of its IDAT data overwritten (chunks, CRCs and IEND in place)."""
    start = png.index(b"IDAT") + 4
    length = int.from_bytes(png[start - 8 : start - 4], "big")
    return png[: start + 8] + bytes(length - 16) + png[start + length - 8 :]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "not_an_image"),
        (b"", "not_an_image"),
        (b"GIF89a" + b"\x00" * 3, "not_an_image"),
        (png_bytes(64, 64)[:60] + b"\x00" * 200, "truncated_image"),  # a PNG header, then garbage, no IEND
        (corrupt_png_data(png_bytes(64, 64)), "decode_error"),  # whole file, its pixel data garbage
    ],
)
def test_non_images_are_rejected(data, reason):
    assert reject(data).reason == reason


def test_min_image_size_and_max_area_use_img2dataset_semantics():
    assert reject(jpeg_bytes(30, 80), min_image_size=40).reason == "too_small"
    assert reject(png_bytes(30, 80, mode="RGB"), min_image_size=40).reason == "too_small"
    assert reject(jpeg_bytes(100, 100), max_image_area=5000).reason == "too_large"


SIZES = [(512, 384), (384, 512), (333, 777), (257, 255), (256, 256), (100, 50), (1000, 7), (2000, 1500)]


@pytest.mark.parametrize("mode", ["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"])
def test_fast_jpeg_path_matches_img2dataset_resizer(mode):
    """Same output size as img2dataset's Resizer for every mode; pixels differ only by the
    DCT-domain pre-scaling (a mean difference of a few levels out of 255 on photo-like images)."""
    fast = ImageProcessor(image_size=128, resize_mode=mode)
    reference = ImageProcessor(image_size=128, resize_mode=mode, fast_jpeg_decode=False)
    for w, h in SIZES:
        data = jpeg_bytes(w, h, seed=w + h)
        a = fast.resize(fast.probe(data))
        b = reference.resize(reference.probe(data))
        assert (a.width, a.height, a.original_width, a.original_height) == (
            b.width,
            b.height,
            b.original_width,
            b.original_height,
        ), (mode, w, h)
        pa_, pb = decode(a.data).astype(int), decode(b.data).astype(int)
        assert pa_.shape == pb.shape
        assert np.abs(pa_ - pb).mean() < 4, (mode, w, h)


def test_resize_only_if_bigger_leaves_small_images_alone():
    out = process(jpeg_bytes(60, 40), image_size=128, resize_only_if_bigger=True)
    assert (out.width, out.height) == (60, 40)
    out = process(jpeg_bytes(600, 400), image_size=128, resize_only_if_bigger=True)
    assert (out.width, out.height) == (128, 128)


def test_encode_format_and_quality_are_applied():
    out = process(jpeg_bytes(200, 200), image_size=64, encode_format="webp", encode_quality=80)
    assert out.data[:4] == b"RIFF" and out.data[8:12] == b"WEBP"
    small = process(jpeg_bytes(200, 200), image_size=64, encode_quality=20)
    large = process(jpeg_bytes(200, 200), image_size=64, encode_quality=98)
    assert len(small.data) < len(large.data)


def test_header_parsers_read_sizes_without_decoding():
    assert jpeg_size(jpeg_bytes(321, 123)) == (321, 123)
    head = sniff(png_bytes(17, 9))
    assert (head.format, head.width, head.height, head.pixel_bytes) == ("PNG", 17, 9, 4)
    assert sniff(b"<html>") is None


def test_fast_path_output_decodes_as_the_same_picture():
    """The stored image is the input, resized: compare against OpenCV's own full decode + resize."""
    data = jpeg_bytes(512, 384, seed=3)
    out = process(data, image_size=256, resize_mode="keep_ratio_largest")
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    expected = cv2.resize(full, (256, 192), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.abs(decode(out.data).astype(int) - expected.astype(int)).mean() < 4


def checkerboard_jpeg(width: int, height: int, square: int = 16) -> bytes:
    """Sharp edges everywhere, so a blur shows (the smooth test JPEGs barely change)."""
    y, x = np.mgrid[0:height, 0:width]
    board = (((x // square) + (y // square)) % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([board, 255 - board, board // 2], axis=2)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["border", "center_crop", "no"])
def test_boxes_are_blurred_as_img2dataset_blurs_them(mode):
    """data.bbox_col: the fast JPEG path blurs like img2dataset's Resizer with its BoundingBoxBlurrer
    (after the resize, before padding or cropping): inside the box the image changes, far from
    it it does not."""
    boxes = [[0.5, 0.5, 0.9, 0.9]]
    fast = ImageProcessor(image_size=128, resize_mode=mode)
    reference = ImageProcessor(image_size=128, resize_mode=mode, fast_jpeg_decode=False)
    for data in (checkerboard_jpeg(320, 240), checkerboard_jpeg(200, 300)):
        plain = decode(fast.resize(fast.probe(data)).data).astype(int)
        ours = decode(fast.resize(fast.probe(data), boxes).data).astype(int)
        theirs = decode(reference.resize(reference.probe(data), boxes).data).astype(int)
        assert ours.shape == theirs.shape == plain.shape
        assert np.abs(ours - theirs).mean() < 6, mode
        changed = np.abs(ours - plain).mean(axis=2) > 16
        h, w = changed.shape
        assert changed[int(0.65 * h) : int(0.8 * h), int(0.65 * w) : int(0.8 * w)].mean() > 0.3, mode
        assert not changed[: h // 4, : w // 4].any(), mode  # far from the box: untouched


def test_png_boxes_go_through_img2dataset_resizer_with_its_blurrer():
    board = decode(checkerboard_jpeg(160, 120))
    buf = io.BytesIO()
    Image.fromarray(board).save(buf, "PNG")
    data = buf.getvalue()
    p = ImageProcessor(image_size=64)
    plain = decode(p.resize(p.probe(data)).data).astype(int)
    blurred = decode(p.resize(p.probe(data), [[0.0, 0.0, 0.5, 0.5]]).data).astype(int)
    diff = np.abs(plain - blurred).mean(axis=2)  # 160x120 -> 64x48 (+ 8 px of border above and below)
    assert diff[12:28, 4:28].mean() > 16 and diff[40:56, 40:].mean() < 1  # far from it: re-encoding noise at most
