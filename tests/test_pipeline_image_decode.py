"""Decoding every image format: img2dataset's output where img2dataset is right (8-bit images),
Pillow's pixels where it is not (16-bit PNGs), first frames, EXIF orientation, truncated files, and
the format read from the bytes whatever the URL or Content-Type says."""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import img2dataset_parts
from pipeline.config import DataConfig
from pipeline.image_decode import to_8bit
from tests.support.http_server import jpeg_bytes
from tests.support.image_samples import (
    EIGHT_BIT,
    encode,
    matte,
    palette_image,
    png16,
    process,
    reject,
    rgba_image,
    smooth,
)


def img2dataset_resize(data: bytes, boxes=None, **kw):
    """img2dataset's own Resizer (the oracle): (bytes, width, height, original_width, original_height).
    Its albumentations calls (PadIfNeeded's value=, GaussianBlur's always_apply=) are deprecated in
    albumentations 1.4: img2dataset's code, silenced here as the pipeline silences it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        resizer = img2dataset_parts.resizer_class()(
            image_size=kw["image_size"],
            resize_mode=kw["resize_mode"],
            resize_only_if_bigger=False,
            encode_format=kw.get("encode_format", "jpg"),
            encode_quality=kw.get("encode_quality", 95),
            blurrer=img2dataset_parts.blurrer_class()(),
        )
        out, width, height, ow, oh, err = resizer(io.BytesIO(data), boxes)
    assert err is None, err
    return out, width, height, ow, oh


def stored(data: bytes, **kw) -> np.ndarray:
    """The stored image at full size, losslessly: RGB [H, W, 3] (or gray [H, W]) uint8."""
    out = process(data, resize_mode="no", encode_format="png", encode_quality=1, **kw)
    pixels = cv2.imdecode(np.frombuffer(out.data, np.uint8), cv2.IMREAD_UNCHANGED)
    return pixels[..., ::-1] if pixels.ndim == 3 else pixels


# --- img2dataset parity for 8-bit images


@pytest.mark.parametrize("mode", ["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"])
@pytest.mark.parametrize("size", [48, 96])
def test_8bit_images_of_every_format_are_stored_byte_for_byte_as_img2dataset_stores_them(mode, size):
    """Decoder, alpha matting, resize, pad/crop and encoder are img2dataset's: same bytes."""
    for name, make in EIGHT_BIT.items():
        data = make()
        ours = process(data, image_size=size, resize_mode=mode)
        theirs = img2dataset_resize(data, image_size=size, resize_mode=mode)
        assert (ours.width, ours.height, ours.original_width, ours.original_height) == theirs[1:], name
        assert ours.data == theirs[0], name


@pytest.mark.parametrize("mode", ["border", "center_crop", "no"])
def test_blurred_boxes_of_non_jpeg_images_are_img2datasets(mode):
    boxes = [[0.1, 0.2, 0.6, 0.7]]
    for name in ("png_rgba", "png_gray", "gif"):
        data = EIGHT_BIT[name]()
        ours = process(data, boxes, image_size=48, resize_mode=mode)
        assert ours.data == img2dataset_resize(data, boxes, image_size=48, resize_mode=mode)[0], name
        assert ours.data != process(data, image_size=48, resize_mode=mode).data, name  # the blur did something


def test_alpha_matting_equals_img2datasets_float_formula_for_every_colour_and_alpha():
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256))
    bgra = np.stack([colour, 255 - colour, colour // 2, alpha], axis=-1).astype(np.uint8)
    expected = matte(bgra)
    assert np.array_equal(to_8bit(bgra), expected)
    assert np.array_equal(to_8bit(bgra[..., [0, 3]]), expected[..., 0])  # gray + alpha
    deep = (bgra.astype(np.uint16) << 8) | 0xA5  # 16-bit: the high byte is the 8-bit value
    assert np.array_equal(to_8bit(deep), expected)


def test_matting_in_strips_gives_the_whole_image_result(monkeypatch):
    import pipeline.image_decode as image_decode

    rgba = np.asarray(rgba_image(301, 77, seed=2))
    whole = to_8bit(rgba)
    monkeypatch.setattr(image_decode, "STRIP_PIXELS", 1000)  # 3 rows per strip, the last one short
    assert np.array_equal(to_8bit(rgba), whole)
    assert np.array_equal(whole, matte(rgba))


# --- 16-bit and palette images against Pillow


def test_16bit_rgb_png_is_stored_as_pillow_converts_it_to_8bit_rgb():
    rgb16 = smooth(40, 60, 3, seed=1, dtype=np.uint16)
    data = png16(rgb16)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    ours = stored(data)
    assert np.array_equal(ours, pillow)
    assert np.array_equal(ours, (rgb16 >> 8).astype(np.uint8))
    assert ours.mean() < 200  # not white (what img2dataset's Resizer stores)


def test_16bit_rgba_png_is_pillows_8bit_rgba_matted_on_white():
    rgba16 = smooth(40, 60, 4, seed=2, dtype=np.uint16)
    rgba16[..., 3] = np.linspace(0, 65535, 60).astype(np.uint16)[None, :]
    data = png16(rgba16)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert np.array_equal(stored(data), matte(pillow))


def test_16bit_grayscale_png_keeps_the_high_byte_of_pillows_16bit_values():
    """Pillow reads it as I;16. Its own convert("L") clips every value above 255 to white, so the
    oracle is Pillow's 16-bit values scaled to 8 bits."""
    gray16 = smooth(40, 60, 1, seed=3, dtype=np.uint16)[..., 0]
    data = encode(Image.fromarray(gray16), "PNG")
    image = Image.open(io.BytesIO(data))
    assert image.mode == "I;16"
    ours = stored(data)
    assert ours.ndim == 2  # grayscale stays grayscale, as img2dataset keeps it
    assert np.array_equal(ours, (np.asarray(image) >> 8).astype(np.uint8))


@pytest.mark.parametrize("transparency", [None, 3])
def test_palette_png_is_stored_as_pillow_converts_it(transparency):
    kw = {} if transparency is None else {"transparency": transparency}
    data = encode(palette_image(), "PNG", **kw)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    expected = np.asarray(image.convert("RGB")) if transparency is None else matte(np.asarray(image.convert("RGBA")))
    assert np.array_equal(stored(data), expected)
    if transparency is not None:
        assert (expected == 255).all(axis=-1).any()  # the transparent index became white


def test_grayscale_with_alpha_is_matted_on_white():
    data = EIGHT_BIT["png_gray_alpha"]()
    expected = matte(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")))
    ours = stored(data)
    assert np.array_equal(ours, expected)
    assert (ours[:5, :5] == 255).all()  # the transparent corner


def test_cmyk_tiff_is_stored_as_rgb_like_pillows_conversion():
    rgb = Image.fromarray(smooth(50, 70, seed=7))
    data = encode(rgb.convert("CMYK"), "TIFF")
    ours = stored(data).astype(int)
    assert ours.shape == (50, 70, 3)
    assert np.abs(ours - np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)).max() <= 1


# --- animations, orientation, other decoders


def frames(*values: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((30, 40, 3), v, np.uint8)) for v in values]


@pytest.mark.parametrize(
    "fmt, kw",
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],  # PNG with frames: an APNG
)
def test_animated_images_store_their_first_frame(fmt, kw):
    first, *rest = frames(30, 220, 120)
    data = encode(first, fmt, save_all=True, append_images=rest, **kw)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    ours = stored(data)
    assert ours.shape[:2] == (30, 40)
    assert np.abs(ours.astype(int) - 30).max() <= 1


def exif_rotated(fmt: str) -> bytes:
    """An 80x40 image whose top-left quarter is red, tagged EXIF orientation 6 (rotate 90 CW)."""
    pixels = np.full((40, 80, 3), 255, np.uint8)
    pixels[:20, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("fast_jpeg_decode", [True, False])
def test_exif_orientation_is_ignored_as_img2dataset_ignores_it(fmt, fast_jpeg_decode):
    data = exif_rotated(fmt)
    png = dict(encode_format="png", encode_quality=1)
    ours = process(data, image_size=40, resize_mode="no", fast_jpeg_decode=fast_jpeg_decode, **png)
    theirs = img2dataset_resize(data, image_size=40, resize_mode="no", **png)
    assert (ours.width, ours.height) == theirs[1:3] == (80, 40)
    pixels = cv2.imdecode(np.frombuffer(ours.data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
    assert np.abs(pixels[5, 5] - (255, 0, 0)).max() < 40 and np.abs(pixels[35, 75] - 255).max() < 40
    if fmt != "JPEG":
        assert ours.data == theirs[0]


def test_a_format_opencv_cannot_read_is_decoded_by_pillow():
    icon = rgba_image(32, 32, seed=4)
    data = encode(icon, "ICO", sizes=[(32, 32)])
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None
    assert np.array_equal(stored(data), matte(np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))))


def test_png_with_a_broken_ancillary_chunk_is_stored_as_img2dataset_stores_it():
    """A bad CRC on a text chunk: libpng warns and decodes (img2dataset keeps the image), Pillow
    refuses the file; the pipeline keeps it too, with img2dataset's bytes."""
    png = EIGHT_BIT["png_rgba"]()
    text = struct.pack(">I", 13) + b"tEXtComment\x00hello" + b"\x00\x00\x00\x00"  # CRC should not be 0
    data = png[:33] + text + png[33:]  # after the 8-byte signature and the 25-byte IHDR chunk
    with pytest.raises(OSError):
        Image.open(io.BytesIO(data)).load()
    ours = process(data, image_size=48, resize_mode="border")
    assert ours.data == img2dataset_resize(data, image_size=48, resize_mode="border")[0]


def test_float_samples_are_rejected_with_the_sample_type():
    data = encode(Image.fromarray(np.random.default_rng(0).random((20, 30), dtype=np.float32)), "TIFF")
    err = reject(data)
    assert (err.reason, err.stage) == ("decode_error", "decode")
    assert "float32" in err.detail


# --- truncated files


def cut(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]


@pytest.mark.parametrize(
    "name, data",
    [
        ("png", EIGHT_BIT["png_rgb"]()),
        ("png_cut_before_iend", EIGHT_BIT["png_rgb"]()[:-12]),
        ("webp", EIGHT_BIT["webp_rgb_lossy"]()),
        ("gif", EIGHT_BIT["gif"]()),
        ("bmp", EIGHT_BIT["bmp"]()),
        ("tiff", EIGHT_BIT["tiff_rgb"]()),
        ("jpeg", jpeg_bytes(70, 50)),
    ],
)
@pytest.mark.parametrize("fast_jpeg_decode", [True, False])
def test_truncated_images_are_rejected_as_truncated(name, data, fast_jpeg_decode):
    if not name.endswith("_iend"):
        data = cut(data)
    err = reject(data, fast_jpeg_decode=fast_jpeg_decode)
    assert (err.reason, err.stage) == ("truncated_image", "decode"), (name, err.detail)


# --- the format comes from the bytes, not the URL or the Content-Type


def test_images_served_under_the_wrong_extension_and_type_are_decoded_by_their_content():
    from pipeline.download import RowProcessor, StoredImage
    from tests.support.http_server import HTTPTestServer, Route

    png = EIGHT_BIT["png_rgba"]()
    webp = EIGHT_BIT["webp_rgb_lossy"]()
    routes = {
        "/photo.jpg": Route(body=png, content_type="image/jpeg"),
        "/picture.png": Route(body=jpeg_bytes(70, 50), content_type="image/png"),
        "/anim.gif": Route(body=webp, content_type="image/gif"),
        "/image.jpg": Route(body=b"<!doctype html><p>moved</p>", content_type="image/jpeg"),
    }
    with HTTPTestServer(routes) as server:
        rows = RowProcessor(DataConfig(allow_private_addresses=True, retries=0, image_size=48))
        try:
            results = {path: rows.outcome(rows.fetcher.fetch(server.url(path))) for path in routes}
        finally:
            rows.fetcher.close()
    for path, data in (("/photo.jpg", png), ("/anim.gif", webp)):
        assert isinstance(results[path], StoredImage), results[path]
        assert results[path].jpg == process(data, image_size=48).data
    assert isinstance(results["/picture.png"], StoredImage)
    assert (results["/picture.png"].original_width, results["/picture.png"].original_height) == (70, 50)
    assert results["/image.jpg"].reason == "not_an_image"
