"""Zero-shot / classification and retrieval metrics on hand-built embeddings with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from evaluation.classification import (
    classification_metrics,
    confusion_matrix,
    predict,
    target_ranks,
    topk_classes,
)
from evaluation.retrieval import (
    blocked_topk,
    dense_retrieval_ranks,
    recall_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)
from evaluation.zeroshot import classifier_from_text_features, zeroshot_logits


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- zero-shot classification -------------------------------------------------------------------


def test_zeroshot_classifier_averages_normalised_prompts_and_renormalises():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(3, 4, 8)).astype(np.float32) * rng.uniform(0.5, 5, size=(3, 4, 1)).astype(np.float32)
    got = classifier_from_text_features(torch.from_numpy(text)).numpy()
    expected = _unit(_unit(text.astype(np.float64)).mean(axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_zeroshot_logits_are_100_times_cosine():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(5, 8)).astype(np.float32) * 7.0  # not normalised on purpose
    cls = _unit(rng.normal(size=(3, 8))).astype(np.float32)
    got = zeroshot_logits(torch.from_numpy(img), torch.from_numpy(cls)).numpy()
    np.testing.assert_allclose(got, 100.0 * _unit(img.astype(np.float64)) @ cls.T.astype(np.float64), rtol=1e-5)


def test_accuracy_and_mean_per_class_recall_match_sklearn_on_random_scores():
    rng = np.random.default_rng(2)
    n, c = 500, 12
    labels = rng.integers(0, c, size=n)
    scores = rng.normal(size=(n, c)).astype(np.float32)
    scores[np.arange(n), labels] += 1.5  # better than chance, not perfect
    m = classification_metrics(scores, labels)
    assert m["acc1"] == pytest.approx(top_k_accuracy_score(labels, scores, k=1, labels=np.arange(c)))
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5, labels=np.arange(c)))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)))
    assert 0.3 < m["acc1"] < 0.9


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_ties_go_to_the_lower_class_index():
    # Sample 0: classes 1 and 3 tie for best, true 3 -> predicted 1 (miss at top-1, hit at top-2).
    # Sample 1: all equal, true 0 -> hit. Sample 2: all equal, true 4 -> rank 4.
    scores = np.array([[0, 5, 1, 5, 2], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]], dtype=np.float32)
    labels = np.array([3, 0, 4])
    np.testing.assert_array_equal(target_ranks(scores, labels), [1, 0, 4])
    np.testing.assert_array_equal(predict(scores), [1, 0, 0])
    np.testing.assert_array_equal(topk_classes(scores, 3), [[1, 3, 4], [0, 1, 2], [0, 1, 2]])
    m = classification_metrics(scores, labels)
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["acc5"] == 1.0
    # Recall per present class: class 3 -> 0, class 0 -> 1, class 4 -> 0.
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predict(scores)))


def test_acc5_is_absent_with_fewer_than_five_classes():
    scores = np.eye(4, dtype=np.float32)
    m = classification_metrics(scores, np.arange(4))
    assert "acc5" not in m and m["acc1"] == 1.0 and m["mean_per_class_recall"] == 1.0


def test_mean_per_class_recall_differs_from_accuracy_on_imbalanced_classes():
    # 9 samples of class 0 all right, 1 sample of class 1 wrong: acc 0.9, balanced 0.5.
    labels = np.array([0] * 9 + [1])
    scores = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (10, 1))
    m = classification_metrics(scores, labels)
    assert m["acc1"] == pytest.approx(0.9)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_confusion_matrix_counts_true_rows_predicted_columns():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 0, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])


def test_bad_labels_are_rejected_with_the_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        classification_metrics(np.zeros((2, 3), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="non-finite"):
        classification_metrics(np.array([[np.nan, 0.0]]), np.array([0]))


# --- retrieval ----------------------------------------------------------------------------------


def _numpy_reference(img, txt, t2i, ks):
    """Independent reference: full float64 matrix, lexicographic sort (score desc, index asc)."""
    s = (txt.astype(np.float64) @ img.astype(np.float64).T).astype(np.float32)  # [M, N]
    out = {}
    for k in ks:
        t_hits = []
        for t in range(len(txt)):
            order = np.lexsort((np.arange(len(img)), -s[t]))
            t_hits.append(t2i[t] in order[:k])
        i_hits = []
        for i in range(len(img)):
            order = np.lexsort((np.arange(len(txt)), -s[:, i]))
            i_hits.append(bool(np.any(t2i[order[:k]] == i)))
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t_hits))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i_hits))
    return out


def _pairs(n_img, caps_per_img, dim, noise, seed):
    rng = np.random.default_rng(seed)
    img = _unit(rng.normal(size=(n_img, dim))).astype(np.float32)
    t2i = np.repeat(np.arange(n_img), caps_per_img)
    txt = _unit(img[t2i] + noise * rng.normal(size=(len(t2i), dim))).astype(np.float32)
    perm = rng.permutation(len(t2i))  # captions not grouped by image
    return img, txt[perm], t2i[perm]


def test_retrieval_recall_matches_numpy_reference_with_several_captions_per_image():
    img, txt, t2i = _pairs(60, 5, 16, 1.0, seed=3)
    ks = (1, 5, 10)
    got = retrieval_metrics(img, txt, t2i, recall_k=ks, block_size=7)  # odd block: many ragged tiles
    assert got == pytest.approx(_numpy_reference(img, txt, t2i, ks), abs=0)
    assert 0.05 < got["image_retrieval_recall@1"] < 0.95  # a non-trivial case


def test_retrieval_ties_are_broken_by_lower_index_in_both_directions():
    # Images 0 and 1 are the same vector; captions 0 (of image 0) and 1 (of image 1) are the same.
    e0 = np.array([1.0, 0.0, 0.0], np.float32)
    e2 = np.array([0.0, 1.0, 0.0], np.float32)
    img = np.stack([e0, e0, e2])
    txt = np.stack([e0, e0, e2, _unit(np.array([0.0, 1.0, 1.0])).astype(np.float32)])
    t2i = np.array([0, 1, 2, 2])
    text_ranks, image_ranks = retrieval_ranks(img, txt, t2i, block_size=2)
    # text 0 -> image 0 first (tie, lower index): rank 0; text 1 -> image 1 after image 0: rank 1.
    np.testing.assert_array_equal(text_ranks, [0, 1, 0, 0])
    # image 0 -> caption 0 (rank 0); image 1 -> caption 1 comes after caption 0: rank 1;
    # image 2 -> best caption 2 (score 1.0) rank 0.
    np.testing.assert_array_equal(image_ranks, [0, 1, 0])
    m = recall_from_ranks(text_ranks, image_ranks, (1,))
    assert m == {"image_retrieval_recall@1": 0.75, "text_retrieval_recall@1": pytest.approx(2 / 3)}
    assert m == pytest.approx(_numpy_reference(img, txt, t2i, (1,)), abs=0)


def test_blocked_ranks_equal_dense_ranks_including_exact_ties():
    img, txt, t2i = _pairs(150, 3, 8, 1.5, seed=4)
    # Exact duplicates make ties: copy some images and some captions.
    img[10] = img[11]
    img[120:130] = img[100:110]
    txt[5] = txt[50]
    txt[300:320] = txt[0:20]
    for block in (23, 64, 10_000):
        blocked = retrieval_ranks(img, txt, t2i, block_size=block)
        dense = dense_retrieval_ranks(img, txt, t2i)
        np.testing.assert_array_equal(blocked[0], dense[0])
        np.testing.assert_array_equal(blocked[1], dense[1])


def test_running_topk_agrees_with_ranks():
    img, txt, t2i = _pairs(80, 2, 8, 1.2, seed=5)
    img[3] = img[4]
    idx, val = blocked_topk(txt, img, 10, block_size=9)
    text_ranks, _ = retrieval_ranks(img, txt, t2i, block_size=9)
    for t in range(len(txt)):
        pos = np.flatnonzero(idx[t] == t2i[t])
        assert (text_ranks[t] < 10) == (len(pos) == 1)
        if len(pos):
            assert pos[0] == text_ranks[t]
    assert np.all(np.diff(val, axis=1) <= 0)
    s = (txt.astype(np.float64) @ img.astype(np.float64).T).astype(np.float32)
    np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :10])


def test_images_without_captions_are_an_error():
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="1 images have no caption"):
        retrieval_metrics(img, img[:2], np.array([0, 1]))
