"""Zero-shot and retrieval through the model: preprocessing, classifier, known answers end to end."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.classification import classification_metrics
from evaluation.config import EvalConfig
from evaluation.embed import clip_preprocess
from evaluation.retrieval import evaluate_retrieval
from evaluation.run import evaluate_dataset
from evaluation.zeroshot import build_classifier, evaluate_zeroshot, zeroshot_logits
from tests.test_eval_datasets import COLORS, color_image, write_color_folder, write_color_shards
from training.model import create_model, image_mean_std
from training.tokenizer import tokenize

MEAN, STD = image_mean_std()


class ColorCLIP(torch.nn.Module):
    """A CLIP-shaped model whose embeddings are known: an image is its mean colour (centred), a text
    is the sum of one axis per colour word it contains (red, green, blue)."""

    image_size = 16
    context_length = 77
    config = {"embed_dim": 3}
    WORDS = {int(tokenize("red")[0, 1]): 0, int(tokenize("green")[0, 1]): 1, int(tokenize("blue")[0, 1]): 2}

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))  # something for the weights fingerprint

    def encode_image(self, images):
        rgb = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        rgb = rgb.mean(dim=(2, 3))
        return self.gain * (rgb - rgb.mean(dim=1, keepdim=True))

    def encode_text(self, tokens):
        out = torch.zeros(len(tokens), 3)
        for row, ids in enumerate(tokens.tolist()):
            for token in ids:
                if token in self.WORDS:
                    out[row] += 3 * F.one_hot(torch.tensor(self.WORDS[token]), 3).float() - 1
        return self.gain * out


def test_preprocess_resizes_the_short_side_center_crops_and_normalises():
    # 60x30 image: left third red, middle third green, right third blue. Short side 30 -> 16,
    # long side int(16 * 60 / 30) = 32, crop columns 8..24: mostly green, red/blue only at the edges.
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :20] = COLORS["red"]
    arr[:, 20:40] = COLORS["green"]
    arr[:, 40:] = COLORS["blue"]
    out = clip_preprocess(Image.fromarray(arr), 16, MEAN, STD)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    rgb = out * np.array(STD, np.float32)[:, None, None] + np.array(MEAN, np.float32)[:, None, None]
    centre = rgb[:, :, 4:12].mean(axis=(1, 2)) * 255
    np.testing.assert_allclose(centre, COLORS["green"], atol=3)
    gray = clip_preprocess(Image.new("L", (20, 20), 128), 16, MEAN, STD)  # grey -> RGB, then normalised
    np.testing.assert_allclose(gray[:, 0, 0], (128 / 255 - np.array(MEAN)) / np.array(STD), rtol=1e-5)


def test_classifier_equals_the_mean_of_normalised_prompt_embeddings():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny").eval()
    names, templates = ["dog", "cat"], ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]
    got = build_classifier(model, names, templates, batch_size=4)
    with torch.no_grad():
        rows = []
        for name in names:
            emb = model.encode_text(tokenize([t.replace("{c}", name) for t in templates]))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
            rows.append(mean / mean.norm())
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-6)


def test_classifier_is_cached_in_memory_and_on_disk(tmp_path, monkeypatch):
    import evaluation.zeroshot as zs

    model = ColorCLIP()
    first = build_classifier(model, ["red", "blue"], ["a {c} thing"], cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("zeroshot-classifier-*.npy"))) == 1
    zs._MEMORY_CACHE.clear()
    monkeypatch.setattr(ColorCLIP, "encode_text", lambda self, tokens: pytest.fail("cache not used"))
    again = build_classifier(model, ["red", "blue"], ["a {c} thing"], cache_dir=str(tmp_path))
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(build_classifier(model, ["red", "blue"], ["a {c} thing"]), first)  # from memory
    with torch.no_grad():
        model.gain.fill_(2.0)  # other weights: another cache entry, so the text tower runs again
    with pytest.raises(pytest.fail.Exception, match="cache not used"):
        build_classifier(model, ["red", "blue"], ["a {c} thing"], cache_dir=str(tmp_path))


def test_zeroshot_on_a_folder_gives_the_known_answer_and_counts_the_corrupt_image(tmp_path):
    # 3 classes x 3 images, plus a green image filed under red (a known miss) and a corrupt file.
    write_color_folder(tmp_path, per_class=3, corrupt=True, mislabeled=True)
    cfg = EvalConfig(dataset=str(tmp_path), templates="simple", batch_size=4, dump_predictions=True)
    result = evaluate_dataset(ColorCLIP(), cfg)
    assert result.num_samples == 10
    assert result.skipped["count"] == 1 and list(result.skipped["reasons"]) == ["UnidentifiedImageError"]
    assert result.skipped["examples"][0]["key"] == "red/broken.jpg"
    assert result.metrics["acc1"] == pytest.approx(9 / 10)
    # Recall per class: blue 3/3, green 3/3, red 3/4.
    assert result.metrics["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert "acc5" not in result.metrics  # 3 classes
    pred = dict(zip(result.predictions["key"], result.predictions["pred_name"]))
    assert pred["red/zz_green.png"] == "green" and pred["blue/0.png"] == "blue"
    np.testing.assert_array_equal(result.confusion, [[3, 0, 0], [0, 3, 0], [0, 1, 3]])


def test_zeroshot_metrics_equal_an_independent_computation_on_the_same_features(tmp_path):
    torch.manual_seed(1)
    model = create_model("ViT-Tiny").eval()
    write_color_shards(tmp_path, per_class=4)
    templates = ["a photo of a {c}.", "a {c} square."]
    cfg = EvalConfig(dataset=str(tmp_path), label_col="color", templates=None, batch_size=5)
    cfg.templates = str(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("\n".join(templates))
    result = evaluate_dataset(model, cfg)
    # Independently: preprocess, encode, normalise, classifier by hand, numpy metrics.
    names = ["blue", "green", "red"]
    labels = np.array([names.index(c) for c in COLORS for _ in range(4)])
    with torch.no_grad():
        pixels = torch.stack(
            [
                torch.from_numpy(clip_preprocess(Image.open(io.BytesIO(color_image(c))), 64, MEAN, STD))
                for c in COLORS
                for _ in range(4)
            ]
        )
        img = model.encode_image(pixels).double()
        img = img / img.norm(dim=-1, keepdim=True)
        cls = []
        for name in names:
            t = model.encode_text(tokenize([x.replace("{c}", name) for x in templates])).double()
            t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
            cls.append(t / t.norm())
        logits = (100 * img @ torch.stack(cls).T).float().numpy()
    expected = classification_metrics(logits, labels)
    assert result.metrics == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(
        zeroshot_logits(img.float(), torch.stack(cls).float()).numpy(), logits, rtol=1e-4, atol=1e-3
    )


def test_evaluate_zeroshot_on_in_memory_images_with_class_name_labels():
    images = [color_image(c) for c in COLORS] + [b"\x89PNG broken"]
    result = evaluate_zeroshot(
        ColorCLIP(),
        images,
        ["red", "green", "blue", "red"],
        ["red", "green", "blue"],
        templates=["a {c} photo"],
        batch_size=2,
    )
    assert result.metrics["acc1"] == 1.0 and result.num_samples == 3 and result.skipped["count"] == 1


def test_retrieval_known_answer_with_exact_ties_and_several_captions():
    # Two identical red images: their captions tie exactly, so the lower index wins each tie.
    images = [color_image("red"), color_image("red"), color_image("green"), color_image("blue")]
    captions = [["a red square", "red again"], ["a red square"], ["a green square"], "a blue square"]
    result = evaluate_retrieval(ColorCLIP(), images, captions, recall_k=(1, 2, 5), batch_size=3)
    m = result.metrics
    # text -> image: the 3 red captions all rank image 0 first: captions of image 0 hit, of image 1 miss.
    assert m["image_retrieval_recall@1"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@2"] == 1.0
    # image -> text: image 1's caption ties with image 0's two captions, which come first: rank 2.
    assert m["text_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert m["text_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert m["text_retrieval_recall@5"] == 1.0
    assert result.details == {"num_images": 4, "num_texts": 5}


def test_evaluate_linear_probe_on_in_memory_images():
    from evaluation.linear_probe import evaluate_linear_probe

    train = [(color_image(c, size=(20 + i, 20)), c) for c in COLORS for i in range(6)]
    test = [(color_image(c, size=(30, 24 + i)), c) for c in COLORS for i in range(2)]
    result = evaluate_linear_probe(
        ColorCLIP(),
        [x for x, _ in train],
        [y for _, y in train],
        [x for x, _ in test],
        [y for _, y in test],
        val_fraction=0.34,
    )
    assert result.metrics["acc1"] == 1.0 and result.num_samples == 6
    assert 1e-6 <= result.metrics["C"] <= 1e6
    np.testing.assert_array_equal(np.diag(result.confusion), [2, 2, 2])
