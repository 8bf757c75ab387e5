"""One CLIP eval image transform: `eval_pixels` + `normalize_pixels`, and every path that feeds a
CLIP image encoder (evaluation's embedder, the CLIP-score filter) gives it identical tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.embed import ImageEmbedder
from pipeline.clip_score import ClipScorer
from training.model import create_model, eval_pixels, image_mean_std, normalize_pixels, pixel_scale_shift, save_model

SIZE = 32
TINY = {
    "embed_dim": 16,
    "quick_gelu": False,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def encoded(width: int, height: int, mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    """Random noise (so every resampling difference shows) in `mode`, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, "L" if channels == 1 else mode)
    if mode == "P":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


IMAGES = {
    "jpeg_landscape": encoded(83, 29, fmt="JPEG", seed=1),
    "jpeg_portrait": encoded(37, 61, fmt="JPEG", seed=2),
    "jpeg_square": encoded(50, 50, fmt="JPEG", seed=3),
    "jpeg_large_odd": encoded(301, 157, fmt="JPEG", seed=4),  # where a JPEG draft decode would differ
    "jpeg_grayscale": encoded(45, 70, "L", fmt="JPEG", seed=5),
    "png_landscape": encoded(64, 33, seed=6),
    "png_portrait": encoded(31, 47, seed=7),
    "png_exact_size": encoded(SIZE, SIZE, seed=8),
    "png_grayscale": encoded(40, 40, "L", seed=9),
    "png_rgba": encoded(40, 33, "RGBA", seed=10),
    "png_palette": encoded(27, 35, "P", seed=11),
    "png_1x1": encoded(1, 1, seed=12),
    "png_1x9": encoded(1, 9, seed=13),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "model"
    save_model(create_model(TINY), path)
    return path


def _recording(module: torch.nn.Module) -> list[torch.Tensor]:
    """Make `module.encode_image` keep a copy of every input it gets."""
    seen: list[torch.Tensor] = []
    encode = module.encode_image

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return encode(x)

    module.encode_image = record
    return seen


def evaluation_input(image: bytes, model_dir) -> torch.Tensor:
    embedder = ImageEmbedder(str(model_dir))
    seen = _recording(embedder.model)
    out = embedder({"image": np.array([image], dtype=object)})
    assert out["ok"].all(), out["error"]
    return seen[0]


def clip_score_input(image: bytes, model_dir) -> torch.Tensor:
    scorer = ClipScorer(str(model_dir), device="cpu")
    seen = _recording(scorer.model)
    scorer.scores([image], ["a caption"])
    return seen[0]


def validation_input(image: bytes, model_dir) -> torch.Tensor:
    """Training's validation: the ingest's preprocessing of a held-out row (uint8 on the CPU
    actors), then the training module's normalisation on the device, into `encode_image`."""
    from training.ingest import Preprocess, PreprocessSettings
    from training.loop import ContrastiveModel
    from training.model import load_model

    rows = Preprocess(PreprocessSettings(image_size=SIZE, context_length=16, train=False))(
        {
            "key": np.array(["k"], dtype=object),
            "caption": np.array(["a caption"], dtype=object),
            "jpg": np.array([image], dtype=object),
        }
    )
    assert rows["status"].tolist() == [0]
    module = ContrastiveModel(load_model(str(model_dir)))
    seen = _recording(module.clip)
    module.clip.encode_image(module.normalise(torch.from_numpy(rows["image"])))
    return seen[0]


# Every path that feeds a CLIP image encoder at evaluation time: (encoded image, model folder) ->
# the float32 [1, 3, S, S] the encoder receives.
ENCODER_INPUTS = {
    "evaluation": evaluation_input,
    "clip_score": clip_score_input,
    "validation": validation_input,
}


@pytest.mark.parametrize("path", sorted(ENCODER_INPUTS))
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_encoder_input_path_gives_the_shared_transforms_tensor(path, name, model_dir):
    reference = normalize_pixels(torch.from_numpy(eval_pixels(IMAGES[name], SIZE))[None])
    got = ENCODER_INPUTS[path](IMAGES[name], model_dir)
    assert got.dtype == torch.float32 and got.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(got, reference)


def test_paths_agree_on_a_batch_of_mixed_images(model_dir):
    """Batching (one stack of many shapes and modes) changes nothing either."""
    images = [IMAGES[n] for n in sorted(IMAGES)]
    embedder = ImageEmbedder(str(model_dir))
    seen_eval = _recording(embedder.model)
    embedder({"image": np.array(images, dtype=object)})
    scorer = ClipScorer(str(model_dir), device="cpu")
    seen_score = _recording(scorer.model)
    scorer.scores(images, ["x"] * len(images))
    reference = normalize_pixels(torch.from_numpy(np.stack([eval_pixels(b, SIZE) for b in images])))
    assert torch.equal(seen_eval[0], reference) and torch.equal(seen_score[0], reference)


def test_an_image_of_the_target_size_is_only_converted():
    img = Image.open(io.BytesIO(IMAGES["png_exact_size"]))
    assert np.array_equal(eval_pixels(img, SIZE), np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("height, top", [(19, 2), (21, 2), (23, 4)])
def test_centre_crop_offsets_round_half_to_even_as_torchvision(height, top):
    # width == size: no resize, so the crop is a plain slice; (h - 16) / 2 = 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
    arr = np.random.default_rng(height).integers(0, 256, size=(height, 16, 3), dtype=np.uint8)
    out = eval_pixels(Image.fromarray(arr), 16)
    assert np.array_equal(out, arr[top : top + 16])


def test_the_shorter_side_is_resized_and_the_crop_is_centred():
    # 60x30: left third red, middle green, right blue; short side 30 -> 16, long side 32,
    # crop columns 8..24: green in the middle, red / blue only at the edges.
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :20], arr[:, 20:40], arr[:, 40:] = (220, 30, 30), (30, 200, 40), (30, 40, 220)
    out = eval_pixels(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[:, 4:12].reshape(-1, 3).mean(0), (30, 200, 40), atol=3)
    assert out[:, 0, 0].mean() > 100 and out[:, -1, 2].mean() > 100  # red edge left, blue edge right


def test_alpha_is_dropped_and_grey_is_repeated_in_rgb():
    rgba = Image.new("RGBA", (SIZE, SIZE), (10, 20, 30, 0))
    assert (eval_pixels(rgba, SIZE) == np.array([10, 20, 30], np.uint8)).all()
    grey = Image.new("L", (SIZE, SIZE), 128)
    assert (eval_pixels(grey, SIZE) == 128).all()


def test_normalize_pixels_is_clips_normalisation_in_channels_first_float32():
    x = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    out = normalize_pixels(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in image_mean_std())
    exact = (x.permute(0, 3, 1, 2).double() / 255 - mean) / std
    assert (out.double() - exact).abs().max() < 1e-6
    scale, shift = pixel_scale_shift()
    assert torch.equal(scale.view(3), torch.tensor([1 / (255 * s) for s in image_mean_std()[1]]))
    assert torch.equal(shift.view(3), torch.tensor([-m / s for m, s in zip(*image_mean_std())]))
    half = normalize_pixels(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # SigLIP-style constants
    assert half[0, 0, 0, 0] == -1 and abs(float(half[0, 2, 0, 0]) - 1) < 1e-6


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="size must be a positive"):
        eval_pixels(IMAGES["png_1x1"], 0)
    with pytest.raises(TypeError, match="PIL image or encoded bytes"):
        eval_pixels("photo.jpg", SIZE)
    with pytest.raises(Exception, match="cannot identify image"):
        eval_pixels(b"not an image", SIZE)
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        normalize_pixels(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="std > 0"):
        pixel_scale_shift(std=(0.5, 0.0, 0.5))
