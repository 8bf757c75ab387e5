"""Single-label classification metrics, computed the way CLIP_benchmark reports them.

- `acc1`, `acc5`: the fraction of samples whose true class is among the k best-scoring classes
  (`acc5` only with at least 5 classes, as CLIP_benchmark, which writes NaN there; we leave it out).
- `mean_per_class_recall`: the mean over the classes present in the labels of the fraction of that
  class's samples predicted correctly (scikit-learn's `balanced_accuracy_score`, which
  CLIP_benchmark calls).

Ties: classes are ordered by score, highest first, and equal scores by class index, lowest first
(the order of a stable sort). So the prediction is the lowest-index class among the best scores,
and the true class is "in the top k" when fewer than k classes come before it in that order. This
rule is deterministic; `torch.topk`, which CLIP_benchmark calls, leaves the order of ties open.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ROW_BLOCK = 4096  # rows at a time, so that the [rows, classes] comparison masks stay small


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be [N] with N = {scores.shape[0]} (scores' rows), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {scores.shape[1]}) (the number of classes); got {labels.min()}..{labels.max()}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity: the model produced non-finite features")
    return scores, labels.astype(np.int64)


def target_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rank of the true class of each sample [N] int64: 0 = predicted; see the tie rule above.

    rank = #classes scoring strictly higher + #classes scoring the same with a lower index.
    """
    scores, labels = _check(scores, labels)
    ranks = np.empty(len(labels), dtype=np.int64)
    class_idx = np.arange(scores.shape[1])
    for start in range(0, len(labels), ROW_BLOCK):
        s = scores[start : start + ROW_BLOCK]
        y = labels[start : start + ROW_BLOCK]
        true = s[np.arange(len(y)), y][:, None]
        before = (s > true) | ((s == true) & (class_idx[None, :] < y[:, None]))
        ranks[start : start + ROW_BLOCK] = before.sum(axis=1)
    return ranks


def predict(scores: np.ndarray) -> np.ndarray:
    """Predicted class [N] int64: the best score, the lowest index among equal best scores."""
    return np.asarray(scores).argmax(axis=1).astype(np.int64)


def topk_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best classes of each row [N, k] int64, in the order of the tie rule."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for start in range(0, scores.shape[0], ROW_BLOCK):
        # A stable ascending sort of -score keeps equal scores in index order.
        order = np.argsort(-scores[start : start + ROW_BLOCK], axis=1, kind="stable")
        out[start : start + ROW_BLOCK] = order[:, :k]
    return out


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] int64 counts: row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def mean_per_class_recall(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the recall of that class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("no samples to score")
    present = np.unique(labels)
    hits = np.bincount(labels[labels == predictions], minlength=present.max() + 1)
    totals = np.bincount(labels, minlength=present.max() + 1)
    return float(np.mean(hits[present] / totals[present]))


def classification_metrics(scores: np.ndarray, labels: np.ndarray, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`acc{k}` for each k (k <= number of classes) and `mean_per_class_recall`.

    scores: [N, C] float (logits or any monotone score), labels: [N] int class indices.
    """
    scores, labels = _check(scores, labels)
    if len(labels) == 0:
        raise ValueError("no samples to score")
    ranks = target_ranks(scores, labels)
    metrics: dict[str, float] = {}
    for k in topk:
        if k <= scores.shape[1]:
            metrics[f"acc{k}"] = float(np.mean(ranks < k))
    metrics["mean_per_class_recall"] = mean_per_class_recall(labels, predict(scores))
    return metrics
